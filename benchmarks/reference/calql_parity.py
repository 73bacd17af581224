"""One update of nakamotoo/Cal-QL's `ConservativeSAC` (JaxCQL: CQL, and Cal-QL with
`enable_calql`), with every input and output written to a file, for benchmarks/parity.py.

Run by parity.py with the Python of the Cal-QL virtual environment; it imports nothing of this
project but `parity_io.py` beside it. It reads the batch from `--input` and, for each case of
`--config` (a JSON list of objects, each named by `case`), builds the agent as
`JaxCQL/conservative_sac_main.py` does (`TanhGaussianPolicy` and `FullyConnectedQFunction` with
orthogonal_init, `ConservativeSAC` with its default config updated by the case's `cql` object,
target entropy -|A|), calls the jitted `_train_step` once, and writes:

  CASE/init/{policy,qf1,qf2,target_qf1,target_qf2,log_alpha,log_alpha_prime}/...
  CASE/out/{q1,q2,actor_mode,data_log_prob,temperature,alpha_prime}   before the update
  CASE/info/...                           the update's metrics (their names, `cql/...` included)
  CASE/updated/{...}/...                  the parameters after it
  CASE/dist/...                           the metrics of `keys` further calls, one random key each

A case may change the initial parameters, nothing else: `log_std_clip` (log-std multiplier 0 and
offset -30: below the clip at -20, every sample is tanh(mean) up to e^-20), `log_alpha` (the
temperature's parameter), `ignore_actions` (the action rows of both critics' first kernel set to
0, so that Q(s, a) = Q(s) for every action, random ones included), `critic_head_scale` (both
critics' output kernels, and their targets', multiplied by it: Q-values that differ by more than
the 1e-2 output gain lets them at initialisation, so that which sampled action is backed up
matters).

Shim: `jnp.clip(x, a_min=..., a_max=...)` (the Lagrange multiplier's clip in `_train_step`) lost
its `a_min` / `a_max` keywords in later JAX releases; `compatible_clip` passes them on as the
`min` / `max` they were renamed to. Nothing else of the official code is changed.
"""

from __future__ import annotations

import argparse
import json
import sys

from parity_io import flatten, load, save, subtree


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", required=True, help="checkout of nakamotoo/Cal-QL")
    parser.add_argument("--input", required=True, help=".npz holding batch/<key> arrays")
    parser.add_argument("--output", required=True, help=".npz to write")
    parser.add_argument("--config", required=True, help="JSON list of cases")
    return parser.parse_args(argv)


def compatible_clip() -> None:
    """jnp.clip accepting the old keyword names a_min / a_max (see the module docstring)."""
    import jax.numpy as jnp
    clip = jnp.clip

    def clip_with_old_names(x, min=None, max=None, *, a_min=None, a_max=None):  # noqa: A002 (jnp's names)
        return clip(x, a_min if min is None else min, a_max if max is None else max)

    jnp.clip = clip_with_old_names


def build(settings: dict, observation_dim: int, action_dim: int):
    """The agent, as conservative_sac_main.py builds it."""
    from JaxCQL.conservative_sac import ConservativeSAC
    from JaxCQL.jax_utils import init_rng
    from JaxCQL.model import FullyConnectedQFunction, TanhGaussianPolicy

    init_rng(settings.get("seed", 0))
    policy = TanhGaussianPolicy(observation_dim, action_dim, settings["policy_arch"], True, 1.0, -1.0)
    qf = FullyConnectedQFunction(observation_dim, action_dim, settings["qf_arch"], True)
    config = ConservativeSAC.get_default_config(settings["cql"])
    if config.target_entropy >= 0.0:  # conservative_sac_main.py's rule
        config.target_entropy = -float(action_dim)
    return ConservativeSAC(config, policy, qf)


def changed_start(settings: dict, train_states: dict, target_qf_params: dict, action_dim: int):
    """The case's changes to the initial parameters (see the module docstring)."""
    import jax.numpy as jnp

    def set_params(name, params):
        train_states[name] = train_states[name].replace(params=params,
                                                        opt_state=train_states[name].tx.init(params))

    if settings.get("log_std_clip"):
        inner = dict(train_states["policy"].params["params"])
        inner["log_std_multiplier_module"] = {"value": jnp.asarray(0.0, jnp.float32)}
        inner["log_std_offset_module"] = {"value": jnp.asarray(-30.0, jnp.float32)}
        set_params("policy", {"params": inner})
    if settings.get("log_alpha") is not None:
        set_params("log_alpha", {"params": {"value": jnp.asarray(settings["log_alpha"], jnp.float32)}})
    if settings.get("critic_head_scale") is not None:
        def scale_head(params):
            inner = dict(params["params"])
            network = dict(inner["FullyConnectedNetwork_0"])
            last = f"Dense_{len(network) - 1}"
            network[last] = {**network[last], "kernel": network[last]["kernel"] * settings["critic_head_scale"]}
            inner["FullyConnectedNetwork_0"] = network
            return {"params": inner}
        for name in ("qf1", "qf2"):
            set_params(name, scale_head(train_states[name].params))
            target_qf_params[name] = scale_head(target_qf_params[name])
    if settings.get("ignore_actions"):
        def zero_action_rows(params):
            inner = dict(params["params"])
            network = dict(inner["FullyConnectedNetwork_0"])
            first = dict(network["Dense_0"])
            first["kernel"] = first["kernel"].at[-action_dim:].set(0.0)
            network["Dense_0"] = first
            inner["FullyConnectedNetwork_0"] = network
            return {"params": inner}
        for name in ("qf1", "qf2"):
            set_params(name, zero_action_rows(train_states[name].params))
            target_qf_params[name] = zero_action_rows(target_qf_params[name])
    return train_states, target_qf_params


def all_params(train_states: dict, target_qf_params: dict) -> dict:
    params = {name: state.params for name, state in train_states.items()}
    return {**params, "target_qf1": target_qf_params["qf1"], "target_qf2": target_qf_params["qf2"]}


def outputs(sac, train_states: dict, batch: dict) -> dict:
    """The networks on the batch through their own modules: Q of both critics, the policy's
    deterministic action (tanh of the mean) and the log-probability of the data actions."""
    import jax
    import jax.numpy as jnp

    observations, actions = batch["observations"], batch["actions"]
    policy_params = train_states["policy"].params
    mode, _ = sac.policy.apply(policy_params, observations, deterministic=True)
    arrays = {"q1": sac.qf.apply(train_states["qf1"].params, observations, actions),
              "q2": sac.qf.apply(train_states["qf2"].params, observations, actions),
              "actor_mode": mode,
              "data_log_prob": sac.policy.apply(policy_params, observations, actions, method=sac.policy.log_prob),
              "temperature": jnp.exp(sac.log_alpha.apply(train_states["log_alpha"].params))
              * sac.config.alpha_multiplier}
    if "log_alpha_prime" in train_states:
        arrays["alpha_prime"] = jnp.exp(sac.log_alpha_prime.apply(train_states["log_alpha_prime"].params))
    return jax.device_get(arrays)


def run_case(settings: dict, batch: dict) -> dict:
    import jax
    import numpy as np

    observation_dim, action_dim = batch["observations"].shape[-1], batch["actions"].shape[-1]
    sac = build(settings, observation_dim, action_dim)
    train_states, target_qf_params = changed_start(settings, dict(sac._train_states),
                                                   dict(sac._target_qf_params), action_dim)
    arrays = flatten({"init": all_params(train_states, target_qf_params)})
    arrays.update(flatten({"out": outputs(sac, train_states, batch)}))

    def step(key):
        return sac._train_step(train_states, target_qf_params, key, batch, settings["use_cql"],
                               settings["cql_min_q_weight"], settings["enable_calql"])

    new_states, new_targets, metrics = step(jax.random.PRNGKey(settings.get("seed", 0)))
    arrays.update(flatten({"info": metrics, "updated": all_params(new_states, new_targets)}))
    draws = [step(jax.random.PRNGKey(1000 + index))[2] for index in range(settings.get("keys", 0))]
    if draws:
        arrays.update({f"dist/{name}": np.stack([np.asarray(d[name]) for d in draws]) for name in draws[0]})
    arrays["config"] = json.dumps(sac.config.to_dict())
    return arrays


def main(argv=None) -> None:
    args = parse_args(argv)
    sys.path.insert(0, args.source)
    compatible_clip()
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
