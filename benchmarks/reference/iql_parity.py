"""One update of ikostrikov/implicit_q_learning's `Learner` (`_update_jit`: value, actor, critic,
target), with every input and output written to a file, for benchmarks/parity.py.

Run by parity.py with the Python of the IQL virtual environment; it imports nothing of this
project but `parity_io.py` beside it. It reads the batch from `--input` and, for each case of
`--config` (a JSON list of objects, each named by `case`), builds `learner.Learner` with the
case's keywords (hidden_dims, expectile, temperature, dropout_rate, opt_decay_schedule,
max_steps, ...), calls `Learner.update` `updates` times on the batch, and writes:

  CASE/init/{actor,critic,value,target_critic}/...   the parameters the updates start from
  CASE/out/{q1,q2,v,actor_mean,actor_std}              the networks on the batch, before them
  CASE/info/...                                        the metrics of the last update
  CASE/updated/{...}/...                               the parameters after the updates

IQL's update draws nothing at random without dropout, so every case is compared exactly.

Shims (the update itself is unchanged): `jax.tree_multimap`, removed from JAX, is
`jax.tree_util.tree_map` (learner.py's target update calls it); flax's `flax_return_frozendict`
is switched on, so that `Model.create`'s `variables.pop('params')` gets the (rest, params) pair
that flax returned when the code was written; and while learner.py is imported, `jax.jit` drops
static argument names that the function does not have (policy.py's `_sample_actions`, the
environment's action sampler, names a `distribution` argument it lacks, which JAX now refuses).
"""

from __future__ import annotations

import argparse
import json
import sys

from parity_io import flatten, load, save, subtree


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", required=True, help="checkout of ikostrikov/implicit_q_learning")
    parser.add_argument("--input", required=True, help=".npz holding batch/<key> arrays")
    parser.add_argument("--output", required=True, help=".npz to write")
    parser.add_argument("--config", required=True, help="JSON list of cases")
    return parser.parse_args(argv)


def shims() -> None:
    """The compatibility shims of the module docstring; imports learner.py under them."""
    import functools
    import inspect

    import flax
    import jax
    jax.tree_multimap = jax.tree_util.tree_map
    flax.config.update("flax_return_frozendict", True)

    jit = jax.jit

    def jit_known_names(function=None, **options):
        if function is None:
            return functools.partial(jit_known_names, **options)
        if "static_argnames" in options:
            names = inspect.signature(function).parameters
            options["static_argnames"] = tuple(name for name in options["static_argnames"] if name in names)
        return jit(function, **options)

    jax.jit = jit_known_names
    try:
        import learner  # noqa: F401  (and policy.py, critic.py, actor.py, value_net.py, common.py)
    finally:
        jax.jit = jit


LEARNER_KEYWORDS = ("actor_lr", "value_lr", "critic_lr", "hidden_dims", "discount", "tau", "expectile", "temperature",
                    "dropout_rate", "max_steps", "opt_decay_schedule")


def params_of(agent) -> dict:
    return {"actor": agent.actor.params, "critic": agent.critic.params, "value": agent.value.params,
            "target_critic": agent.target_critic.params}


def run_case(settings: dict, batch: dict) -> dict:
    import jax
    from common import Batch
    from learner import Learner

    rows = Batch(**{name: batch[name] for name in Batch._fields})
    kwargs = {name: settings[name] for name in LEARNER_KEYWORDS if name in settings}
    if "hidden_dims" in kwargs:
        kwargs["hidden_dims"] = tuple(kwargs["hidden_dims"])
    agent = Learner(settings.get("seed", 0), rows.observations[:1], rows.actions[:1], **kwargs)
    arrays = flatten({"init": params_of(agent)})
    q1, q2 = agent.critic(rows.observations, rows.actions)
    distribution = agent.actor(rows.observations)
    arrays.update({"out/q1": q1, "out/q2": q2, "out/v": agent.value(rows.observations),
                   "out/actor_mean": distribution.mean(), "out/actor_std": distribution.stddev()})
    info = {}
    for _ in range(settings.get("updates", 1)):
        info = agent.update(rows)
    arrays.update(flatten({"info": {name: value for name, value in info.items() if name != "adv"},
                           "updated": params_of(agent)}))
    return jax.device_get(arrays)


def main(argv=None) -> None:
    args = parse_args(argv)
    sys.path.insert(0, args.source)
    shims()
    import jax
    import jax.numpy as jnp
    import numpy as np

    batch = {name: jnp.asarray(value) for name, value in subtree(load(args.input), "batch").items()}
    arrays = {}
    for settings in json.loads(args.config):
        case = run_case(settings, batch)
        arrays.update({f"{settings['case']}/{name}": np.asarray(value) for name, value in case.items()})
    save(args.output, arrays)
    print(json.dumps({"written": len(arrays), "device": jax.devices()[0].device_kind}), flush=True)


if __name__ == "__main__":
    main()
