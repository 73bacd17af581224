"""Time ikostrikov/rlpd's update: `SACLearner.update(batch, G)` at the AntMaze settings.

Run by benchmarks/compare.py with the Python of its reference virtual environment (rlpd and its
dependencies, none of this project's); it imports nothing of this project but `timing.py` beside
it. It prints one JSON line: critic gradient steps per second and compile seconds.

What it builds, through rlpd's own code:
  * the agent: `SACLearner.create` with rlpd's `configs/rlpd_config.py` changed as the README's
    D4RL AntMaze command changes it (`backup_entropy=False`, `hidden_dims=(256, 256, 256)`,
    `num_min_qs=1`; E=10 critics with LayerNorm);
  * the batch as `train_finetuning.py` builds it for `update`: half the G x B rows drawn with
    `Dataset.sample` from the offline data (here `--offline-rows` random rows), half from the
    online replay buffer (here 100k random rows), interleaved row by row, as numpy arrays on the
    host. Drawing them is not timed; their transfer to the device is part of each timed call,
    as it is in the official loop. A few distinct batches are drawn and used in turn.

Only the jitted update is timed: compiled once with `.lower().compile()` (compile seconds),
one warm-up call, then sequential calls for at least `--min-seconds`.

    python benchmarks/reference/rlpd_update.py --source ~/.cache/o2o-compare/src/rlpd
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from timing import package_versions, time_calls

VERSIONS = ("jax", "jaxlib", "flax", "optax", "numpy", "tfp-nightly", "tensorflow-probability", "gym",
            "ml-collections")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", required=True, help="checkout of ikostrikov/rlpd")
    parser.add_argument("--observation-dim", type=int, default=29)
    parser.add_argument("--action-dim", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=256, help="B, rows per critic step")
    parser.add_argument("--utd", type=int, default=20, help="G, critic steps per update call")
    parser.add_argument("--hidden-dims", type=int, nargs="+", default=[256, 256, 256])
    parser.add_argument("--offline-rows", type=int, default=1_000_000)
    parser.add_argument("--online-rows", type=int, default=100_000)
    parser.add_argument("--offline-ratio", type=float, default=0.5)
    parser.add_argument("--batches", type=int, default=4, help="distinct batches used in turn")
    parser.add_argument("--min-seconds", type=float, default=5.0)
    return parser.parse_args(argv)


def random_rows(rng, n: int, observation_dim: int, action_dim: int) -> dict:
    """Rows with the keys rlpd's replay buffer holds; timing does not depend on their values."""
    import numpy as np
    return {"observations": rng.normal(size=(n, observation_dim)).astype(np.float32),
            "actions": rng.uniform(-1, 1, (n, action_dim)).astype(np.float32),
            "rewards": rng.normal(size=n).astype(np.float32),
            "masks": np.ones(n, np.float32), "dones": np.zeros(n, bool),
            "next_observations": rng.normal(size=(n, observation_dim)).astype(np.float32)}


def interleave(offline: dict, online: dict) -> dict:
    """One update's rows: offline and online rows alternating, the layout train_finetuning.py's
    mixing gives (each G-th slice then holds both halves equally)."""
    import numpy as np
    rows = {}
    for key, first in offline.items():
        second = online[key]
        merged = np.empty((len(first) + len(second), *first.shape[1:]), first.dtype)
        merged[0::2], merged[1::2] = first, second
        rows[key] = merged
    return rows


def antmaze_config(hidden_dims: tuple[int, ...]) -> dict:
    """rlpd's configs/rlpd_config.py with the README's AntMaze command-line changes."""
    from configs import rlpd_config  # rlpd's own config files (the checkout is on sys.path)
    config = rlpd_config.get_config()
    config.backup_entropy = False
    config.hidden_dims = hidden_dims
    config.num_min_qs = 1
    kwargs = dict(config)
    kwargs.pop("model_cls")  # train_finetuning.py picks the class with it
    return kwargs


def main(argv=None) -> None:
    args = parse_args(argv)
    sys.path.insert(0, args.source)
    # rlpd reaches the JAX substrate as an attribute of the top-level tfp package, which exists
    # only once the subpackage has been imported.
    import tensorflow_probability.substrates.jax  # noqa: F401
    import gym
    import jax
    import numpy as np
    from rlpd.agents import SACLearner
    from rlpd.data.dataset import Dataset

    kwargs = antmaze_config(tuple(args.hidden_dims))
    observation_space = gym.spaces.Box(-np.inf, np.inf, (args.observation_dim,), np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (args.action_dim,), np.float32)
    agent = SACLearner.create(0, observation_space, action_space, **kwargs)

    rng = np.random.default_rng(0)
    offline = Dataset(random_rows(rng, args.offline_rows, args.observation_dim, args.action_dim), seed=0)
    online = Dataset(random_rows(rng, args.online_rows, args.observation_dim, args.action_dim), seed=1)
    rows = args.batch_size * args.utd
    offline_count = int(rows * args.offline_ratio)
    batches = [interleave(dict(offline.sample(offline_count)), dict(online.sample(rows - offline_count)))
               for _ in range(args.batches)]

    start = time.perf_counter()
    compiled = SACLearner.update.lower(agent, batches[0], args.utd).compile()
    compile_seconds = time.perf_counter() - start

    def step(state):
        agent, index = state
        agent, _ = compiled(agent, batches[index % len(batches)])
        return agent, index + 1

    _, calls, seconds = time_calls(step, (agent, 0), jax.block_until_ready, args.min_seconds)
    print(json.dumps({
        "steps_per_second": round(calls * args.utd / seconds, 2), "steps_per_call": args.utd,
        "compile_seconds": round(compile_seconds, 2), "timed_calls": calls, "timed_seconds": round(seconds, 2),
        "device": jax.devices()[0].device_kind, "versions": package_versions(VERSIONS),
        "settings": {key: list(value) if isinstance(value, tuple) else value for key, value in kwargs.items()},
    }), flush=True)


if __name__ == "__main__":
    main()
