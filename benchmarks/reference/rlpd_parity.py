"""One update of ikostrikov/rlpd's `SACLearner`, with every input and output written to a file,
for benchmarks/parity.py to compare against ours.

Run by parity.py with the Python of the rlpd virtual environment (see compare.py's set-up); it
imports nothing of this project but `parity_io.py` beside it. It reads the batch from `--input`,
builds the agent with rlpd's own `SACLearner.create` (configs/rlpd_config.py, changed by
`--config`), and writes to `--output`:

  CASE/init/{actor,critic,target_critic,temp}/...   the parameters the update starts from
  CASE/out/{q,actor_mean,actor_std,actor_mode,temperature}   the networks on the batch, before it
  CASE/info/...                                      the metrics of one `update(batch, utd)` call
  CASE/updated/{actor,critic,target_critic,temp}/... the parameters after it
  CASE/dist/...                                      the metrics of `keys` further calls from the
                                                     same start, each with its own random key

for each case of `--config` (a JSON list of objects, each named by `case`). A case may set
`log_std_bias` (the actor's log-std output layer becomes kernel 0, this bias:
below rlpd's clip at -20, every sample is tanh(mean) up to e^-20) and `log_temp` (the
temperature's one parameter). Those are the only changes to the official agent; its update runs
as it is.
"""

from __future__ import annotations

import argparse
import json
import sys

from parity_io import flatten, load, save, subtree


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", required=True, help="checkout of ikostrikov/rlpd")
    parser.add_argument("--input", required=True, help=".npz holding batch/<key> arrays")
    parser.add_argument("--output", required=True, help=".npz to write")
    parser.add_argument("--config", required=True, help="JSON list of cases: case, SACLearner.create "
                                                        "keywords, utd, keys, log_std_bias, log_temp, seed")
    return parser.parse_args(argv)


def agent_kwargs(settings: dict) -> dict:
    """rlpd's configs/rlpd_config.py with the SACLearner.create keywords given in `settings`."""
    from configs import rlpd_config  # rlpd's own config files (the checkout is on sys.path)
    config = rlpd_config.get_config()
    kwargs = dict(config)
    kwargs.pop("model_cls")  # train_finetuning.py picks the class with it
    for name in kwargs:
        if name in settings:
            kwargs[name] = tuple(settings[name]) if name == "hidden_dims" else settings[name]
    return kwargs


def params_of(agent) -> dict:
    return {"actor": agent.actor.params, "critic": agent.critic.params,
            "target_critic": agent.target_critic.params, "temp": agent.temp.params}


def run_case(settings: dict, batch: dict) -> dict:
    """The arrays of one case (see the module docstring), without the case prefix."""
    import gym
    import jax
    import jax.numpy as jnp
    import numpy as np
    from rlpd.agents import SACLearner

    observation_dim, action_dim = batch["observations"].shape[-1], batch["actions"].shape[-1]
    observation_space = gym.spaces.Box(-np.inf, np.inf, (observation_dim,), np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (action_dim,), np.float32)
    kwargs = agent_kwargs(settings)
    agent = SACLearner.create(settings.get("seed", 0), observation_space, action_space, **kwargs)

    if settings.get("log_std_bias") is not None:
        head = {"kernel": jnp.zeros_like(agent.actor.params["OutputDenseLogStd"]["kernel"]),
                "bias": jnp.full_like(agent.actor.params["OutputDenseLogStd"]["bias"], settings["log_std_bias"])}
        actor_params = {**agent.actor.params, "OutputDenseLogStd": head}
        agent = agent.replace(actor=agent.actor.replace(params=actor_params))
    if settings.get("log_temp") is not None:
        log_temp = jnp.asarray(settings["log_temp"], jnp.float32)
        agent = agent.replace(temp=agent.temp.replace(params={"log_temp": log_temp}))

    arrays = flatten({"init": params_of(agent)})
    dist = agent.actor.apply_fn({"params": agent.actor.params}, batch["observations"])
    arrays.update({"out/q": agent.critic.apply_fn({"params": agent.critic.params}, batch["observations"],
                                                  batch["actions"]),
                   "out/actor_mean": dist.distribution.mean(), "out/actor_std": dist.distribution.stddev(),
                   "out/actor_mode": dist.mode(),
                   "out/temperature": agent.temp.apply_fn({"params": agent.temp.params})})

    utd = settings["utd"]
    updated, info = SACLearner.update(agent, batch, utd)
    arrays.update(flatten({"info": info, "updated": params_of(updated)}))
    draws = [SACLearner.update(agent.replace(rng=jax.random.PRNGKey(1000 + index)), batch, utd)[1]
             for index in range(settings.get("keys", 0))]
    if draws:
        arrays.update({f"dist/{name}": np.stack([np.asarray(d[name]) for d in draws]) for name in draws[0]})
    arrays["settings"] = json.dumps({key: list(v) if isinstance(v, tuple) else v for key, v in kwargs.items()})
    return arrays


def main(argv=None) -> None:
    args = parse_args(argv)
    sys.path.insert(0, args.source)
    import tensorflow_probability.substrates.jax  # noqa: F401  (rlpd reaches it as an attribute)
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
