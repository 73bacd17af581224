"""Time nissymori/JAX-CORL's offline update loop: `update_n_times` of `algos/iql.py` or `algos/cql.py`.

Run by benchmarks/compare.py with the Python of its reference virtual environment (JAX-CORL's
dependencies, none of this project's); it imports nothing of this project but `timing.py`
beside it. It prints one JSON line: gradient updates per second and compile seconds.

The algorithm file is imported as a module. It reads its configuration from the command line
when imported (OmegaConf), so it is imported with an empty command line and its module-level
`config` is then changed attribute by attribute (`--set NAME=VALUE`), as its own `__main__`
block sets `action_dim` and `target_entropy`. Its top-level imports of d4rl, wandb and gym, used
only to load datasets, log and evaluate, are met by the stand-ins in `stubs/`.

The dataset is `--offline-rows` random rows in the file's own `Transition` tuple, on the device,
as its `get_dataset` leaves it. The update is jitted as the file's `__main__` does it
(`jax.jit(update_n_times, static_argnums=(3,))`: `n_jitted_updates` updates, 8 by default,
unrolled in one call, minibatches drawn inside), compiled with `.lower().compile()` (compile
seconds), called once to warm up, then called in sequence for at least `--min-seconds`, each call
with a fresh key split from the last, as the training loop does.

    python benchmarks/reference/jax_corl_update.py --source ~/.cache/o2o-compare/src/JAX-CORL --algorithm cql
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import sys
import time

from timing import package_versions, time_calls

STUBS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "stubs")
VERSIONS = ("jax", "jaxlib", "flax", "optax", "numpy", "distrax", "tfp-nightly", "tensorflow-probability",
            "pydantic", "omegaconf")
TRAIN_STATE_FACTORIES = {"iql": ("IQL", "create_iql_train_state"), "cql": ("CQL", "create_cql_train_state")}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", required=True, help="checkout of nissymori/JAX-CORL")
    parser.add_argument("--algorithm", choices=sorted(TRAIN_STATE_FACTORIES), required=True)
    parser.add_argument("--observation-dim", type=int, default=29)
    parser.add_argument("--action-dim", type=int, default=8)
    parser.add_argument("--offline-rows", type=int, default=1_000_000)
    parser.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE",
                        help="config fields to change (Python literals): hidden_dims=(256,256,256)")
    parser.add_argument("--min-seconds", type=float, default=5.0)
    return parser.parse_args(argv)


def import_algorithm(source: str, algorithm: str):
    """algos/<algorithm>.py as a module, with the stand-ins first on the path and an empty
    command line for the config it parses at import."""
    sys.path.insert(0, STUBS)
    path = os.path.join(source, "algos", f"{algorithm}.py")
    spec = importlib.util.spec_from_file_location(f"jax_corl_{algorithm}", path)
    module = importlib.util.module_from_spec(spec)
    saved_argv, sys.argv = sys.argv, [path]
    try:
        spec.loader.exec_module(module)
    finally:
        sys.argv = saved_argv
    return module


def configure(config, pairs: list[str], action_dim: int) -> dict:
    """Apply NAME=VALUE changes to the file's config, then what its __main__ block sets from the
    environment (action_dim; a non-negative target entropy becomes -|A|). Returns its fields,
    printable as JSON (infinities as strings)."""
    for pair in pairs:
        name, _, text = pair.partition("=")
        if name not in type(config).model_fields:
            raise SystemExit(f"unknown config field {name!r}")
        setattr(config, name, ast.literal_eval(text))
    if "action_dim" in type(config).model_fields:
        config.action_dim = action_dim
    if getattr(config, "target_entropy", -1.0) >= 0.0:
        config.target_entropy = -float(action_dim)
    return {name: repr(value) if isinstance(value, float) and abs(value) == float("inf") else value
            for name, value in config.model_dump(warnings=False).items()}  # their tuple annotations are loose


def random_dataset(module, rows: int, observation_dim: int, action_dim: int):
    """The file's Transition tuple filled with random rows on the device (no terminals)."""
    import jax.numpy as jnp
    import numpy as np
    rng = np.random.default_rng(0)
    shapes = {"observations": (rows, observation_dim), "next_observations": (rows, observation_dim),
              "actions": (rows, action_dim)}
    columns = {}
    for field in module.Transition._fields:
        if field == "actions":
            columns[field] = rng.uniform(-0.9, 0.9, shapes[field])
        elif field in shapes or field == "rewards":
            columns[field] = rng.normal(size=shapes.get(field, rows))
        else:  # dones, dones_float
            columns[field] = np.zeros(rows)
    return module.Transition(**{field: jnp.asarray(value, jnp.float32) for field, value in columns.items()})


def main(argv=None) -> None:
    args = parse_args(argv)
    module = import_algorithm(args.source, args.algorithm)
    import jax

    settings = configure(module.config, args.set, args.action_dim)
    dataset = random_dataset(module, args.offline_rows, args.observation_dim, args.action_dim)
    class_name, factory = TRAIN_STATE_FACTORIES[args.algorithm]
    key, init_key = jax.random.split(jax.random.PRNGKey(0))
    train_state = getattr(module, factory)(init_key, dataset.observations[0], dataset.actions[0], module.config)
    update = jax.jit(getattr(module, class_name).update_n_times, static_argnums=(3,))

    start = time.perf_counter()
    compiled = update.lower(train_state, dataset, key, module.config).compile()
    compile_seconds = time.perf_counter() - start

    def step(state):
        train_state, key = state
        key, update_key = jax.random.split(key)
        train_state, _ = compiled(train_state, dataset, update_key)
        return train_state, key

    _, calls, seconds = time_calls(step, (train_state, key), jax.block_until_ready, args.min_seconds)
    updates = module.config.n_jitted_updates
    print(json.dumps({
        "steps_per_second": round(calls * updates / seconds, 2), "steps_per_call": updates,
        "compile_seconds": round(compile_seconds, 2), "timed_calls": calls, "timed_seconds": round(seconds, 2),
        "device": jax.devices()[0].device_kind, "versions": package_versions(VERSIONS),
        "settings": settings,
    }), flush=True)


if __name__ == "__main__":
    main()
