"""One fine-tuning update of zhouzypaul/wsrl's `SACAgent.update_high_utd` (the WSRL online step:
G critic steps on consecutive minibatches, then one actor and one temperature step on the whole
batch), or one pre-training update of its `CalQLAgent` / `CQLAgent` (`agent.update(batch)`, as
finetune.py's offline phase calls it), with every input and output written to a file, for
benchmarks/parity.py.

Run by parity.py with the Python of the WSRL virtual environment; it imports nothing of this
project but `parity_io.py` beside it. It reads the batch from `--input` and, for each case of
`--config` (a JSON list of objects, each named by `case`), builds the agent as `finetune.py`
does (`SACAgent.create` with `encoder_def=None` and `experiments/configs/wsrl_config.py`'s
settings: 10 critics, subsample 2, LayerNorm; the case sets widths, `max_target_backup` and the
learning rates of the launch scripts), and writes:

  CASE/init/{params,target_params}/...   the parameters the update starts from (ModuleDict layout)
  CASE/out/{q,actor_mean,actor_std,temperature}   the networks on the batch, before the update
  CASE/info/...                          the update's scalar metrics
  CASE/updated/{params,target_params}/...
  CASE/dist/...                          the metrics of `keys` further calls, one random key each

A case may change the initial parameters, nothing else: `identical_critics` (every critic trunk
a copy of the first, so that which critics a subset-min draws does not matter), `ignore_actions`
(the action rows of the trunks' first kernel set to 0: Q at uniform random actions is Q(s)), `log_std_bias`
(the actor's log-std head kernel 0 and this bias: below the clip, std 1e-5), `temperature_param`
(the temperature's softplus parameter).

Shim: `jax.tree_map`, removed from JAX, is `jax.tree_util.tree_map` (update_high_utd calls it).
"""

from __future__ import annotations

import argparse
import json
import sys

from parity_io import flatten, load, save, subtree


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", required=True, help="checkout of zhouzypaul/wsrl")
    parser.add_argument("--input", required=True, help=".npz holding batch/<key> arrays")
    parser.add_argument("--output", required=True, help=".npz to write")
    parser.add_argument("--config", required=True, help="JSON list of cases")
    return parser.parse_args(argv)


def build(settings: dict, batch: dict):
    """SACAgent.create as finetune.py calls it, with wsrl_config.py's settings; or, for a
    pre-training case (`pretraining`: "calql" or "cql"), the pre-training agent with
    cql_config.py's settings and the launch scripts' WSRL network (10 critics, subsample 2,
    LayerNorm), updated by the case's `cql` object."""
    import jax
    from wsrl.agents import agents
    from wsrl.agents.sac import SACAgent

    hidden = settings["hidden_dims"]
    network = {"activate_final": True, "use_layer_norm": True, "kernel_scale_final": settings.get("kernel_scale_final")}
    if settings.get("pretraining"):
        from experiments.configs import cql_config
        config = cql_config.get_config({
            "critic_ensemble_size": 10, "critic_subsample_size": 2, "use_calql": settings["pretraining"] == "calql",
            "actor_optimizer_kwargs": {"learning_rate": settings["actor_lr"]},
            "critic_optimizer_kwargs": {"learning_rate": settings["critic_lr"]},
            "temperature_optimizer_kwargs": {"learning_rate": settings["temp_lr"]}, **settings["cql"]})
        kwargs = config.to_dict()
        for name in ("critic_network_kwargs", "policy_network_kwargs"):
            kwargs[name] = {"hidden_dims": hidden, **network}
        return agents[settings["pretraining"]].create(
            rng=jax.random.PRNGKey(settings.get("seed", 0)), observations=batch["observations"][:1],
            actions=batch["actions"][:1], encoder_def=None, **kwargs)
    return SACAgent.create(
        rng=jax.random.PRNGKey(settings.get("seed", 0)), observations=batch["observations"][:1],
        actions=batch["actions"][:1], encoder_def=None,
        critic_network_kwargs={"hidden_dims": hidden, **network},
        policy_network_kwargs={"hidden_dims": hidden, **network},
        policy_kwargs={"tanh_squash_distribution": True, "std_parameterization": "exp"},
        critic_ensemble_size=10, critic_subsample_size=2, temperature_init=1.0,
        actor_optimizer_kwargs={"learning_rate": settings["actor_lr"]},
        critic_optimizer_kwargs={"learning_rate": settings["critic_lr"]},
        temperature_optimizer_kwargs={"learning_rate": settings["temp_lr"]},
        discount=0.99, soft_target_update_rate=0.005, backup_entropy=False, target_entropy=0.0,
        max_target_backup=settings["max_target_backup"], n_actions=10)


def changed_start(settings: dict, agent):
    """The case's changes to the initial parameters (see the module docstring)."""
    import jax
    import jax.numpy as jnp

    params = jax.tree_util.tree_map(lambda leaf: leaf, agent.state.params)
    params = {name: dict(module) for name, module in params.items()}
    if settings.get("identical_critics"):
        critic = dict(params["modules_critic"])
        critic["network"] = jax.tree_util.tree_map(lambda leaf: jnp.broadcast_to(leaf[:1], leaf.shape),
                                                   critic["network"])  # the vmapped trunks
        params["modules_critic"] = critic
    if settings.get("ignore_actions"):  # the action rows of every trunk's first kernel
        critic = dict(params["modules_critic"])
        network = dict(critic["network"])
        first = dict(network["Dense_0"])
        first["kernel"] = first["kernel"].at[:, -batch_action_dim(settings):].set(0.0)
        network["Dense_0"] = first
        critic["network"] = network
        params["modules_critic"] = critic
    if settings.get("log_std_bias") is not None:
        actor = dict(params["modules_actor"])
        head = actor["Dense_1"]
        actor["Dense_1"] = {"kernel": jnp.zeros_like(head["kernel"]),
                            "bias": jnp.full_like(head["bias"], settings["log_std_bias"])}
        params["modules_actor"] = actor
    if settings.get("temperature_param") is not None:
        params["modules_temperature"] = {"lagrange": jnp.asarray(settings["temperature_param"], jnp.float32)}
    state = agent.state
    state = state.replace(params=params, target_params=params,
                          opt_states={name: state.txs[name].init(params) for name in state.txs})
    return agent.replace(state=state)


def batch_action_dim(settings: dict) -> int:
    return settings["action_dim"]


def outputs(agent, batch: dict) -> dict:
    """The networks on the batch through the agent's own forward functions (train=False)."""
    observations = batch["observations"]
    distribution = agent.forward_policy(observations, train=False)
    return {"q": agent.forward_critic(observations, batch["actions"], train=False),
            "actor_mean": distribution.distribution.loc, "actor_std": distribution.distribution.scale_diag,
            "temperature": agent.forward_temperature()}


def scalars(info: dict) -> dict:
    """The scalar metrics, flat: {network/name: value} (update_high_utd's info is per network)."""
    import numpy as np
    flat = flatten({name: value for name, value in info.items() if isinstance(value, dict)})
    flat.update({name: np.asarray(value) for name, value in info.items() if not isinstance(value, dict)})
    return {name: value for name, value in flat.items() if value.dtype != object and value.ndim == 0}


def run_case(settings: dict, batch: dict) -> dict:
    import jax
    import numpy as np

    agent = changed_start(settings, build(settings, batch))
    arrays = flatten({"init": {"params": agent.state.params, "target_params": agent.state.target_params}})
    arrays.update(flatten({"out": outputs(agent, batch)}))
    utd = settings["utd"]

    def step(agent):  # pre-training: finetune.py's offline `agent.update(batch)`
        if settings.get("pretraining"):
            return agent.update(batch, networks_to_update=set({"actor", "critic"}))
        return agent.update_high_utd(batch, utd_ratio=utd)

    updated, info = step(agent)
    arrays.update(flatten({"info": scalars(info),
                           "updated": {"params": updated.state.params, "target_params": updated.state.target_params}}))
    draws = []
    for index in range(settings.get("keys", 0)):
        keyed = agent.replace(state=agent.state.replace(rng=jax.random.PRNGKey(1000 + index)))
        draws.append(scalars(step(keyed)[1]))
    if draws:
        arrays.update({f"dist/{name}": np.stack([np.asarray(d[name]) for d in draws]) for name in draws[0]})
    return jax.device_get(arrays)


def main(argv=None) -> None:
    args = parse_args(argv)
    sys.path.insert(0, args.source)
    import jax
    import jax.numpy as jnp
    import numpy as np
    jax.tree_map = jax.tree_util.tree_map  # the shim of the module docstring

    batch = {name: jnp.asarray(value) for name, value in subtree(load(args.input), "batch").items()}
    batch = {name: batch[name] for name in ("observations", "actions", "rewards", "masks", "next_observations",
                                            "mc_returns")}
    arrays = {}
    for settings in json.loads(args.config):
        case = run_case(settings, batch)
        arrays.update({f"{settings['case']}/{name}": np.asarray(value) for name, value in case.items()})
    save(args.output, arrays)
    print(json.dumps({"written": len(arrays), "device": jax.devices()[0].device_kind}), flush=True)


if __name__ == "__main__":
    main()
