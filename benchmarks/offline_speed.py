"""Offline gradient steps per second of IQL, CQL and Cal-QL at a domain preset.

Times each script's own jitted offline update loop (sampling on the device included) on an
offline buffer of random numbers with the domain's shapes: timing does not depend on the
values, and no dataset is needed. Prints one JSON line per algorithm.

    python benchmarks/offline_speed.py                                  # iql, cql, calql; AntMaze presets
    python benchmarks/offline_speed.py --algorithms cql --domain locomotion
    python benchmarks/offline_speed.py --algorithms cql --domain locomotion --observation-dim 29 \
        --action-dim 8 --set bc_steps=0 --updates 100 --min-seconds 5

benchmarks/compare.py runs it to time this side of the IQL and CQL comparisons.
"""

from __future__ import annotations

import ast
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

from benchmarks.reference.timing import time_calls
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
    """Updates per call of the update loop; the call after a warm-up call is timed."""
    offline_rows: int = 1_000_000
    """Rows in the offline buffer (D4RL AntMaze holds 1M)."""
    observation_dim: int | None = None
    """Observation size; default: the domain's (SHAPES)."""
    action_dim: int | None = None
    """Action size; default: the domain's (SHAPES)."""
    set: tuple[str, ...] = ()
    """Overrides of the scripts' Args as NAME=VALUE (Python literals), applied before the preset: bc_steps=0."""
    min_seconds: float = 0.0
    """Keep timing calls until at least this many seconds have passed (0: one call)."""


def random_rows(rng: np.random.Generator, n: int, observation_dim: int, action_dim: int) -> dict[str, np.ndarray]:
    """Every column any of the scripts reads (Cal-QL's returns-to-go included)."""
    return {"observations": rng.normal(size=(n, observation_dim)).astype(np.float32),
            "actions": rng.uniform(-0.9, 0.9, (n, action_dim)).astype(np.float32),
            "rewards": rng.normal(size=n).astype(np.float32),
            "next_observations": rng.normal(size=(n, observation_dim)).astype(np.float32),
            "masks": np.ones(n, np.float32), "mc_returns": rng.normal(size=n).astype(np.float32)}


def parse_overrides(pairs: tuple[str, ...]) -> dict:
    """NAME=VALUE pairs as a dict; each VALUE a Python literal (256, 1e-4, (256, 256), True) or a string."""
    overrides = {}
    for pair in pairs:
        name, _, text = pair.partition("=")
        try:
            overrides[name] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            overrides[name] = text
    return overrides


def compile_offline_loop(module, train_args, config, agent, offline, updates: int):
    """The script's own jitted offline loop, compiled for `updates` updates per call: returns
    (f(agent) -> (agent, info), compile seconds)."""
    functions = module.make_step_functions(train_args, config)
    start = time.perf_counter()
    if module.ALGORITHM == "iql":  # a lax.scan: the update count is static
        compiled = functions[1].lower(agent, offline, num_updates=updates).compile()
        run = lambda agent: compiled(agent, offline)  # noqa: E731
    else:  # cql, calql: a fori_loop over a traced count
        compiled = functions[0].lower(agent, offline, updates).compile()
        run = lambda agent: compiled(agent, offline, updates)  # noqa: E731
    return run, time.perf_counter() - start


def measure(algorithm: str, args: OfflineSpeedArgs) -> dict:
    module = importlib.import_module(f"algorithms.{algorithm}")
    default_observation_dim, default_action_dim = SHAPES[args.domain]
    observation_dim = args.observation_dim or default_observation_dim
    action_dim = args.action_dim or default_action_dim
    train_args = module.apply_preset(module.Args(**parse_overrides(args.set)), args.domain)
    if getattr(train_args, "reward_scale", 0.0) is None:  # IQL sets it from the data
        train_args = dataclasses.replace(train_args, reward_scale=1.0)
    config = module.make_config(train_args, action_dim)
    agent = module.create_agent(train_args, config, observation_dim, action_dim)
    offline = buffers.from_arrays(random_rows(np.random.default_rng(0), args.offline_rows, observation_dim, action_dim))
    run, compile_seconds = compile_offline_loop(module, train_args, config, agent, offline, args.updates)

    start = time.perf_counter()
    agent, info = jax.block_until_ready(run(agent))  # the warm-up call, timed for first_call_seconds
    first_call = compile_seconds + time.perf_counter() - start
    _, calls, seconds = time_calls(lambda state: run(state[0]), (agent, info), jax.block_until_ready,
                                   args.min_seconds, warmup_calls=0)
    return {"algorithm": algorithm, "domain": args.domain, "device": jax.devices()[0].device_kind,
            "batch_size": train_args.batch_size, "observation_dim": observation_dim, "action_dim": action_dim,
            "overrides": list(args.set), "updates_per_call": args.updates,
            "compile_seconds": round(compile_seconds, 2), "first_call_seconds": round(first_call, 2),
            "steps_per_second": round(calls * args.updates / seconds, 1),
            "timed_calls": calls, "timed_seconds": round(seconds, 2)}


if __name__ == "__main__":
    cli_args = tyro.cli(OfflineSpeedArgs)
    for name in cli_args.algorithms:
        print(json.dumps(measure(name, cli_args)), flush=True)
