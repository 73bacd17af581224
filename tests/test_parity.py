"""benchmarks/parity.py without the reference code: its mapping and comparison logic, run against a
stand-in "official" agent. The stand-in is our own rlpd.py, its parameters written in the official
layout (ikostrikov/rlpd's module names) and its outputs keyed as benchmarks/reference/rlpd_parity.py
keys them; with one deliberate change it must be reported as a difference, and unchanged it must pass."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from algorithms import rlpd
from benchmarks import parity
from benchmarks.reference.parity_io import flatten, unflatten

THEIR_NAMES = {network: {ours: theirs for theirs, ours in renames.items()}
               for network, renames in parity.RLPD_RENAMES.items()}
ARGS = parity.ParityArgs(keys=64, hidden=8, batch_size=32, observation_dim=5, action_dim=2)


def case(name: str) -> dict:
    return next(case for case in parity.rlpd_cases(ARGS) if case["case"] == name)


def batch() -> dict:
    return parity.make_batch(ARGS.seed, 2 * ARGS.batch_size, ARGS.observation_dim, ARGS.action_dim)


def standin(cases: list[dict], rows: dict) -> dict:
    """What the reference driver would write, made by OUR code: initial parameters as the driver
    sets them (log-std head and temperature), then our outputs, update and draws, renamed to
    their module names and prefixed by the case."""
    arrays = {}
    for settings in cases:
        args = parity.rlpd_our_args(settings)
        agent = rlpd.create_agent(args, rlpd.make_config(args, ARGS.action_dim), ARGS.observation_dim,
                                  ARGS.action_dim)
        params = parity.rlpd_our_params(agent)
        if settings.get("log_std_bias") is not None:
            head = params["actor"]["Dense_1"]
            params["actor"] = {**params["actor"], "Dense_1": {"kernel": jnp.zeros_like(head["kernel"]),
                                                              "bias": jnp.full_like(head["bias"], settings["log_std_bias"])}}
        if settings.get("log_temp") is not None:
            params["temp"] = {"log_temp": jnp.asarray(settings["log_temp"], jnp.float32)}
        ours = {**flatten({"init": params}), **parity.rlpd_our_side(settings, rows, params)}
        for path, value in ours.items():
            parts = path.split("/")
            if len(parts) > 2 and parts[1] in THEIR_NAMES:  # init/NETWORK/... and updated/NETWORK/...
                path = "/".join(parts[:2]) + "/" + next(iter(parity.rename({"/".join(parts[2:]): 0},
                                                                           THEIR_NAMES[parts[1]])))
            arrays[f"{settings['case']}/{path}"] = value
    return arrays


def failed(checks) -> set[tuple[str, str]]:
    """The checks that fail: not passed and not a named deviation."""
    return {(check.case, check.quantity) for check in checks if check.status == "fail"}


def named(checks) -> set[tuple[str, str]]:
    return {(check.case, check.quantity) for check in checks if check.status == "named deviation"}


@pytest.fixture(scope="module")
def unchanged():
    """The stand-in without a change, on the G=2 deterministic case and the random case."""
    cases = [case("deterministic-g2"), case("random-z1")]
    return cases, standin(cases, batch())


def test_unchanged_standin_passes_every_check(unchanged):
    cases, theirs = unchanged
    checks = parity.compare_rlpd(cases, batch(), theirs, parity.DEFAULT_Z)
    assert not failed(checks)
    kinds = {check.kind for check in checks}
    assert kinds == {"mapping", "exact", "distribution"}
    quantities = {check.quantity for check in checks}
    assert {"q before the update", "actor_std before the update", "critic parameters after the update",
            "critic_loss (mean over keys)", "actor_loss"} <= quantities


def test_min_instead_of_mean_in_the_actor_loss_is_reported(monkeypatch):
    """The stand-in's actor maximises the MIN over the critics (ours: the mean, as theirs)."""
    def min_actor_loss(actor_params, key, batch, critic_params, temperature, config):
        mean, log_std = config.actor.apply({"params": actor_params}, batch["observations"])
        actions, log_probs = rlpd.sample_tanh_normal(key, mean, log_std)
        q = config.critic.apply({"params": critic_params}, batch["observations"], actions).min(0)
        return (temperature * log_probs - q).mean(), -log_probs.mean()

    cases = [case("deterministic-g1")]
    rows = batch()
    with monkeypatch.context() as patch:
        patch.setattr(rlpd, "actor_loss", min_actor_loss)
        theirs = standin(cases, rows)
    checks = parity.compare_rlpd(cases, rows, theirs, parity.DEFAULT_Z)
    bad = failed(checks)
    assert ("deterministic-g1", "actor_loss") in bad
    assert ("deterministic-g1", "actor parameters after the update") in bad
    # the critic step does not read the actor loss: it still matches
    assert ("deterministic-g1", "critic parameters after the update") not in bad
    assert ("deterministic-g1", "critic_loss") not in bad


def test_entropy_backup_with_the_wrong_sign_is_reported_in_distribution(monkeypatch):
    """The stand-in ADDS gamma * alpha * log pi in the TD target (the paper's Algorithm 1 typo):
    random actions, so only the comparison over keys can see it."""
    original = rlpd.td_target

    def plus_entropy(key, batch, actor_params, target_params, temperature, config):
        target = original(key, batch, actor_params, target_params, temperature,
                          dataclasses.replace(config, backup_entropy=False))
        mean, log_std = config.actor.apply({"params": actor_params}, batch["next_observations"])
        action_key = jax.random.split(key)[0]  # the key td_target samples the next actions with
        _, log_probs = rlpd.sample_tanh_normal(action_key, mean, log_std)
        return target + config.discount * batch["masks"] * temperature * log_probs

    cases = [case("random-z1")]
    rows = batch()
    with monkeypatch.context() as patch:
        patch.setattr(rlpd, "td_target", plus_entropy)
        theirs = standin(cases, rows)
    bad = failed(parity.compare_rlpd(cases, rows, theirs, parity.DEFAULT_Z))
    assert ("random-z1", "critic_loss (mean over keys)") in bad
    assert ("random-z1", "actor_loss (mean over keys)") not in bad


def test_a_shared_critic_head_is_a_mapping_difference(unchanged):
    """A stand-in whose critics share one output head (no ensemble axis on the head's leaves):
    the trees cannot be mapped one to one, and the check names the leaves."""
    cases, theirs = unchanged
    theirs = dict(theirs)
    prefix = "deterministic-g2/init/critic/VmapStateActionValue_0/Dense_0/"
    for leaf in ("kernel", "bias"):
        theirs[prefix + leaf] = theirs[prefix + leaf][0]
    checks = parity.compare_rlpd(cases[:1], batch(), theirs, parity.DEFAULT_Z)
    assert [(check.kind, check.passed) for check in checks] == [("mapping", False)]
    assert "critic/VmapCritic_0/Dense_0/kernel theirs (8, 1) ours (10, 8, 1)" in checks[0].note


@pytest.mark.parametrize("gap, passed", [(0.0, True), (1e-3, False)])
def test_compare_arrays_tolerance(gap, passed):
    theirs = np.array([1.0, -2.0, 3.0], np.float32)
    check = parity.compare_arrays("x", "c", "q", theirs, theirs + np.array([0.0, gap, 0.0]), (1e-5, 1e-5))
    assert check.passed is passed
    assert check.max_abs == pytest.approx(gap, abs=1e-9)


def test_compare_distribution_uses_standard_errors():
    rng = np.random.default_rng(0)
    theirs, ours = rng.normal(0.0, 1.0, 400), rng.normal(0.0, 1.0, 400)
    assert parity.compare_distribution("x", "c", "m", theirs, ours, 4.0).passed
    assert not parity.compare_distribution("x", "c", "m", theirs, ours + 0.5, 4.0).passed  # 0.5 = 7 SE


def test_rename_and_unflatten_round_trip():
    tree = {"actor": {"OutputDenseMean": {"kernel": np.ones((2, 3))}, "MLP_0": {"Dense_0": {"bias": np.zeros(3)}}}}
    renamed = parity.rename(flatten(tree), parity.RLPD_RENAMES["actor"])
    assert set(renamed) == {"actor/Dense_0/kernel", "actor/MLP_0/Dense_0/bias"}
    assert unflatten(renamed)["actor"]["Dense_0"]["kernel"].shape == (2, 3)


def test_dry_run_prints_setup_and_driver_command(capsys, tmp_path):
    assert parity.main(dataclasses.replace(ARGS, dry_run=True, cache_dir=str(tmp_path))) == 0
    out = capsys.readouterr().out
    assert "git clone" in out and parity.PAIRS["rlpd"].reference.commit in out
    assert "rlpd_parity.py" in out and '"case": "deterministic-g2"' in out


def dense(prefix: str, sizes: list[int], start: float) -> dict:
    """Flat Dense_i/{kernel, bias} leaves of an MLP with layer widths `sizes` (input first), each
    leaf filled with its own constant so that a leaf that lands in the wrong place shows."""
    leaves = {}
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        leaves[f"{prefix}/Dense_{i}/kernel"] = np.full((fan_in, fan_out), start + i, np.float32)
        leaves[f"{prefix}/Dense_{i}/bias"] = np.full((fan_out,), start + i + 0.5, np.float32)
    return leaves


def test_jaxcql_mapping_places_every_leaf():
    """Cal-QL's layout (policy base_network with the mean/log-std head as its last Dense, qf1 and
    qf2 as two networks) maps leaf for leaf onto our actor and stacked critic ensemble."""
    from algorithms import cql
    case = parity.jaxcql_cases(ARGS, calibrated=False)[0]
    obs, act, hidden = ARGS.observation_dim, ARGS.action_dim, ARGS.hidden
    theirs = {**dense("policy/params/base_network", [obs, hidden, hidden, 2 * act], 10.0),
              "policy/params/log_std_multiplier_module/value": np.float32(1.0),
              "policy/params/log_std_offset_module/value": np.float32(-1.0),
              "log_alpha/params/value": np.float32(0.0), "log_alpha_prime/params/value": np.float32(1.0)}
    for network, start in (("qf1", 20.0), ("qf2", 30.0), ("target_qf1", 40.0), ("target_qf2", 50.0)):
        theirs.update(dense(f"{network}/params/FullyConnectedNetwork_0", [obs + act, hidden, hidden, 1], start))
    mapped = parity.jaxcql_mapping(theirs)
    fresh = parity.subtree(parity.jaxcql_our_side(cql, case, batch(), None), "init")
    assert parity.mapping_check("cql", "c", "m", mapped, fresh).passed
    assert np.all(mapped["actor/Dense_0/kernel"] == 12.0)  # their last base_network layer is our head
    assert np.all(mapped["actor/MLP_0/Dense_1/bias"] == 11.5)
    head = mapped["critic/VmapCritic_0/Dense_0/kernel"]
    assert head.shape == (2, hidden, 1) and head[0, 0, 0] == 22.0 and head[1, 0, 0] == 32.0  # qf1, then qf2
    assert mapped["target_critic/VmapCritic_0/MLP_0/Dense_0/bias"][1, 0] == 50.5
    assert mapped["temperature/log_value"] == 0.0 and mapped["alpha_prime/log_value"] == 1.0

    deeper = {**theirs, **dense("qf1/params/FullyConnectedNetwork_0", [obs + act, hidden, hidden, hidden, 1], 20.0)}
    check = parity.mapping_check("cql", "c", "m", parity.jaxcql_mapping(deeper), fresh)
    assert not check.passed and "critic/VmapCritic_0/MLP_0/Dense_2/kernel" in check.note


def test_iql_mapping_places_every_leaf():
    """implicit_q_learning's layout (DoubleCritic's Critic_0 and Critic_1 and the value net, each an
    MLP with its output layer inside) maps onto our vmapped twin critic and value head."""
    obs, act, hidden = ARGS.observation_dim, ARGS.action_dim, ARGS.hidden
    theirs = {**dense("actor/MLP_0", [obs, hidden, hidden], 1.0), **dense("actor", [hidden, act], 3.0),
              "actor/log_stds": np.zeros(act, np.float32), **dense("value/MLP_0", [obs, hidden, hidden, 1], 5.0)}
    for network, start in (("critic", 10.0), ("target_critic", 20.0)):
        for member in (0, 1):
            theirs.update(dense(f"{network}/Critic_{member}/MLP_0", [obs + act, hidden, hidden, 1],
                                start + 5 * member))
    mapped = parity.iql_mapping(theirs)
    fresh = parity.subtree(parity.iql_our_side(parity.iql_cases(ARGS)[0], batch(), None), "init")
    assert parity.mapping_check("iql", "c", "m", mapped, fresh).passed
    assert np.all(mapped["value/Dense_0/kernel"] == 7.0) and np.all(mapped["value/MLP_0/Dense_1/kernel"] == 6.0)
    head = mapped["critic/VmapCritic_0/Dense_0/kernel"]
    assert head[0, 0, 0] == 12.0 and head[1, 0, 0] == 17.0  # Critic_0, then Critic_1
    assert mapped["actor/Dense_0/kernel"][0, 0] == 3.0


def test_rlpd_mapping_places_every_leaf():
    """rlpd's layout (Normal's OutputDenseMean / OutputDenseLogStd heads; the critic ensemble as
    nn.vmap of StateActionValue, LayerNorm after each hidden Dense) renames onto ours."""
    settings = case("deterministic-g1")
    obs, act, hidden, members = ARGS.observation_dim, ARGS.action_dim, ARGS.hidden, settings["num_qs"]
    widths = [hidden] * len(settings["hidden_dims"])
    actor = {**dense("MLP_0", [obs, *widths], 1.0), **dense("OutputDenseMean", [hidden, act], 5.0),
             **dense("OutputDenseLogStd", [hidden, act], 6.0)}
    actor = {path.replace("OutputDenseMean/Dense_0", "OutputDenseMean").replace("OutputDenseLogStd/Dense_0",
                                                                                 "OutputDenseLogStd"): value
             for path, value in actor.items()}
    critic = {**dense("VmapStateActionValue_0/MLP_0", [obs + act, *widths], 10.0),
              **dense("VmapStateActionValue_0", [hidden, 1], 20.0)}
    critic.update({f"VmapStateActionValue_0/MLP_0/LayerNorm_{i}/{leaf}": np.ones(hidden, np.float32)
                   for i in range(len(widths)) for leaf in ("scale", "bias")})
    critic = {path: np.broadcast_to(value, (members, *value.shape)) for path, value in critic.items()}
    theirs = {"actor": actor, "critic": critic, "target_critic": critic, "temp": {"log_temp": np.float32(0.0)}}
    mapped = {f"{network}/{path}": value for network, tree in theirs.items()
              for path, value in parity.rename(tree, parity.RLPD_RENAMES[network]).items()}
    fresh = parity.rlpd_fresh_params(settings, obs, act)
    assert parity.mapping_check("rlpd", "c", "m", mapped, fresh).passed
    assert mapped["actor/Dense_0/kernel"][0, 0] == 5.0 and mapped["actor/Dense_1/bias"][0] == 6.5  # mean, log-std


def test_wsrl_mapping_places_every_leaf_and_reports_per_member_heads():
    """zhouzypaul/wsrl's ModuleDict layout (the critic's vmapped trunks under `network`, ONE shared
    head Dense_0) maps onto wsrl.py's critic; critics with a head each (a leading axis of 10 on
    the head) are a mapping difference that names the head."""
    settings = parity.wsrl_cases(ARGS)[0]
    obs, act, hidden, members = ARGS.observation_dim, ARGS.action_dim, ARGS.hidden, 10
    norms = {f"LayerNorm_{i}/{leaf}": np.ones(hidden, np.float32) for i in range(2) for leaf in ("scale", "bias")}
    actor = {**dense("network", [obs, hidden, hidden], 1.0), **{f"network/{k}": v for k, v in norms.items()},
             **dense("", [hidden, act], 3.0), **dense("x", [hidden, act], 4.0)}
    actor = {path.lstrip("/").replace("x/Dense_0", "Dense_1"): value for path, value in actor.items()}
    trunks = {**dense("network", [obs + act, hidden, hidden], 10.0), **{f"network/{k}": v for k, v in norms.items()}}
    trunks = {path: np.broadcast_to(value, (members, *value.shape)) for path, value in trunks.items()}
    critic = {**trunks, **dense("", [hidden, 1], 20.0)}
    critic = {path.lstrip("/"): value for path, value in critic.items()}
    params = {"modules_actor": actor, "modules_critic": critic, "modules_temperature": {"lagrange": np.float32(0.5)}}
    theirs = {f"{tree}/{module}/{path}": value for tree in ("params", "target_params")
              for module, leaves in params.items() for path, value in leaves.items()}
    mapped = parity.wsrl_mapping(theirs)
    fresh = parity.subtree(parity.wsrl_our_side(settings, batch(), None), "init")
    assert parity.mapping_check("wsrl", "c", "m", mapped, fresh).passed
    assert mapped["critic/head/kernel"][0, 0] == 20.0 and mapped["actor/Dense_1/kernel"][0, 0] == 4.0
    assert mapped["target_critic/trunks/Dense_1/kernel"].shape == (members, hidden, hidden)
    assert mapped["temperature/x"] == 0.5

    per_member = dict(theirs)
    for path in ("params/modules_critic/Dense_0/kernel", "params/modules_critic/Dense_0/bias"):
        per_member[path] = np.broadcast_to(theirs[path], (members, *theirs[path].shape))
    check = parity.mapping_check("wsrl", "c", "m", parity.wsrl_mapping(per_member), fresh)
    assert not check.passed and f"critic/head/kernel theirs ({members}, {hidden}, 1) ours ({hidden}, 1)" in check.note


def test_bad_flags_end_in_one_error_before_any_set_up(tmp_path):
    import subprocess
    import sys
    completed = subprocess.run([sys.executable, "benchmarks/parity.py", "--keys", "1", "--cache-dir", str(tmp_path)],
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode == 2
    assert completed.stderr.strip().splitlines()[-1] == "error: --keys must be at least 2 (a standard error needs two draws), got 1."
    assert not any(tmp_path.iterdir())  # nothing cloned or installed
    with pytest.raises(parity.UserError, match="--hidden must be at least 1"):
        parity.main(dataclasses.replace(ARGS, hidden=0, cache_dir=str(tmp_path)))


# ---------------------------------------------------------------------------------------------
# Off2On: a stand-in for shlee94/Off2OnRL's OursTrainer, made by our off2on.py and written in the
# layout and the names of benchmarks/reference/off2on_parity.py (rlkit state_dicts, torch weights
# (out, in), qf1 / qf2 as two ParallelMlp ensembles)

OFF2ON_ARGS = dataclasses.replace(ARGS, keys=8)
OFF2ON_INFO = {"critic_loss": "qf1_loss", "actor_loss": "policy_loss", "density_loss": "weight_loss",
               "temperature": "alpha", "temperature_loss": "alpha_loss", "td_target": "q_target",
               "priorities": "priorities"}


def off2on_batches() -> dict:
    return parity.off2on_batches(parity.make_batch(OFF2ON_ARGS.seed, parity.OFF2ON_ROWS * OFF2ON_ARGS.batch_size,
                                                   OFF2ON_ARGS.observation_dim, OFF2ON_ARGS.action_dim))


def off2on_their_layout(ours: dict) -> dict:
    """Our flat parameters (actor/..., critic/..., ...) as the driver writes theirs; our
    log_std_multiplier and log_std_offset have no place there and are dropped."""
    theirs = {}
    hidden = sorted({path.split("/")[2] for path in ours if path.startswith("actor/MLP_0/")})
    for j, layer in enumerate(hidden):
        for i, (kernel, bias) in enumerate(zip(ours[f"actor/MLP_0/{layer}/kernel"], ours[f"actor/MLP_0/{layer}/bias"])):
            theirs[f"policy/policies/{i}/fc{j}/weight"], theirs[f"policy/policies/{i}/fc{j}/bias"] = kernel.T, bias
    actions = ours["actor/Dense_0/bias"].shape[-1] // 2
    for i, (kernel, bias) in enumerate(zip(ours["actor/Dense_0/kernel"], ours["actor/Dense_0/bias"])):
        theirs[f"policy/policies/{i}/last_fc/weight"], theirs[f"policy/policies/{i}/last_fc/bias"] = \
            kernel[:, :actions].T, bias[:actions]
        theirs[f"policy/policies/{i}/last_fc_log_std/weight"], theirs[f"policy/policies/{i}/last_fc_log_std/bias"] = \
            kernel[:, actions:].T, bias[actions:]
    for network, (first, second) in (("critic", ("qf1", "qf2")), ("target_critic", ("target_qf1", "target_qf2"))):
        layers = sorted({path.split("/")[3] for path in ours if path.startswith(f"{network}/VmapCritic_0/MLP_0/")})
        named = [(f"VmapCritic_0/MLP_0/{layer}", f"h{j + 1}") for j, layer in enumerate(layers)]
        for our_layer, their_layer in [*named, ("VmapCritic_0/Dense_0", "output")]:
            for twin, name in enumerate((first, second)):
                theirs[f"{name}/{their_layer}/weights"] = ours[f"{network}/{our_layer}/kernel"][:, twin]
                theirs[f"{name}/{their_layer}/biases"] = ours[f"{network}/{our_layer}/bias"][:, twin, None]
    density = sorted(path.split("/")[1] for path in ours if path.startswith("density/") and path.endswith("/kernel"))
    for j, layer in enumerate(density):
        name = "last_fc" if j == len(density) - 1 else f"fc{j}"
        theirs[f"weight_net/{name}/weight"] = ours[f"density/{layer}/kernel"].T
        theirs[f"weight_net/{name}/bias"] = ours[f"density/{layer}/bias"]
    theirs["log_alpha"] = ours["temperature/log_value"]
    return theirs


def off2on_standin(cases: list[dict], batches: dict) -> dict:
    """What the driver would write, made by our code from a fresh agent with the driver's
    overrides (mean / log-std heads, the density's last bias, the temperature) and our extra
    leaves at 1 and 0, so that the stand-in is expressible in their layout."""
    arrays = {}
    for settings in cases:
        flat = {**parity.subtree(parity.off2on_our_side(settings, batches, None), "init"),
                **{path: np.full(parity.OFF2ON_MEMBERS, value, np.float32)
                   for path, value in parity.OFF2ON_EXTRA_LEAVES.items()}}
        kernel, bias = flat["actor/Dense_0/kernel"].copy(), flat["actor/Dense_0/bias"].copy()
        actions = bias.shape[-1] // 2
        if "mean_bias" in settings["policy"]:
            kernel[..., :actions], bias[..., :actions] = 0.0, settings["policy"]["mean_bias"]
        if "log_std_bias" in settings["policy"]:
            kernel[..., actions:], bias[..., actions:] = 0.0, settings["policy"]["log_std_bias"]
        last = sorted(path for path in flat if path.startswith("density/") and path.endswith("/bias"))[-1]
        flat.update({"actor/Dense_0/kernel": kernel, "actor/Dense_0/bias": bias,
                     last: np.full_like(flat[last], settings["density"].get("last_bias", 1.0)),
                     "temperature/log_value": np.float32(np.log(settings["init_alpha"]))})
        ours = parity.off2on_our_side(settings, batches, unflatten(flat))
        theirs = {**{f"init/{path}": value for path, value in off2on_their_layout(flat).items()},
                  **{f"updated/{path}": value for path, value in
                     off2on_their_layout(parity.subtree(ours, "updated")).items()},
                  **{path: value for path, value in ours.items() if path.startswith("out/")}}
        for prefix in ("info", "dist"):
            part = parity.subtree(ours, prefix)
            if prefix == "dist":  # rlkit's policy has no log-std multiplier and offset: as ours with them reset
                part = {name: part.get(f"{name}_scalars_reset", value) for name, value in part.items()
                        if not name.endswith("_scalars_reset")}
            theirs.update({f"{prefix}/{OFF2ON_INFO.get(name, name)}": value for name, value in part.items()})
            theirs[f"{prefix}/qf2_loss"] = np.zeros_like(part["critic_loss"])
            theirs[f"{prefix}/log_pi"] = -part["entropy"]
        arrays.update({f"{settings['case']}/{path}": value for path, value in theirs.items()})
    return arrays


@pytest.fixture(scope="module")
def off2on_unchanged():
    cases = parity.off2on_cases(OFF2ON_ARGS)
    return cases, off2on_standin(cases, off2on_batches())


def off2on_batch() -> dict:
    return parity.make_batch(OFF2ON_ARGS.seed, parity.OFF2ON_ROWS * OFF2ON_ARGS.batch_size,
                             OFF2ON_ARGS.observation_dim, OFF2ON_ARGS.action_dim)


RESET = "our log-std multiplier and offset reset to 1 and 0 after the step (mean over keys)"


def test_off2on_unchanged_standin_fails_nothing_and_reports_the_named_deviation(off2on_unchanged):
    """Unchanged (a stand-in whose policy, like rlkit's, has no log-std multiplier and offset),
    no check fails: the strict mapping check, which names our two actor leaves that rlkit's
    policy lacks, is the named deviation, and so is the raw updated log-std where it differs;
    the same summaries with our two scalars reset after the step pass. The exit code is 0."""
    cases, theirs = off2on_unchanged
    checks = parity.compare_off2on(cases, off2on_batch(), theirs, parity.DEFAULT_Z)
    assert failed(checks) == set()
    assert {("deterministic", "parameter mapping"), ("random", "parameter mapping")} <= named(checks) <= {
        ("deterministic", "parameter mapping"), ("random", "parameter mapping"),
        *((case, f"{metric} (mean over keys)") for case in ("deterministic", "random")
          for metric in parity.OFF2ON_LOG_STD_SUMMARIES)}
    strict = next(check for check in checks if check.quantity == "parameter mapping")
    assert not strict.passed and strict.deviation == parity.OFF2ON_LOG_STD_DEVIATION.text
    assert "only ours: actor/log_std_multiplier, actor/log_std_offset" in strict.note
    assert "algorithms/off2on.py" in strict.deviation and "docs/algorithms/off2on.md" in strict.deviation
    for metric in parity.OFF2ON_LOG_STD_SUMMARIES:
        reset = next(check for check in checks if check.case == "random" and check.quantity == f"{metric}, {RESET}")
        assert reset.passed and reset.max_abs == 0.0  # the stand-in's "theirs" is ours reset
    assert parity.exit_code(checks) == 0
    assert all(check.deviation is None for check in checks if check.status != "named deviation")
    table = parity.summary_table(checks)
    assert "| off2on | mapping | 4 | 2 | 2 |" in table and "Named deviations" in table
    assert dataclasses.asdict(strict)["deviation"] == parity.OFF2ON_LOG_STD_DEVIATION.text
    quantities = {check.quantity for check in checks}
    assert {"q1 before the update", "policy_std before the update", "w_online before the update", "td_target",
            "priorities", "density_loss", "critic parameters after the update", "density parameters after the update",
            "entropy (mean over keys)", "updated_member_log_std (mean over keys)"} <= quantities
    assert {check.kind for check in checks} == {"mapping", "exact", "distribution"}


def test_off2on_another_unmapped_leaf_fails_the_mapping_check(off2on_unchanged):
    """Only the multiplier and offset are the named deviation: one more leaf ours has and theirs
    lacks (here the temperature, log_alpha left out of their arrays) fails the
    strict mapping check, unnamed, and the exit code is 1."""
    cases, theirs = off2on_unchanged
    theirs = {path: value for path, value in theirs.items() if path != "random/init/log_alpha"}
    checks = parity.compare_off2on(cases[1:], off2on_batch(), theirs, parity.DEFAULT_Z)
    strict = next(check for check in checks if check.quantity == "parameter mapping")
    assert strict.status == "fail" and strict.deviation is None
    assert "only ours: actor/log_std_multiplier, actor/log_std_offset, temperature/log_value" in strict.note
    assert parity.exit_code(checks) == 1


def test_off2on_another_log_std_difference_fails_with_the_scalars_reset(off2on_unchanged):
    """A difference in the updated log-std that the two scalars do not explain (here their
    summaries shifted by 0.01) is not covered: the raw check is the named deviation, its twin with
    the scalars reset fails, and the exit code is 1."""
    cases, theirs = off2on_unchanged
    theirs = {path: value + 0.01 if path in ("random/dist/updated_member_log_std", "random/dist/updated_policy_std")
              else value for path, value in theirs.items()}
    checks = parity.compare_off2on(cases[1:], off2on_batch(), theirs, parity.DEFAULT_Z)
    assert failed(checks) == {("random", f"{metric}, {RESET}") for metric in parity.OFF2ON_LOG_STD_SUMMARIES}
    assert {("random", f"{metric} (mean over keys)") for metric in parity.OFF2ON_LOG_STD_SUMMARIES} <= named(checks)
    assert parity.exit_code(checks) == 1


def test_a_deviation_no_longer_named_by_the_algorithm_file_fails(monkeypatch):
    """NamedDeviation marks a failed check only while its files still contain their phrases;
    a passing check is left alone."""
    check = lambda passed: parity.Check("off2on", "c", "m", "exact", 1.0, 1.0, "-", passed)  # noqa: E731
    assert parity.OFF2ON_LOG_STD_DEVIATION.unnamed() == []
    assert parity.OFF2ON_LOG_STD_DEVIATION.mark(check(False)).status == "named deviation"
    assert parity.OFF2ON_LOG_STD_DEVIATION.mark(check(True)).status == "pass"
    gone = parity.NamedDeviation("x", (("algorithms/off2on.py", "a phrase the file does not contain"),))
    marked = gone.mark(check(False))
    assert marked.status == "fail" and "algorithms/off2on.py no longer names it" in marked.note
    assert parity.exit_code([marked]) == 1 and parity.exit_code([check(True)]) == 0


def test_off2on_min_over_members_in_the_actor_loss_is_reported(monkeypatch):
    """The stand-in's actor maximises the MIN over the members' twin minima (off2on.py and the
    official code: the mean)."""
    from algorithms import off2on

    def min_members(actor_params, key, batch, critic_params, temperature, config):
        actions, log_probs = off2on.policy_sample(key, actor_params, batch["observations"], config)
        q = off2on.member_q(critic_params, batch["observations"], actions, config).min(1).min(0)
        return (temperature * log_probs - q).mean(), -log_probs.mean()

    cases = parity.off2on_cases(OFF2ON_ARGS)[:1]
    batches = off2on_batches()
    with monkeypatch.context() as patch:
        patch.setattr(off2on, "actor_loss", min_members)
        theirs = off2on_standin(cases, batches)
    batch = parity.make_batch(OFF2ON_ARGS.seed, parity.OFF2ON_ROWS * OFF2ON_ARGS.batch_size,
                              OFF2ON_ARGS.observation_dim, OFF2ON_ARGS.action_dim)
    bad = failed(parity.compare_off2on(cases, batch, theirs, parity.DEFAULT_Z))
    assert ("deterministic", "actor_loss") in bad
    assert ("deterministic", "actor parameters after the update") in bad
    assert ("deterministic", "critic parameters after the update") not in bad
    assert ("deterministic", "priorities") not in bad


def test_off2on_priorities_without_the_offline_normalisation_are_reported(monkeypatch):
    """The stand-in's new priorities are w^(1/T), not divided by the offline rows' mean."""
    from algorithms import off2on
    cases = parity.off2on_cases(OFF2ON_ARGS)[1:]
    batches = off2on_batches()
    with monkeypatch.context() as patch:
        patch.setattr(off2on, "new_priorities", lambda w_rl, w_offline, temperature: jnp.clip(
            w_rl ** (1.0 / temperature), 1e-3, 1e3))
        theirs = off2on_standin(cases, batches)
    batch = parity.make_batch(OFF2ON_ARGS.seed, parity.OFF2ON_ROWS * OFF2ON_ARGS.batch_size,
                              OFF2ON_ARGS.observation_dim, OFF2ON_ARGS.action_dim)
    bad = failed(parity.compare_off2on(cases, batch, theirs, parity.DEFAULT_Z))
    assert bad == {("random", "priorities")}


def test_off2on_mapping_places_every_leaf():
    """rlkit's layout (policies[i].fc_j / last_fc / last_fc_log_std as torch (out, in) weights;
    qf1 and qf2 as ParallelMlp ensembles with (N, in, out) weights and (N, 1, out) biases;
    ConcatMlp's fc_j / last_fc) lands where our trees hold it."""
    case = parity.off2on_cases(OFF2ON_ARGS)[0]
    batches = off2on_batches()
    fresh = parity.subtree(parity.off2on_our_side(case, batches, None), "init")
    numbered = {path: np.arange(np.size(value), dtype=np.float32).reshape(np.shape(value)) + 0.5
                for path, value in fresh.items()}
    theirs = off2on_their_layout(numbered)
    assert theirs["qf2/h1/weights"].shape == (parity.OFF2ON_MEMBERS, OFF2ON_ARGS.observation_dim + OFF2ON_ARGS.action_dim,
                                             OFF2ON_ARGS.hidden)
    assert theirs["policy/policies/0/last_fc_log_std/weight"].shape == (OFF2ON_ARGS.action_dim, OFF2ON_ARGS.hidden)
    mapped = parity.off2on_mapping(theirs, fill=True)
    assert parity.mapping_check("off2on", "c", "m", mapped, fresh).passed
    for path in set(fresh) - set(parity.OFF2ON_EXTRA_LEAVES):
        np.testing.assert_array_equal(mapped[path], numbered[path], err_msg=path)
