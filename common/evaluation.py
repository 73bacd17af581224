"""Deterministic evaluation of N episodes, stepped together so the policy sees one batch per step."""

from __future__ import annotations

from typing import Callable

import numpy as np

from common.datasets import Scoring


class Evaluator:
    """Holds N evaluation envs; `__call__` runs one episode in each and returns the metrics.

    Each episode is reset with its own seed (`seed + episode`), so an evaluation depends only on
    the policy and the seed, never on earlier evaluations (which keeps resumed runs identical).
    """

    def __init__(self, make_env: Callable, num_episodes: int, scoring: Scoring):
        self.envs = [make_env() for _ in range(num_episodes)]
        self.scoring = scoring

    def close(self) -> None:
        for env in self.envs:
            env.close()

    def __call__(self, policy: Callable[[np.ndarray], np.ndarray], seed: int) -> dict[str, float]:
        """`policy` maps a (N, obs_dim) batch to (N, act_dim) deterministic actions."""
        n = len(self.envs)
        observations = np.stack([env.reset(seed=seed + i)[0] for i, env in enumerate(self.envs)])
        returns, lengths = np.zeros(n), np.zeros(n, dtype=np.int64)
        successes, has_success = np.zeros(n, dtype=bool), False
        running = np.ones(n, dtype=bool)
        while running.any():
            actions = np.asarray(policy(observations))
            for i in np.flatnonzero(running):
                observation, reward, terminated, truncated, info = self.envs[i].step(actions[i])
                observations[i] = observation
                returns[i] += reward
                lengths[i] += 1
                if "success" in info:
                    has_success = True
                    successes[i] |= bool(info["success"])
                running[i] = not (terminated or truncated)
        metrics = {"return": float(returns.mean()), "length": float(lengths.mean())}
        score = self.scoring.normalized(returns, successes)
        if score is not None:
            metrics["normalized_score"] = score
        if has_success:
            metrics["success_rate"] = float(successes.mean())
        return metrics
