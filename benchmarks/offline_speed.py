"""Offline gradient steps per second of IQL, CQL and Cal-QL at a domain preset.

Times each script's own jitted offline update loop (sampling on the device included) on an
offline buffer of random numbers with the domain's shapes: timing does not depend on the
values, and no dataset is needed. Prints one JSON line per algorithm.

    python benchmarks/offline_speed.py                                  # iql, cql, calql; AntMaze presets
    python benchmarks/offline_speed.py --algorithms cql --domain locomotion
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import sys
import time

import jax
import numpy as np
import tyro

if __package__ in (None, ""):  # run as `python benchmarks/offline_speed.py`: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import buffers

# (observation, action) sizes of a representative task per domain
SHAPES = {"antmaze": (29, 8), "locomotion": (17, 6), "adroit": (45, 24), "kitchen": (59, 9), "pointmaze": (6, 2)}


@dataclasses.dataclass
class OfflineSpeedArgs:
    algorithms: tuple[str, ...] = ("iql", "cql", "calql")
    """Scripts to time."""
    domain: str = "antmaze"
    """Preset (network sizes, CQL settings) and shapes: antmaze, locomotion, adroit, kitchen, pointmaze."""
    updates: int = 200
    """Updates per call of the update loop; the second call is timed (the first compiles)."""
    offline_rows: int = 1_000_000
    """Rows in the offline buffer (D4RL AntMaze holds 1M)."""


def random_rows(rng: np.random.Generator, n: int, observation_dim: int, action_dim: int) -> dict[str, np.ndarray]:
    """Every column any of the scripts reads (Cal-QL's returns-to-go included)."""
    return {"observations": rng.normal(size=(n, observation_dim)).astype(np.float32),
            "actions": rng.uniform(-0.9, 0.9, (n, action_dim)).astype(np.float32),
            "rewards": rng.normal(size=n).astype(np.float32),
            "next_observations": rng.normal(size=(n, observation_dim)).astype(np.float32),
            "masks": np.ones(n, np.float32), "mc_returns": rng.normal(size=n).astype(np.float32)}


def offline_updates(module, train_args, config):
    """The script's offline loop as f(agent, offline, n) -> (agent, info)."""
    functions = module.make_step_functions(train_args, config)
    if module.ALGORITHM == "iql":
        return lambda agent, offline, n: functions[1](agent, offline, num_updates=n)
    return functions[0]


def measure(algorithm: str, args: OfflineSpeedArgs) -> dict:
    module = importlib.import_module(f"algorithms.{algorithm}")
    observation_dim, action_dim = SHAPES[args.domain]
    train_args = module.apply_preset(module.Args(), args.domain)
    if getattr(train_args, "reward_scale", 0.0) is None:  # IQL sets it from the data
        train_args = dataclasses.replace(train_args, reward_scale=1.0)
    config = module.make_config(train_args, action_dim)
    agent = module.create_agent(train_args, config, observation_dim, action_dim)
    offline = buffers.from_arrays(random_rows(np.random.default_rng(0), args.offline_rows, observation_dim, action_dim))
    run = offline_updates(module, train_args, config)

    start = time.perf_counter()
    agent, info = run(agent, offline, args.updates)
    jax.block_until_ready(info)
    first_call = time.perf_counter() - start
    start = time.perf_counter()
    agent, info = run(agent, offline, args.updates)
    jax.block_until_ready(info)
    seconds = time.perf_counter() - start
    return {"algorithm": algorithm, "domain": args.domain, "device": jax.devices()[0].device_kind,
            "batch_size": train_args.batch_size, "first_call_seconds": round(first_call, 2),
            "steps_per_second": round(args.updates / seconds, 1)}


if __name__ == "__main__":
    cli_args = tyro.cli(OfflineSpeedArgs)
    for name in cli_args.algorithms:
        print(json.dumps(measure(name, cli_args)), flush=True)
