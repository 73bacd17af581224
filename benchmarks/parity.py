"""Parity with the authors' code: the same parameters and the same batch through their update and ours.

For each algorithm, a reference driver (benchmarks/reference/*_parity.py, run with the Python of
the reference's throwaway virtual environment, set up as benchmarks/compare.py sets it up) builds
the OFFICIAL agent with the official code, and writes its initial parameters, its networks'
outputs on a batch, the metrics of one official update and the updated parameters. This script
copies those initial parameters into OUR agent through a documented name mapping (a tree that
cannot be mapped leaf for leaf is itself reported), feeds our update the same batch, and compares:

  * every network output before the update (critics, actor mean, std and mode, temperature ...),
    to float32 tolerance (`OUTPUT_TOLERANCE`);
  * the losses of one update and every updated parameter, to `UPDATE_TOLERANCE`;
  * the metrics that stay random (sampled actions, the random critic subset) in distribution:
    over `--keys` random keys per side, the two means must lie within `--z` standard errors of
    their difference.

Pairs (ours: the official code): rlpd.py: ikostrikov/rlpd SACLearner; cql.py (--recipe jaxcql)
and calql.py: nakamotoo/Cal-QL JaxCQL ConservativeSAC without and with enable_calql; iql.py:
ikostrikov/implicit_q_learning Learner; wsrl.py (fine-tuning and pre-training updates):
zhouzypaul/wsrl SACAgent.update_high_utd and CalQLAgent / CQLAgent.update; off2on.py's fine-tuning
update: shlee94/Off2OnRL OursTrainer.train_from_torch (PyTorch, CPU). docs/parity.md gives the
parameter mappings and the shims each driver needs.

Randomness is removed where the algorithm allows, so that it can neither hide a difference nor
raise a false alarm: the actor's log-std output layer is set to kernel 0 and a bias below the
log-std clip (every tanh-Gaussian sample is then tanh(mean) up to the clipped std), the
temperature to e^-30 where that isolates the critic and actor, the critic subset to the whole
ensemble (or every critic a copy of the first, where the subset is always drawn), and for CQL's
penalty critics that ignore the action, so that the uniform random actions give known values.
These change the initial parameters only; the official update runs as it is.

    python benchmarks/parity.py                         # every algorithm, one JSON line per check, then a table
    python benchmarks/parity.py --algorithms rlpd --keys 200
    python benchmarks/parity.py --dry-run               # print the set-up and the driver commands only
    python benchmarks/parity.py --rlpd-source /path/to/rlpd
    python benchmarks/parity.py --algorithms off2on --off2on-source /path/to/Off2OnRL

It is not part of the fast test suite (it installs the reference code); tests/test_parity.py
checks the mapping and the comparison on a stand-in "official" agent (ours with one deliberate
change). docs/parity.md holds the last result.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
from typing import Callable, Literal

import numpy as np
import tyro

if __package__ in (None, ""):  # run as `python benchmarks/parity.py`: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import compare  # noqa: E402
from common.cli import UserError, check  # noqa: E402
from benchmarks.reference.parity_io import flatten, load, save, subtree, unflatten  # noqa: E402

OUTPUT_TOLERANCE = (1e-5, 1e-5)  # (absolute, relative): the same float32 network on the same input
UPDATE_TOLERANCE = (1e-5, 1e-4)  # one update: the same gradients summed in another order, through Adam
DEFAULT_Z = 4.0  # distribution checks: standard errors of the difference of the means

# References besides compare.py's, set up the same way (pinned commit, own virtual environment with
# this interpreter's jax, jaxlib, flax, optax and numpy, plus these packages).
REFERENCES = {
    **compare.REFERENCES,
    # The snapshot's newest commit. JaxCQL/conservative_sac.py imports only jax_utils.py and
    # model.py; model.py needs distrax (0.1.9 runs on jax 0.10 with tfp-nightly, as compare.py's
    # JAX-CORL set-up found) and ml-collections (the config). Its pins (jax 0.3.15, flax 0.4.2,
    # distrax 0.1.2) do not install on this Python; the update's code runs unchanged on ours.
    "cal-ql": compare.Reference("cal-ql", "nakamotoo/Cal-QL", "https://github.com/nakamotoo/Cal-QL",
                                "ac6eafec22e8d60836573e1f488c7f626ce8a77e",
                                ("distrax==0.1.9", "tfp-nightly==0.26.0.dev20261027", "ml-collections==1.1.0")),
    # The repository's newest commit. learner.py and the modules it imports need only flax, optax
    # and tensorflow-probability's JAX substrate (policy.py); tfp-nightly as for rlpd.
    "iql": compare.Reference("iql", "ikostrikov/implicit_q_learning",
                             "https://github.com/ikostrikov/implicit_q_learning",
                             "09d700248117881a75cb21f0adb95c6c8a694cb2", ("tfp-nightly==0.26.0.dev20261027",)),
    # The commit wsrl.py follows. `wsrl.agents` imports all five agents: distrax (as for Cal-QL),
    # chex (distrax's), ml-collections, overrides and absl-py; no gym, d4rl or wandb.
    "wsrl": compare.Reference("wsrl", "zhouzypaul/wsrl", "https://github.com/zhouzypaul/wsrl",
                              "891ee353afe5303835da421c60d4ac35f6e2ef10",
                              ("distrax==0.1.9", "tfp-nightly==0.26.0.dev20261027", "ml-collections==1.1.0",
                               "overrides==7.7.0", "absl-py==2.3.1")),
    # The repository's newest commit (the one off2on.py follows). PyTorch: OursTrainer and rlkit's
    # networks run on torch 2.13 (CPU); gtimer is the timer train_from_torch stamps. rlkit is not
    # installed: the driver puts the checkout's rlkit/ folder on the path. Its pins (torch 1.4,
    # Python 3.5-era gym and d4rl) do not install on this Python.
    "off2on": compare.Reference("off2on", "shlee94/Off2OnRL", "https://github.com/shlee94/Off2OnRL",
                                "6f298fa9ef040d725067d0f2775022bd2900d635", ("torch==2.13.0", "gtimer==1.0.0b5")),
}


@dataclasses.dataclass
class ParityArgs:
    algorithms: tuple[Literal["rlpd", "calql", "cql", "iql", "wsrl", "off2on"], ...] = (
        "rlpd", "calql", "cql", "iql", "wsrl", "off2on")
    """Algorithms to check, in this order."""
    keys: int = 100
    """Random keys per side for the checks made in distribution."""
    z: float = DEFAULT_Z
    """A distribution check passes when the means differ by at most this many standard errors."""
    batch_size: int = 64
    """Rows of one minibatch."""
    observation_dim: int = 11
    action_dim: int = 3
    hidden: int = 64
    """Width of every hidden layer (the paper's depth per algorithm; a small width keeps it fast on a CPU)."""
    seed: int = 0
    """Seed of the batch and of both agents' initialisations."""
    cache_dir: str = "~/.cache/o2o-compare"
    """Where the reference checkouts and their virtual environments live (shared with compare.py)."""
    rlpd_source: str = compare.REFERENCES["rlpd"].url
    """ikostrikov/rlpd to clone: a URL, a local checkout or a git directory."""
    rlpd_commit: str = compare.REFERENCES["rlpd"].commit
    cal_ql_source: str = REFERENCES["cal-ql"].url
    """nakamotoo/Cal-QL to clone (JaxCQL: CQL and Cal-QL)."""
    cal_ql_commit: str = REFERENCES["cal-ql"].commit
    iql_source: str = REFERENCES["iql"].url
    """ikostrikov/implicit_q_learning to clone."""
    iql_commit: str = REFERENCES["iql"].commit
    wsrl_source: str = REFERENCES["wsrl"].url
    """zhouzypaul/wsrl to clone."""
    wsrl_commit: str = REFERENCES["wsrl"].commit
    off2on_source: str = REFERENCES["off2on"].url
    """shlee94/Off2OnRL to clone (PyTorch)."""
    off2on_commit: str = REFERENCES["off2on"].commit
    json_out: str | None = None
    """Also append the JSON lines to this file."""
    dry_run: bool = False
    """Print the set-up steps and the driver commands without running anything."""
    timeout: float = 1800.0
    """Seconds one reference driver may take."""


# ---------------------------------------------------------------------------------------------
# Checks: one record per compared quantity


@dataclasses.dataclass
class Check:
    algorithm: str
    case: str
    quantity: str
    kind: str  # "exact", "distribution" or "mapping"
    max_abs: float | None
    max_rel: float | None
    tolerance: str
    passed: bool
    note: str = ""
    deviation: str | None = None
    """Set on a failed check whose difference is one the algorithm file names as a deviation
    (NamedDeviation): what it is and where it is named. Such a check is reported as "named
    deviation", neither pass nor fail, and does not set the exit code."""

    @property
    def status(self) -> str:
        return "pass" if self.passed else "named deviation" if self.deviation else "fail"


@dataclasses.dataclass(frozen=True)
class NamedDeviation:
    """A difference from the official code that our algorithm file itself names as a deviation.

    `text` is the one line a marked check carries; `named_in` holds (file, phrase) pairs, each
    phrase a passage of that file (compared with whitespace collapsed): if a file no longer says
    it, the deviation is no longer named and the check stays failed. Which checks a deviation
    covers is decided where the checks are made, on the exact quantity and leaf names (e.g.
    compare_off2on): nothing is matched by family."""

    text: str
    named_in: tuple[tuple[str, str], ...]

    def unnamed(self) -> list[str]:
        """The files of `named_in` that do not (or no longer) contain their phrase."""
        missing_in = []
        for path, phrase in self.named_in:
            try:
                with open(os.path.join(compare.REPO, path)) as file:
                    text = " ".join(file.read().split())
            except OSError:
                text = ""
            if " ".join(phrase.split()) not in text:
                missing_in.append(path)
        return missing_in

    def mark(self, check: Check) -> Check:
        """The check, carrying this deviation if it failed and the deviation is still named."""
        if check.passed:
            return check
        missing_in = self.unnamed()
        if missing_in:
            check.note += f"; would be the named deviation '{self.text}', but {', '.join(missing_in)} no longer names it"
        else:
            check.deviation = self.text
        return check


def exit_code(checks: list[Check]) -> int:
    """0 when every check passes or is a named deviation, else 1."""
    return 0 if all(check.status != "fail" for check in checks) else 1


def compare_arrays(algorithm: str, case: str, quantity: str, theirs, ours, tolerance: tuple[float, float]) -> Check:
    """Elementwise: |ours - theirs| <= atol + rtol * |theirs| everywhere."""
    atol, rtol = tolerance
    theirs, ours = np.asarray(theirs, np.float64), np.asarray(ours, np.float64)
    text = f"atol {atol:g} + rtol {rtol:g}"
    if theirs.shape != ours.shape:
        return Check(algorithm, case, quantity, "exact", None, None, text, False,
                     f"shapes differ: theirs {theirs.shape}, ours {ours.shape}")
    gap = np.abs(ours - theirs)
    rel = gap / np.maximum(np.abs(theirs), 1e-12)
    passed = bool(np.all(gap <= atol + rtol * np.abs(theirs)))
    return Check(algorithm, case, quantity, "exact", float(gap.max(initial=0.0)), float(rel.max(initial=0.0)),
                 text, passed)


def compare_trees(algorithm: str, case: str, quantity: str, theirs: dict, ours: dict,
                  tolerance: tuple[float, float]) -> Check:
    """Every leaf of two flat {path: array} trees with the same paths; the worst leaf is named."""
    if set(theirs) != set(ours):
        return mapping_check(algorithm, case, quantity, theirs, ours)
    leaves = [(path, compare_arrays(algorithm, case, path, theirs[path], ours[path], tolerance)) for path in theirs]
    failed = [path for path, check in leaves if not check.passed]
    worst_path, worst = max(leaves, key=lambda item: item[1].max_abs if item[1].max_abs is not None else math.inf)
    note = f"largest at {worst_path}" + (f"; {len(failed)} of {len(leaves)} leaves out of tolerance: "
                                         f"{', '.join(failed[:4])}" if failed else "")
    return Check(algorithm, case, quantity, "exact", worst.max_abs,
                 max(check.max_rel for _, check in leaves if check.max_rel is not None), worst.tolerance,
                 not failed, note)


def compare_distribution(algorithm: str, case: str, quantity: str, theirs, ours, z: float) -> Check:
    """Means over random keys: |mean ours - mean theirs| <= z * SE of the difference (+ float32 slack)."""
    theirs, ours = np.asarray(theirs, np.float64).ravel(), np.asarray(ours, np.float64).ravel()
    gap = abs(ours.mean() - theirs.mean())
    error = math.sqrt(theirs.var(ddof=1) / len(theirs) + ours.var(ddof=1) / len(ours))
    slack = 1e-6 * max(abs(theirs.mean()), 1.0)  # a metric that is not random on either side
    passed = bool(gap <= z * error + slack)
    return Check(algorithm, case, quantity, "distribution", float(gap), float(gap / max(abs(theirs.mean()), 1e-12)),
                 f"{z:g} SE = {z * error:.3g}", passed,
                 f"means: theirs {theirs.mean():.6g}, ours {ours.mean():.6g}; n = {len(theirs)}, {len(ours)}")


def mapping_difference(theirs: dict, ours: dict) -> tuple[list[str], list[str], list[str]]:
    """(leaves only theirs, leaves only ours, common leaves whose shapes differ), each sorted."""
    only_theirs = sorted(set(theirs) - set(ours))
    only_ours = sorted(set(ours) - set(theirs))
    shapes = sorted(path for path in set(theirs) & set(ours) if np.shape(theirs[path]) != np.shape(ours[path]))
    return only_theirs, only_ours, shapes


def mapping_check(algorithm: str, case: str, quantity: str, theirs: dict, ours: dict) -> Check:
    """Whether two flat trees have the same leaves with the same shapes; names the leaves that differ."""
    only_theirs, only_ours, shapes = mapping_difference(theirs, ours)
    problems = []
    if only_theirs:
        problems.append(f"only theirs: {', '.join(only_theirs)}")
    if only_ours:
        problems.append(f"only ours: {', '.join(only_ours)}")
    if shapes:
        problems.append("shapes differ: " + ", ".join(
            f"{path} theirs {np.shape(theirs[path])} ours {np.shape(ours[path])}" for path in shapes))
    return Check(algorithm, case, quantity, "mapping", None, None, "same leaves and shapes", not problems,
                 "; ".join(problems) or f"{len(theirs)} leaves map one to one")


def missing(algorithm: str, case: str, quantity: str, ours: dict, prefix: str, metric: str | None = None) -> Check | None:
    """A failed check when our update does not report a metric that theirs does; else None."""
    if f"{prefix}/{metric or quantity}" in ours:
        return None
    return Check(algorithm, case, quantity, "exact" if prefix == "info" else "distribution", None, None, "-", False,
                 "our update does not report it")


def rename(flat: dict, renames: dict[str, str]) -> dict:
    """The flat tree with each path component renamed by `renames` (components not named stay)."""
    return {"/".join(renames.get(part, part) for part in path.split("/")): value for path, value in flat.items()}


# ---------------------------------------------------------------------------------------------
# The batch both sides get


def make_batch(seed: int, rows: int, observation_dim: int, action_dim: int) -> dict[str, np.ndarray]:
    """Random transitions with every key the official updates read (rlpd: masks; JaxCQL: dones and
    Monte-Carlo returns). Rewards are AntMaze's r - 1 (-1, 0 at the goal): a target whose mean is
    far from the initial Q-values, so that a term of the wrong sign in the target changes the
    squared TD error. Returns-to-go are standard normal: about half the rows lie above the initial
    Q-values (near 0), so the Cal-QL floor acts on some rows and not on others."""
    rng = np.random.default_rng(seed)
    masks = (rng.uniform(size=rows) > 0.2).astype(np.float32)  # some terminal rows
    return {"observations": rng.normal(size=(rows, observation_dim)).astype(np.float32),
            "actions": rng.uniform(-0.9, 0.9, (rows, action_dim)).astype(np.float32),
            "rewards": (1.0 - masks) - 1.0,
            "masks": masks, "dones": 1.0 - masks,
            "next_observations": rng.normal(size=(rows, observation_dim)).astype(np.float32),
            "mc_returns": rng.normal(size=rows).astype(np.float32)}


# ---------------------------------------------------------------------------------------------
# RLPD: ikostrikov/rlpd SACLearner against algorithms/rlpd.py

# Their module names -> ours, per network. Actor: Normal's named heads are our Actor's Dense_0
# (mean) and Dense_1 (log-std); the critic ensemble is nn.vmap of StateActionValue there, of
# Critic here; MLP_0/Dense_i and LayerNorm_i (Dense -> LayerNorm -> ReLU) and the critic's head
# Dense_0 have the same names in both.
_RLPD_CRITIC = {"VmapStateActionValue_0": "VmapCritic_0"}
RLPD_RENAMES = {"actor": {"OutputDenseMean": "Dense_0", "OutputDenseLogStd": "Dense_1"},
                "critic": _RLPD_CRITIC, "target_critic": _RLPD_CRITIC, "temp": {}}
RLPD_NETWORKS = ("actor", "critic", "target_critic", "temp")


def rlpd_cases(args: ParityArgs) -> list[dict]:
    """The cases run on both sides. deterministic: every critic in the target's min (Z = E), the
    actor's samples tanh(mean), temperature e^-30; G=2 and G=1 (ours reports the mean of the G
    critic steps' metrics, theirs the last one's, so critic losses are compared at G=1). Their
    entropy (and so the temperature loss) still holds the Gaussian noise's -|noise|^2/2: compared
    in distribution. random: the AntMaze preset's Z=1 with the entropy backup on, untouched
    initialisation, temperature 1, every loss compared in distribution over `keys` random keys.
    The logged `temperature` is left out: theirs logs it before the temperature step, ours after
    (the updated temperature parameter is compared instead)."""
    hidden = [args.hidden] * 3
    shared = {"hidden_dims": hidden, "num_qs": 10, "seed": args.seed}
    deterministic = {**shared, "deterministic": True, "num_min_qs": 10, "backup_entropy": True, "log_std_bias": -30.0, "log_temp": -30.0}
    random_metrics = ["entropy", "temperature_loss"]
    return [{**deterministic, "case": "deterministic-g2", "utd": 2, "exact": ["actor_loss"], "random": []},
            {**deterministic, "case": "deterministic-g1", "utd": 1, "keys": args.keys,
             "exact": ["critic_loss", "q", "actor_loss"], "random": random_metrics},
            {**shared, "case": "random-z1", "deterministic": False, "num_min_qs": 1, "backup_entropy": True, "utd": 1, "keys": args.keys,
             "exact": ["q"], "random": ["critic_loss", "actor_loss", *random_metrics]}]


def rlpd_our_args(case: dict):
    from algorithms import rlpd
    return dataclasses.replace(rlpd.Args(), hidden_dims=tuple(case["hidden_dims"]), num_qs=case["num_qs"],
                               num_min_qs=case["num_min_qs"], backup_entropy=case["backup_entropy"],
                               seed=case["seed"])


def rlpd_our_params(agent) -> dict:
    return {"actor": agent.actor.params, "critic": agent.critic.params,
            "target_critic": agent.target_critic_params, "temp": agent.temperature.params}


def rlpd_fresh_params(case: dict, observation_dim: int, action_dim: int) -> dict:
    """The flat parameter tree of a freshly created agent of ours (what the mapping must give)."""
    from algorithms import rlpd
    args = rlpd_our_args(case)
    agent = rlpd.create_agent(args, rlpd.make_config(args, action_dim), observation_dim, action_dim)
    return flatten(rlpd_our_params(agent))


def fresh_state(state, params):
    """A TrainState holding `params` with a fresh optimizer state (the official agent's are fresh too)."""
    return state.replace(params=params, opt_state=state.tx.init(params))


def rlpd_our_agent(case: dict, params: dict[str, dict], observation_dim: int, action_dim: int):
    """Our agent and config holding the given (our layout, nested) parameters with fresh Adam
    states, built from rlpd.py's own functions (make_config, create_agent)."""
    import jax
    import jax.numpy as jnp
    from algorithms import rlpd

    args = rlpd_our_args(case)
    config = rlpd.make_config(args, action_dim)
    agent = rlpd.create_agent(args, config, observation_dim, action_dim)
    params = jax.tree_util.tree_map(jnp.asarray, params)

    agent = agent.replace(actor=fresh_state(agent.actor, params["actor"]), critic=fresh_state(agent.critic, params["critic"]),
                          target_critic_params=params["target_critic"],
                          temperature=fresh_state(agent.temperature, params["temp"]))
    return agent, config


def rlpd_our_side(case: dict, batch: dict, params: dict[str, dict]) -> dict:
    """Our arrays for one case, keyed as the driver keys theirs (init/ excepted), in our layout."""
    import jax
    import jax.numpy as jnp
    from algorithms import rlpd

    observation_dim, action_dim = batch["observations"].shape[-1], batch["actions"].shape[-1]
    agent, config = rlpd_our_agent(case, params, observation_dim, action_dim)
    observations = jnp.asarray(batch["observations"])
    mean, log_std = config.actor.apply({"params": agent.actor.params}, observations)
    arrays = {"out/q": config.critic.apply({"params": agent.critic.params}, observations, jnp.asarray(batch["actions"])),
              "out/actor_mean": mean, "out/actor_std": jnp.exp(log_std), "out/actor_mode": jnp.tanh(mean),
              "out/temperature": rlpd.current_temperature(agent)}
    utd = case["utd"]
    # their update slices G consecutive minibatches off the rows: the same as this reshape
    batches = {name: jnp.asarray(value).reshape(utd, -1, *value.shape[1:]) for name, value in batch.items()}
    update = jax.jit(lambda agent, batches: rlpd.update_on_batches(agent, batches, config))
    updated, info = update(agent, batches)
    arrays.update(flatten({"info": info, "updated": rlpd_our_params(updated)}))
    draws = [update(agent.replace(key=jax.random.PRNGKey(1000 + index)), batches)[1]
             for index in range(case.get("keys", 0))]
    if draws:
        arrays.update({f"dist/{name}": np.stack([np.asarray(d[name]) for d in draws]) for name in draws[0]})
    return {name: np.asarray(value) for name, value in arrays.items()}


def compare_rlpd(cases: list[dict], batch: dict, theirs: dict, z: float) -> list[Check]:
    """Every check of every case, from the driver's arrays (`theirs`, flat, case-prefixed). The
    metrics have the same names in both codes."""
    checks = []
    for case in cases:
        name = case["case"]
        their_case = subtree(theirs, name)
        their_init = {network: rename(subtree(their_case, f"init/{network}"), RLPD_RENAMES[network])
                      for network in RLPD_NETWORKS}
        mapped = {f"{network}/{path}": value for network, tree in their_init.items() for path, value in tree.items()}
        fresh = rlpd_fresh_params(case, batch["observations"].shape[-1], batch["actions"].shape[-1])
        checks.append(mapping_check("rlpd", name, "parameter mapping", mapped, fresh))
        if not checks[-1].passed:  # nothing else can be compared
            continue
        ours = rlpd_our_side(case, batch, {network: unflatten(tree) for network, tree in their_init.items()})
        for output in ("q", "actor_mean", "actor_std", "actor_mode", "temperature"):
            checks.append(compare_arrays("rlpd", name, f"{output} before the update", their_case[f"out/{output}"],
                                         ours[f"out/{output}"], OUTPUT_TOLERANCE))
        for metric in case["exact"]:
            checks.append(compare_arrays("rlpd", name, metric, their_case[f"info/{metric}"], ours[f"info/{metric}"],
                                         UPDATE_TOLERANCE))
        for metric in case["random"]:
            checks.append(compare_distribution("rlpd", name, f"{metric} (mean over keys)",
                                               their_case[f"dist/{metric}"], ours[f"dist/{metric}"], z))
        if case["deterministic"]:  # the updated parameters depend on no random draw
            for network in RLPD_NETWORKS:
                their_updated = rename(subtree(their_case, f"updated/{network}"), RLPD_RENAMES[network])
                checks.append(compare_trees("rlpd", name, f"{network} parameters after the update", their_updated,
                                            subtree(ours, f"updated/{network}"), UPDATE_TOLERANCE))
    return checks


# ---------------------------------------------------------------------------------------------
# CQL and Cal-QL: nakamotoo/Cal-QL JaxCQL ConservativeSAC against algorithms/cql.py (--recipe
# jaxcql) and algorithms/calql.py

JAXCQL_NETWORKS = {"policy": "actor", "qf1": "critic", "qf2": "critic", "target_qf1": "target_critic",
                   "target_qf2": "target_critic", "log_alpha": "temperature", "log_alpha_prime": "alpha_prime"}


def jaxcql_mapping(theirs: dict) -> dict:
    """Their flat parameters (driver layout: NETWORK/params/...) in our layout.

    policy: base_network/Dense_0..L-1 are our actor's MLP_0/Dense_i, its last Dense_L (mean and
    log-std head, 2|A| wide) our Dense_0; log_std_{multiplier,offset}_module/value our
    log_std_{multiplier,offset}. qf1, qf2 (two separate networks there): FullyConnectedNetwork_0/
    Dense_0..L-1 are our VmapCritic_0/MLP_0/Dense_i and Dense_L our head VmapCritic_0/Dense_0,
    stacked on a leading axis in the order qf1, qf2 (likewise the targets). log_alpha/value and
    log_alpha_prime/value are our temperature's and alpha prime's log_value."""
    mapped, critics = {}, {}
    for path, value in theirs.items():
        network, _, *rest = path.split("/")  # NETWORK/params/...
        ours = JAXCQL_NETWORKS[network]
        if network == "policy" and rest[0] == "base_network":
            mapped[f"actor/{dense_path(rest[1:], theirs, 'policy/params/base_network', 'MLP_0')}"] = value
        elif network == "policy":
            mapped[f"actor/{rest[0].removesuffix('_module')}"] = value
        elif ours in ("temperature", "alpha_prime"):
            mapped[f"{ours}/log_value"] = value
        else:
            inner = dense_path(rest[1:], theirs, f"{network}/params/FullyConnectedNetwork_0", "MLP_0")
            critics.setdefault(f"{ours}/VmapCritic_0/{inner}", {})[network] = value
    for path, members in critics.items():
        order = sorted(members, key=lambda name: name[-1])  # qf1 then qf2 (and the targets likewise)
        mapped[path] = np.stack([members[name] for name in order])
    return mapped


def dense_path(rest: list[str], theirs: dict, prefix: str, trunk: str) -> str:
    """Dense_i/leaf of their MLP with its output layer inside: the last Dense is our head
    Dense_0, the others our trunk's Dense_i."""
    layers = {path.split("/")[len(prefix.split("/"))] for path in theirs if path.startswith(prefix + "/")}
    last = max(int(layer.split("_")[1]) for layer in layers)
    layer, leaf = rest
    return f"Dense_0/{leaf}" if int(layer.split("_")[1]) == last else f"{trunk}/{layer}/{leaf}"


def jaxcql_cases(args: ParityArgs, calibrated: bool) -> list[dict]:
    """The cases of cql.py (calibrated False: their enable_calql False) or calql.py (True).

    deterministic (every random draw made irrelevant): log-std at its clip, temperature e^-30,
    and critics that ignore the action (`ignore_actions`), so that Q at uniform random actions is
    Q(s); the plain log-sum-exp (with importance sampling the policy samples' weights are e^-57
    at that std and the Cal-QL floor would not show). The random actions still reach the
    gradient of the first kernel's action rows, which are left out of the updated-parameter
    check. lagrange: the same with importance sampling and the Lagrange multiplier (cql.py).
    actor: no penalty (their use_cql False, our alpha 0) and critics that see the action: the
    actor's gradient through Q(s, tanh(mean)) and the max-target backup, exactly. random: the
    AntMaze settings (importance sampling, Lagrange, gap 0.8), the initialisation untouched but
    for the critics' output kernels x100 (Q-values spread over about +-1, not +-0.01, so that the
    max over sampled next actions and the floor matter), in distribution over `keys` keys."""
    arch = f"{args.hidden}-{args.hidden}"
    shared = {"policy_arch": arch, "qf_arch": arch, "seed": args.seed, "cql_min_q_weight": 5.0,
              "enable_calql": calibrated, "use_cql": True}
    fixed = {"log_std_clip": True, "log_alpha": -30.0, "deterministic": True, "keys": 0}
    plain = {"cql_importance_sample": False, "cql_lagrange": False, "cql_target_action_gap": 0.8}
    exact = ["critic_loss", "td_loss", "cql_gap", "q", "actor_loss", "temperature"]
    bound = ["below_bound_rate"] if calibrated else []
    cases = [{**shared, **fixed, "case": "penalty-deterministic", "ignore_actions": True, "cql": plain,
              "exact": exact + bound, "random": []}]
    if not calibrated:
        cases += [{**shared, **fixed, "case": "lagrange-deterministic", "ignore_actions": True,
                   "cql": {**plain, "cql_importance_sample": True, "cql_lagrange": True},
                   "exact": exact + ["alpha_prime", "alpha_prime_loss"], "random": []},
                  {**shared, **fixed, "case": "actor-deterministic", "use_cql": False, "cql": plain,
                   "exact": ["critic_loss", "q", "actor_loss", "temperature"], "random": []}]
    cases.append({**shared, "case": "random", "deterministic": False, "keys": args.keys, "critic_head_scale": 100.0,
                  "cql": {"cql_importance_sample": True, "cql_lagrange": True, "cql_target_action_gap": 0.8},
                  "exact": ["q", "temperature", "alpha_prime"],
                  "random": ["critic_loss", "td_loss", "cql_gap", "actor_loss", "entropy", "temperature_loss",
                             "alpha_prime_loss", *bound]})
    return cases


def jaxcql_their_metrics(info: dict) -> dict:
    """Their metrics under our names (each ours sums or averages the two critics as named)."""
    names = {"critic_loss": info["qf1_loss"] + info["qf2_loss"], "actor_loss": info["policy_loss"],
             "q": (info["q1_pred_mean"] + info["q2_pred_mean"]) / 2, "entropy": -info["log_pi_mean"],
             "temperature": info["alpha"], "temperature_loss": info["alpha_loss"]}
    if "cql/qf1_bellman_loss" in info:
        names.update(td_loss=info["cql/qf1_bellman_loss"] + info["cql/qf2_bellman_loss"],
                     cql_gap=(info["cql/cql_qf1_diff"] + info["cql/cql_qf2_diff"]) / 2,
                     alpha_prime=info["cql/alpha_prime"], alpha_prime_loss=info["cql/alpha_prime_loss"],
                     below_bound_rate=(info["cql/bound_rate_cql_q1_current_actions"]
                                       + info["cql/bound_rate_cql_q2_current_actions"]) / 2)
    else:  # use_cql False: the critic loss is the TD loss
        names["td_loss"] = names["critic_loss"]
    return names


def jaxcql_our_args(module, case: dict):
    """Our Args matching the case: JaxCQL's learning rates (policy 1e-4, critics and alpha' 3e-4,
    temperature the policy's), 2 critics, no BC, max-target backup, target entropy -|A|."""
    cql = case["cql"]
    fields = dict(actor_hidden_dims=tuple(int(w) for w in case["policy_arch"].split("-")),
                  critic_hidden_dims=tuple(int(w) for w in case["qf_arch"].split("-")), num_qs=2, num_min_qs=2,
                  actor_lr=1e-4, critic_lr=3e-4, temp_lr=None, alpha_prime_lr=3e-4, bc_steps=0,
                  max_target_backup=True, backup_entropy=False, cql_n_actions=10, cql_temperature=1.0,
                  cql_importance_sample=cql["cql_importance_sample"], cql_lagrange=cql["cql_lagrange"],
                  cql_target_action_gap=cql["cql_target_action_gap"],
                  cql_alpha=case["cql_min_q_weight"] if case["use_cql"] else 0.0, seed=case["seed"])
    if "recipe" in {field.name for field in dataclasses.fields(module.Args)}:
        fields["recipe"] = "jaxcql"  # cql.py: JaxCQL's Lagrange form and max-target backup
    return dataclasses.replace(module.Args(), **fields)


def jaxcql_our_params(agent) -> dict:
    return {"actor": agent.actor.params, "critic": agent.critic.params, "target_critic": agent.target_critic_params,
            "temperature": agent.temperature.params, "alpha_prime": agent.alpha_prime.params}


def jaxcql_our_side(module, case: dict, batch: dict, params: dict | None) -> dict:
    """Our arrays for one case in our layout (params None: only init/, a fresh agent's)."""
    import jax
    import jax.numpy as jnp

    observation_dim, action_dim = batch["observations"].shape[-1], batch["actions"].shape[-1]
    args = jaxcql_our_args(module, case)
    config = module.make_config(args, action_dim)
    agent = module.create_agent(args, config, observation_dim, action_dim)
    if params is None:
        return flatten({"init": jaxcql_our_params(agent)})
    params = jax.tree_util.tree_map(jnp.asarray, params)

    agent = agent.replace(actor=fresh_state(agent.actor, params["actor"]), critic=fresh_state(agent.critic, params["critic"]),
                          target_critic_params=params["target_critic"],
                          temperature=fresh_state(agent.temperature, params["temperature"]),
                          alpha_prime=fresh_state(agent.alpha_prime, params["alpha_prime"]))
    rows = {name: jnp.asarray(value) for name, value in batch.items()}
    mean, log_std = config.actor.apply({"params": agent.actor.params}, rows["observations"])
    q = config.critic.apply({"params": agent.critic.params}, rows["observations"], rows["actions"])
    arrays = {"out/q1": q[0], "out/q2": q[1], "out/actor_mode": jnp.tanh(mean),
              "out/data_log_prob": module.log_prob_of(rows["actions"], mean, log_std),
              "out/temperature": module.scalar_value(agent.temperature),
              "out/alpha_prime": module.scalar_value(agent.alpha_prime)}
    update = jax.jit(lambda agent: module.update(agent, rows, config))
    updated, info = update(agent.replace(key=jax.random.PRNGKey(case["seed"])))
    arrays.update(flatten({"info": info, "updated": jaxcql_our_params(updated)}))
    draws = [update(agent.replace(key=jax.random.PRNGKey(1000 + index)))[1] for index in range(case["keys"])]
    if draws:
        arrays.update({f"dist/{name}": np.stack([np.asarray(d[name]) for d in draws]) for name in draws[0]})
    return {name: np.asarray(value) for name, value in arrays.items()}


def jaxcql_outputs(case: dict) -> list[str]:
    """Outputs compared before the update. The log-probability of the data actions only where the
    std is not clipped to e^-20 (there it is about -1e17 on both sides, float32 noise)."""
    outputs = ["q1", "q2", "actor_mode", "temperature"]
    if not case.get("log_std_clip"):
        outputs.append("data_log_prob")
    if case["cql"]["cql_lagrange"]:
        outputs.append("alpha_prime")
    return outputs


def compare_jaxcql(algorithm: str, cases: list[dict], batch: dict, theirs: dict, z: float) -> list[Check]:
    """Every check of every case of `algorithm` ("cql" or "calql": our file), from the driver's arrays."""
    import importlib
    module = importlib.import_module(f"algorithms.{algorithm}")
    observation_dim = batch["observations"].shape[-1]
    checks = []
    for case in cases:
        name = case["case"]
        their_case = subtree(theirs, name)
        mapped = jaxcql_mapping(subtree(their_case, "init"))
        fresh = subtree(jaxcql_our_side(module, case, batch, None), "init")
        if "alpha_prime/log_value" not in mapped:  # no Lagrange: theirs has no alpha'; ours keeps an unused one
            mapped["alpha_prime/log_value"] = fresh["alpha_prime/log_value"]
        checks.append(mapping_check(algorithm, name, "parameter mapping", mapped, fresh))
        if not checks[-1].passed:
            continue
        ours = jaxcql_our_side(module, case, batch, unflatten(mapped))
        for output in jaxcql_outputs(case):
            checks.append(compare_arrays(algorithm, name, f"{output} before the update", their_case[f"out/{output}"],
                                         ours[f"out/{output}"], OUTPUT_TOLERANCE))
        their_info = jaxcql_their_metrics(subtree(their_case, "info"))
        for metric in case["exact"]:
            checks.append(missing(algorithm, name, metric, ours, "info") or compare_arrays(
                algorithm, name, metric, their_info[metric], ours[f"info/{metric}"], UPDATE_TOLERANCE))
        if case["random"]:
            their_draws = jaxcql_their_metrics(subtree(their_case, "dist"))
            for metric in case["random"]:
                checks.append(missing(algorithm, name, f"{metric} (mean over keys)", ours, "dist", metric)
                              or compare_distribution(algorithm, name, f"{metric} (mean over keys)",
                                                      their_draws[metric], ours[f"dist/{metric}"], z))
        if case["deterministic"]:
            updated = jaxcql_mapping(subtree(their_case, "updated"))
            for network in ("actor", "critic", "target_critic", "temperature", "alpha_prime"):
                their_tree, our_tree = subtree(updated, network), subtree(ours, f"updated/{network}")
                if not their_tree:
                    continue  # alpha' without Lagrange: theirs has none
                note = ""
                if case.get("ignore_actions") and "critic" in network:
                    first = "VmapCritic_0/MLP_0/Dense_0/kernel"  # the random actions' rows are left out
                    their_tree = {**their_tree, first: their_tree[first][:, :observation_dim]}
                    our_tree = {**our_tree, first: our_tree[first][:, :observation_dim]}
                    note = "first kernel's action rows left out; "
                check = compare_trees(algorithm, name, f"{network} parameters after the update", their_tree, our_tree,
                                      UPDATE_TOLERANCE)
                check.note = note + check.note
                checks.append(check)
    return checks


# ---------------------------------------------------------------------------------------------
# IQL: ikostrikov/implicit_q_learning Learner against algorithms/iql.py


def iql_mapping(theirs: dict) -> dict:
    """Their flat parameters in our layout. actor: the same names (MLP_0/Dense_i, the mean head
    Dense_0, log_stds). critic (DoubleCritic: Critic_0 and Critic_1, each MLP_0/Dense_0..L with the
    output layer inside the MLP): our VmapCritic_0/MLP_0/Dense_i for i < L and the head
    VmapCritic_0/Dense_0 for Dense_L, stacked in the order Critic_0, Critic_1; likewise the
    target. value (MLP_0/Dense_0..L): our MLP_0/Dense_i and the head Dense_0."""
    mapped, critics = {}, {}
    for path, value in theirs.items():
        network, *rest = path.split("/")
        if network == "actor":
            mapped[path] = value
        elif network == "value":
            mapped[f"value/{dense_path(rest[1:], theirs, 'value/MLP_0', 'MLP_0')}"] = value
        else:  # critic or target_critic: Critic_k/MLP_0/Dense_i/leaf
            inner = dense_path(rest[2:], theirs, f"{network}/{rest[0]}/MLP_0", "MLP_0")
            critics.setdefault(f"{network}/VmapCritic_0/{inner}", {})[rest[0]] = value
    for path, members in critics.items():
        mapped[path] = np.stack([members[name] for name in sorted(members)])  # Critic_0, Critic_1
    return mapped


def iql_cases(args: ParityArgs) -> list[dict]:
    """AntMaze (expectile 0.9, temperature 10, constant learning rates) and locomotion (0.7, 3,
    the actor's cosine decay, here over 5 steps so that 3 updates see it decay), 3 updates each:
    the update order (value, actor with the new value, critic with the new value, target) and
    the target's Polyak average act across updates. No dropout: nothing is random."""
    shared = {"hidden_dims": [args.hidden, args.hidden], "seed": args.seed, "updates": 3, "discount": 0.99,
              "tau": 0.005, "dropout_rate": None}
    return [{**shared, "case": "antmaze-constant", "expectile": 0.9, "temperature": 10.0, "opt_decay_schedule": ""},
            {**shared, "case": "locomotion-cosine", "expectile": 0.7, "temperature": 3.0,
             "opt_decay_schedule": "cosine", "max_steps": 5}]


def iql_our_args(case: dict):
    from algorithms import iql
    cosine = case["opt_decay_schedule"] == "cosine"
    return dataclasses.replace(iql.Args(), hidden_dims=tuple(case["hidden_dims"]), dropout_rate=0.0,
                               expectile=case["expectile"], beta=case["temperature"], discount=case["discount"],
                               tau=case["tau"], actor_lr_schedule="cosine" if cosine else "constant",
                               offline_steps=case.get("max_steps", 1), online_steps=0, utd=1, seed=case["seed"])


def iql_our_params(agent) -> dict:
    return {"actor": agent.actor.params, "critic": agent.critic.params, "value": agent.value.params,
            "target_critic": agent.target_critic_params}


def iql_our_side(case: dict, batch: dict, params: dict | None) -> dict:
    """Our arrays for one case in our layout (params None: only init/, a fresh agent's)."""
    import jax
    import jax.numpy as jnp
    from algorithms import iql

    observation_dim, action_dim = batch["observations"].shape[-1], batch["actions"].shape[-1]
    args = iql_our_args(case)
    config = iql.make_config(args, action_dim)
    agent = iql.create_agent(args, config, observation_dim, action_dim)
    if params is None:
        return flatten({"init": iql_our_params(agent)})
    params = jax.tree_util.tree_map(jnp.asarray, params)

    agent = agent.replace(actor=fresh_state(agent.actor, params["actor"]), critic=fresh_state(agent.critic, params["critic"]),
                          value=fresh_state(agent.value, params["value"]), target_critic_params=params["target_critic"])
    rows = {name: jnp.asarray(value) for name, value in batch.items()}
    q = config.critic.apply({"params": agent.critic.params}, rows["observations"], rows["actions"])
    mean, log_std = config.actor.apply({"params": agent.actor.params}, rows["observations"])
    arrays = {"out/q1": q[0], "out/q2": q[1], "out/v": config.value.apply({"params": agent.value.params},
                                                                            rows["observations"]),
              "out/actor_mean": mean, "out/actor_std": jnp.exp(log_std)}
    update = jax.jit(lambda agent: iql.update(agent, rows, config))
    for _ in range(case["updates"]):
        agent, info = update(agent)
    arrays.update(flatten({"info": info, "updated": iql_our_params(agent)}))
    return {name: np.asarray(value) for name, value in arrays.items()}


IQL_METRICS = ("value_loss", "v", "actor_loss", "critic_loss", "q")


def compare_iql(cases: list[dict], batch: dict, theirs: dict, z: float) -> list[Check]:
    """Every check of every case, from the driver's arrays; all exact (nothing is random)."""
    checks = []
    for case in cases:
        name = case["case"]
        their_case = subtree(theirs, name)
        mapped = iql_mapping(subtree(their_case, "init"))
        fresh = subtree(iql_our_side(case, batch, None), "init")
        checks.append(mapping_check("iql", name, "parameter mapping", mapped, fresh))
        if not checks[-1].passed:
            continue
        ours = iql_our_side(case, batch, unflatten(mapped))
        for output in ("q1", "q2", "v", "actor_mean", "actor_std"):
            checks.append(compare_arrays("iql", name, f"{output} before the updates", their_case[f"out/{output}"],
                                         ours[f"out/{output}"], OUTPUT_TOLERANCE))
        their_info = subtree(their_case, "info")
        their_info["q"] = (their_info["q1"] + their_info["q2"]) / 2
        for metric in IQL_METRICS:
            checks.append(compare_arrays("iql", name, f"{metric} (last of {case['updates']} updates)",
                                         their_info[metric], ours[f"info/{metric}"], UPDATE_TOLERANCE))
        updated = iql_mapping(subtree(their_case, "updated"))
        for network in ("actor", "critic", "value", "target_critic"):
            checks.append(compare_trees("iql", name, f"{network} parameters after {case['updates']} updates",
                                        subtree(updated, network), subtree(ours, f"updated/{network}"),
                                        UPDATE_TOLERANCE))
    return checks


# ---------------------------------------------------------------------------------------------
# WSRL fine-tuning: zhouzypaul/wsrl SACAgent.update_high_utd against algorithms/wsrl.py's update

# Their ModuleDict layout -> ours: the actor's `network` MLP is our MLP_0 (Dense_i, LayerNorm_i),
# its heads Dense_0 (mean) and Dense_1 (log-std) keep their names; the critic's `network` (the
# vmapped trunks, a leading axis of 10 on every leaf) is our `trunks`, its ONE shared head
# Dense_0 our `head`; the temperature's `lagrange` (softplus parameter) our `x`.
WSRL_NETWORKS = {"modules_actor": ("actor", {"network": "MLP_0"}),
                 "modules_critic": ("critic", {"network": "trunks"}),
                 "modules_temperature": ("temperature", {"lagrange": "x"}),
                 "modules_cql_alpha_lagrange": ("alpha_prime", {"lagrange": "x"})}


def wsrl_mapping(theirs: dict) -> dict:
    """Their flat `params/...` and `target_params/...` in our layout (actor, critic, temperature,
    target_critic; their targets of the actor and temperature are never read and are left out)."""
    mapped = {}
    for path, value in theirs.items():
        tree, module, *rest = path.split("/")
        network, renames = WSRL_NETWORKS[module]
        if tree == "target_params":
            if network != "critic":
                continue
            network = "target_critic"
        if module == "modules_critic" and rest[0] == "Dense_0":  # the shared head
            rest = ["head", *rest[1:]]
        else:
            rest = [renames.get(rest[0], rest[0]), *rest[1:]]
        mapped["/".join([network, *rest])] = value
    return mapped


def wsrl_cases(args: ParityArgs) -> list[dict]:
    """deterministic: every critic trunk a copy of the first (the subset-min's draw does not
    matter), std at its 1e-5 clip, temperature softplus(-30); G=2, without and with the AntMaze
    max-target backup. random: untouched initialisation, temperature 1, 2 of 10 critics drawn
    with replacement, in distribution. The launch scripts' learning rates (actor and temperature
    1e-4, critics 3e-4); 2 hidden layers of `hidden`.

    Pre-training (their CalQLAgent / CQLAgent `update`, our `pretraining_update`): the same
    deterministic start plus critics that ignore the action (Q at uniform actions is Q(s));
    Cal-QL with the plain log-sum-exp (the floor shows), CQL with importance sampling and the
    Lagrange multiplier; and Cal-QL at the AntMaze settings in distribution. In the Cal-QL case
    the penalty's gradient reaches only the 2 critics its draw picks (with replacement), a
    different pair on each side, so the updated critics are compared through the losses there."""
    shared = {"hidden_dims": [args.hidden, args.hidden], "seed": args.seed, "utd": 2, "actor_lr": 1e-4,
              "critic_lr": 3e-4, "temp_lr": 1e-4}
    fixed = {**shared, "deterministic": True, "identical_critics": True, "log_std_bias": -30.0,
             "temperature_param": -30.0, "keys": 0, "exact": ["critic_loss", "q", "target_q", "actor_loss",
                                                               "temperature"], "random": []}
    pretraining = {**fixed, "utd": 1, "max_target_backup": True, "ignore_actions": True,
                   "action_dim": args.action_dim, "exact": ["critic_loss", "td_loss", "cql_gap", "q", "actor_loss",
                                                            "temperature"]}
    plain = {"cql_importance_sample": False, "cql_autotune_alpha": False, "cql_alpha": 5.0}
    lagrange = {"cql_importance_sample": True, "cql_autotune_alpha": True, "cql_target_action_gap": 0.8}
    return [{**fixed, "case": "deterministic", "max_target_backup": False},
            {**fixed, "case": "deterministic-max-backup", "max_target_backup": True},
            {**shared, "case": "random", "deterministic": False, "max_target_backup": False, "keys": args.keys,
             "exact": ["temperature"], "random": ["critic_loss", "q", "target_q", "actor_loss", "entropy",
                                                  "temperature_loss"]},
            {**pretraining, "case": "pretraining-calql-deterministic", "pretraining": "calql", "cql": plain,
             "exact": [*pretraining["exact"], "calql_bound_rate"], "skip_updated": ["critic", "target_critic"]},
            {**pretraining, "case": "pretraining-cql-lagrange-deterministic", "pretraining": "cql", "cql": lagrange,
             "exact": [*pretraining["exact"], "alpha_prime"]},
            {**shared, "case": "pretraining-calql-random", "pretraining": "calql", "deterministic": False,
             "max_target_backup": True, "keys": args.keys, "cql": lagrange, "exact": ["temperature", "alpha_prime"],
             "random": ["critic_loss", "td_loss", "cql_gap", "q", "actor_loss", "entropy", "temperature_loss",
                        "calql_bound_rate"]}]


WSRL_THEIR_METRICS = {"critic_loss": "critic/critic_loss", "q": "critic/predicted_qs", "target_q": "critic/target_qs",
                      "actor_loss": "actor/actor_loss", "entropy": "actor/entropy", "temperature": "actor/temperature",
                      "temperature_loss": "temperature/temperature_loss", "td_loss": "critic/td_loss",
                      "cql_gap": "critic/cql_diff", "calql_bound_rate": "critic/calql_bound_rate",
                      "alpha_prime": "critic/cql_alpha"}


def wsrl_our_args(case: dict):
    from algorithms import wsrl
    hidden = tuple(case["hidden_dims"])
    cql = case.get("cql", {})
    return dataclasses.replace(wsrl.Args(), actor_hidden_dims=hidden, critic_hidden_dims=hidden, ensemble_size=10,
                               num_min_qs=2, layer_norm=True, state_independent_std=False, last_hidden_gain=1e-2,
                               pretraining=case.get("pretraining", "calql"), cql_alpha=cql.get("cql_alpha", 5.0),
                               cql_lagrange=cql.get("cql_autotune_alpha", False),
                               cql_target_action_gap=cql.get("cql_target_action_gap", 0.8),
                               cql_importance_sample=cql.get("cql_importance_sample", True),
                               max_target_backup=case["max_target_backup"],
                               n_actions=10, actor_lr=case["actor_lr"], critic_lr=case["critic_lr"],
                               temp_lr=case["temp_lr"], idle_optimizer_steps=True, seed=case["seed"])


def wsrl_our_params(agent, case: dict) -> dict:
    """Ours in the networks theirs has: the Lagrange multiplier only in a pre-training case with it."""
    params = {"actor": agent.actor.params, "critic": agent.critic.params, "temperature": agent.temperature.params,
              "target_critic": agent.target_critic_params}
    if case.get("cql", {}).get("cql_autotune_alpha"):
        params["alpha_prime"] = agent.alpha_prime.params
    return params


def wsrl_our_side(case: dict, batch: dict, params: dict | None) -> dict:
    """Our arrays for one case in our layout (params None: only init/, a fresh agent's)."""
    import jax
    import jax.numpy as jnp
    from algorithms import wsrl

    observation_dim, action_dim = batch["observations"].shape[-1], batch["actions"].shape[-1]
    args = wsrl_our_args(case)
    config = wsrl.make_config(args, action_dim)
    agent = wsrl.create_agent(args, config, observation_dim, action_dim)
    if params is None:
        return flatten({"init": wsrl_our_params(agent, case)})
    params = jax.tree_util.tree_map(jnp.asarray, params)

    agent = agent.replace(actor=fresh_state(agent.actor, params["actor"]), critic=fresh_state(agent.critic, params["critic"]),
                          temperature=fresh_state(agent.temperature, params["temperature"]),
                          target_critic_params=params["target_critic"])
    if "alpha_prime" in params:
        agent = agent.replace(alpha_prime=fresh_state(agent.alpha_prime, params["alpha_prime"]))
    rows = {name: jnp.asarray(batch[name]) for name in ("observations", "actions", "rewards", "masks",
                                                        "next_observations", "mc_returns")}
    mean, log_std = config.actor.apply({"params": agent.actor.params}, rows["observations"])
    arrays = {"out/q": config.critic.apply({"params": agent.critic.params}, rows["observations"], rows["actions"]),
              "out/actor_mean": mean, "out/actor_std": jnp.exp(log_std),
              "out/temperature": wsrl.scalar_value(agent.temperature)}
    if case.get("pretraining"):
        update = jax.jit(lambda agent: wsrl.pretraining_update(agent, rows, config))
    else:
        update = jax.jit(lambda agent: wsrl.update(agent, rows, config, case["utd"]))
    updated, info = update(agent.replace(key=jax.random.PRNGKey(case["seed"])))
    arrays.update(flatten({"info": info, "updated": wsrl_our_params(updated, case)}))
    draws = [update(agent.replace(key=jax.random.PRNGKey(1000 + index)))[1] for index in range(case["keys"])]
    if draws:
        arrays.update({f"dist/{name}": np.stack([np.asarray(d[name]) for d in draws]) for name in draws[0]})
    return {name: np.asarray(value) for name, value in arrays.items()}


def compare_wsrl(cases: list[dict], batch: dict, theirs: dict, z: float) -> list[Check]:
    """Every check of every case, from the driver's arrays."""
    checks = []
    for case in cases:
        name = case["case"]
        their_case = subtree(theirs, name)
        mapped = wsrl_mapping(subtree(their_case, "init"))
        fresh = subtree(wsrl_our_side(case, batch, None), "init")
        checks.append(mapping_check("wsrl", name, "parameter mapping", mapped, fresh))
        if not checks[-1].passed:
            continue
        ours = wsrl_our_side(case, batch, unflatten(mapped))
        for output in ("q", "actor_mean", "actor_std", "temperature"):
            checks.append(compare_arrays("wsrl", name, f"{output} before the update", their_case[f"out/{output}"],
                                         ours[f"out/{output}"], OUTPUT_TOLERANCE))
        for metric in case["exact"]:
            checks.append(missing("wsrl", name, metric, ours, "info") or compare_arrays(
                "wsrl", name, metric, their_case[f"info/{WSRL_THEIR_METRICS[metric]}"], ours[f"info/{metric}"],
                UPDATE_TOLERANCE))
        for metric in case["random"]:
            checks.append(missing("wsrl", name, f"{metric} (mean over keys)", ours, "dist", metric)
                          or compare_distribution("wsrl", name, f"{metric} (mean over keys)",
                                                  their_case[f"dist/{WSRL_THEIR_METRICS[metric]}"],
                                                  ours[f"dist/{metric}"], z))
        if case["deterministic"]:
            updated = wsrl_mapping(subtree(their_case, "updated"))
            for network in ("actor", "critic", "temperature", "target_critic", "alpha_prime"):
                their_tree, our_tree = subtree(updated, network), subtree(ours, f"updated/{network}")
                if not their_tree or network in case.get("skip_updated", ()):
                    continue  # alpha' without Lagrange: neither side has it here
                note = ""
                if case.get("ignore_actions") and "critic" in network:
                    first = "trunks/Dense_0/kernel"  # the random actions' rows are left out
                    rows = batch["observations"].shape[-1]
                    their_tree = {**their_tree, first: their_tree[first][:, :rows]}
                    our_tree = {**our_tree, first: our_tree[first][:, :rows]}
                    note = "first kernel's action rows left out; "
                check = compare_trees("wsrl", name, f"{network} parameters after the update", their_tree, our_tree,
                                      UPDATE_TOLERANCE)
                check.note = note + check.note
                checks.append(check)
    return checks


# ---------------------------------------------------------------------------------------------
# Off2On: shlee94/Off2OnRL OursTrainer (PyTorch) against algorithms/off2on.py's fine-tuning update

OFF2ON_MEMBERS = 5
OFF2ON_ROWS = 3  # batch_size rows each: the RL batch, the density's offline rows, its online rows
OFF2ON_EXTRA_LEAVES = {"actor/log_std_multiplier": 1.0, "actor/log_std_offset": 0.0}
"""Our actor's leaves without a counterpart in rlkit's TanhGaussianPolicy (log-std = multiplier x
head + offset, both learned): filled so that our log-std is their `last_fc_log_std` output."""
OFF2ON_LOG_STD_DEVIATION = NamedDeviation(
    "off2on.py's actor learns log_std_multiplier and log_std_offset (log-std = clip(multiplier x head + offset, "
    "-20, 2)), which rlkit's TanhGaussianPolicy lacks: named in algorithms/off2on.py's docstring (Deviations: "
    "'Members are JaxCQL-style networks') and docs/algorithms/off2on.md (Deviations)",
    (("algorithms/off2on.py", "Members are JaxCQL-style networks (orthogonal init, log-std = learned multiplier "
                              "x head + offset in [-20, 2])"),
     ("docs/algorithms/off2on.md", "a log-std that is a learned multiplier x head + offset clipped to [-20, 2]")))
"""The one named deviation the Off2On checks meet. It covers exactly: the strict mapping check when
its only difference is OFF2ON_EXTRA_LEAVES being ours only, and the raw after-update log-std
summaries of OFF2ON_LOG_STD_SUMMARIES, each of which has a twin with the two scalars reset that
must pass."""
OFF2ON_LOG_STD_SUMMARIES = ("updated_member_log_std", "updated_policy_std")
"""Distribution summaries of the updated actor that our learned log-std multiplier and offset move
(Adam's first step moves the offset by about -lr). Each is also compared with our two scalars put
back to 1 and 0 after the step (our side's `NAME_scalars_reset`): that check must pass, the raw one
is reported as OFF2ON_LOG_STD_DEVIATION."""


def off2on_batches(batch: dict) -> dict:
    """The three batches of one update, from make_batch's rows: the RL batch (rows 0 .. B - 1),
    the density ratio's offline rows (B .. 2B - 1) and online rows (2B .. 3B - 1)."""
    rows = len(batch["observations"]) // OFF2ON_ROWS
    part = lambda index: {name: value[index * rows:(index + 1) * rows] for name, value in batch.items()}  # noqa: E731
    rl, offline, online = part(0), part(1), part(2)
    return {**{f"rl_{name}": rl[name] for name in ("observations", "actions", "next_observations")},
            "rl_rewards": rl["rewards"][:, None], "rl_terminals": rl["dones"][:, None],
            "rl_masks": rl["masks"], "tree_idxs": np.arange(rows)[:, None],
            "offline_observations": offline["observations"], "offline_actions": offline["actions"],
            "online_observations": online["observations"], "online_actions": online["actions"]}


def off2on_cases(args: ParityArgs) -> list[dict]:
    """deterministic: every member's mean head kernel 0 and bias 0 and log-std head kernel 0 and
    bias -30 (below the -20 clip), so that the moment-matched policy is N(0, e^-20) on every row
    and a sample is tanh(0 + e^-20 noise), 0 to 1e-8; temperature e^-30; the density ratio's
    last bias 0 (about half the rows at w = 0: the ReLU and the 1e-10 terms act). The members'
    means are 0, not another common value: for equal means m the float32 mixture variance
    mean(m^2 + e^-40) - m^2 comes out 0, where the official square root's gradient is 0/0 (with
    m = 0.5 every actor leaf but the clamped log-std heads is NaN after their update); at 0 the
    e^-40 survives. The log-probabilities (entropy, temperature loss) keep the noise:
    compared in distribution. random: rlkit's own initialisation untouched, temperature 1 (all
    losses but the density ratio's in distribution)."""
    shared = {"hidden": args.hidden, "layers": 2, "ensemble_size": OFF2ON_MEMBERS, "seed": args.seed, "lr": 3e-4,
              "tau": 5e-3, "discount": 0.99, "temperature": 5.0, "keys": args.keys}
    exact_outputs = ["q", "member_mean", "member_log_std", "policy_mean", "policy_std", "w_offline", "w_online",
                     "w_rl"]
    return [{**shared, "case": "deterministic", "policy": {"mean_bias": 0.0, "log_std_bias": -30.0},
             "density": {"last_bias": 0.0}, "init_alpha": math.exp(-30.0), "outputs": exact_outputs,
             "exact": ["critic_loss", "actor_loss", "density_loss", "temperature", "td_target", "priorities"],
             "random": ["entropy", "temperature_loss"], "updated": True},
            {**shared, "case": "random", "policy": {}, "density": {}, "init_alpha": 1.0, "outputs": exact_outputs,
             "exact": ["density_loss", "temperature", "priorities"],
             "random": ["critic_loss", "actor_loss", "entropy", "temperature_loss", "td_target",
                        "log_alpha_updated", "updated_member_mean", "updated_member_log_std", "updated_policy_std",
                        "updated_q"],
             "updated": False, "updated_exact": ["density"]}]


def _dense_layers(flat: dict, prefix: str, names: list[str], transpose: bool) -> list[tuple[np.ndarray, np.ndarray]]:
    """(kernel (in, out), bias) of the named torch layers under prefix."""
    layers = []
    for name in names:
        if transpose:  # nn.Linear: weight (out, in)
            layers.append((flat[f"{prefix}/{name}/weight"].T, flat[f"{prefix}/{name}/bias"]))
        else:  # rlkit DenseLayer: weights (N, in, out), biases (N, 1, out)
            layers.append((flat[f"{prefix}/{name}/weights"], flat[f"{prefix}/{name}/biases"][:, 0]))
    return layers


def _numbered(flat: dict, prefix: str, pattern: str, start: int = 0) -> list[str]:
    """pattern.format(start), pattern.format(start + 1), ... while some leaf lies under prefix/name/."""
    names = []
    while any(path.startswith(f"{prefix}/{pattern.format(start + len(names))}/") for path in flat):
        names.append(pattern.format(start + len(names)))
    return names


def off2on_mapping(theirs: dict, fill: bool = False) -> dict:
    """Their state_dicts (CASE/init/ or CASE/updated/, flat) in our layout.

    policy/policies/i/fc_j -> actor/MLP_0/Dense_j (member i on the leading axis, weight
    transposed); last_fc (mean) and last_fc_log_std side by side -> actor/Dense_0 (mean first,
    as our one head splits); qf1 / qf2 h_{j+1} -> critic/VmapCritic_0/MLP_0/Dense_j with qf1 as
    twin 0 and qf2 as twin 1 (axis 1), `output` -> the head VmapCritic_0/Dense_0; target_qf*
    likewise -> target_critic; weight_net fc_j, last_fc -> density/Dense_j; log_alpha ->
    temperature/log_value. With `fill`, our leaves without a counterpart (OFF2ON_EXTRA_LEAVES)
    are added with the values that make ours compute theirs."""
    mapped = {}
    members = _numbered(theirs, "policy/policies", "{}")
    if members:
        per_member = [subtree(theirs, f"policy/policies/{i}") for i in members]
        for j, name in enumerate(_numbered(theirs, f"policy/policies/{members[0]}", "fc{}")):
            mapped[f"actor/MLP_0/Dense_{j}/kernel"] = np.stack([m[f"{name}/weight"].T for m in per_member])
            mapped[f"actor/MLP_0/Dense_{j}/bias"] = np.stack([m[f"{name}/bias"] for m in per_member])
        mapped["actor/Dense_0/kernel"] = np.stack([np.concatenate([m["last_fc/weight"].T, m["last_fc_log_std/weight"].T],
                                                                  -1) for m in per_member])
        mapped["actor/Dense_0/bias"] = np.stack([np.concatenate([m["last_fc/bias"], m["last_fc_log_std/bias"]])
                                                 for m in per_member])
        if fill:
            mapped.update({path: np.full(len(per_member), value, np.float32)
                           for path, value in OFF2ON_EXTRA_LEAVES.items()})
    for ours, (first, second) in (("critic", ("qf1", "qf2")), ("target_critic", ("target_qf1", "target_qf2"))):
        hidden = _numbered(theirs, first, "h{}", start=1)
        for j, name in enumerate(hidden + ["output"] if hidden else []):
            target = f"{ours}/VmapCritic_0/Dense_0" if name == "output" else f"{ours}/VmapCritic_0/MLP_0/Dense_{j}"
            (k1, b1), (k2, b2) = (_dense_layers(theirs, net, [name], False)[0] for net in (first, second))
            mapped[f"{target}/kernel"], mapped[f"{target}/bias"] = np.stack([k1, k2], 1), np.stack([b1, b2], 1)
    hidden = _numbered(theirs, "weight_net", "fc{}")
    for j, (kernel, bias) in enumerate(_dense_layers(theirs, "weight_net", hidden + ["last_fc"], True) if hidden else []):
        mapped[f"density/Dense_{j}/kernel"], mapped[f"density/Dense_{j}/bias"] = kernel, bias
    if "log_alpha" in theirs:
        mapped["temperature/log_value"] = np.asarray(theirs["log_alpha"], np.float32)
    return mapped


OFF2ON_THEIR_METRICS = {"critic_loss": ("qf1_loss", "qf2_loss"), "actor_loss": ("policy_loss",),
                        "density_loss": ("weight_loss",), "temperature": ("alpha",),
                        "temperature_loss": ("alpha_loss",), "td_target": ("q_target",),
                        "priorities": ("priorities",)}
"""Ours -> theirs (summed): `qf1_loss + qf2_loss` is our critic_loss (each sums its twin over the
members), `Log Pis Mean` our -entropy (below), `q_target` (the TD target) our td_target."""


def off2on_their(arrays: dict, prefix: str, metric: str):
    if metric == "entropy":
        return -np.asarray(arrays[f"{prefix}/log_pi"], np.float64)
    return sum(np.asarray(arrays[f"{prefix}/{name}"], np.float64)
               for name in OFF2ON_THEIR_METRICS.get(metric, (metric,)))


def off2on_our_args(case: dict, rows: int):
    from algorithms import off2on
    hidden = (case["hidden"],) * case["layers"]
    return dataclasses.replace(
        off2on.Args(), actor_hidden_dims=hidden, critic_hidden_dims=hidden, density_hidden_dims=hidden,
        ensemble_size=case["ensemble_size"], discount=case["discount"], tau=case["tau"], actor_lr=case["lr"],
        critic_lr=case["lr"], temp_lr=case["lr"], density_lr=case["lr"], init_temperature=case["init_alpha"],
        priority_temperature=case["temperature"], batch_size=rows, density_batch_size=rows, seed=case["seed"],
        # pre-training settings: unused by the fine-tuning update, needed by make_config
        pretrain_actor_lr=1e-4, cql_alpha=5.0, cql_lagrange=False, bc_steps=0, reward_scale=1.0, reward_bias=0.0,
        offline_steps=0, online_steps=1000)


class _FixedBatches:
    """While active, off2on.update's three samplers return the given rows: the prioritized draw
    gives rows 0 .. B - 1 (of a tree whose first B leaves then hold the new priorities), the
    uniform offline and newest-online draws the density batches. Only our sampling is replaced
    (it is not part of the compared update); the update's arithmetic runs as it is."""

    def __init__(self, rl: dict, offline_rows: dict, online_rows: dict):
        self.rl, self.offline_rows, self.online_rows = rl, offline_rows, online_rows

    def __enter__(self):
        import types
        import jax.numpy as jnp
        from algorithms import off2on
        from common import priorities
        self.saved = {name: getattr(off2on, name) for name in ("priorities", "buffers")}
        rows = len(self.rl["observations"])
        off2on.priorities = types.SimpleNamespace(
            sample=lambda tree, key, count: (jnp.arange(count, dtype=jnp.int32), jnp.full(count, 1.0 / rows)),
            update=priorities.update)
        off2on.buffers = types.SimpleNamespace(sample=lambda buffer, key, shape: self.offline_rows,
                                               gather_union=lambda offline, online, indices: self.rl,
                                               sample_newest=lambda online, key, count, window: self.online_rows)
        return self

    def __exit__(self, *exc):
        from algorithms import off2on
        for name, value in self.saved.items():
            setattr(off2on, name, value)


def off2on_our_side(case: dict, batches: dict, params: dict | None) -> dict:
    """Our arrays for one case, keyed as the driver keys theirs where the quantity is the same
    (params None: only init/, a fresh agent's)."""
    import jax
    import jax.numpy as jnp
    from algorithms import off2on
    from common import buffers, priorities

    rows, observation_dim = batches["rl_observations"].shape
    action_dim = batches["rl_actions"].shape[-1]
    args = off2on_our_args(case, rows)
    config = off2on.make_config(args, action_dim)
    members = off2on.create_members(args, config, observation_dim, action_dim)
    agent = off2on.fine_tuning_agent(members.actor.params, members.critic.params, args, config, observation_dim,
                                     action_dim)

    def ours(agent) -> dict:
        return {"actor": agent.actor.params, "critic": agent.critic.params, "target_critic": agent.target_critic_params,
                "temperature": agent.temperature.params, "density": agent.density.params}

    if params is None:
        return flatten({"init": ours(agent)})
    params = jax.tree_util.tree_map(jnp.asarray, params)

    agent = agent.replace(actor=fresh_state(agent.actor, params["actor"]), critic=fresh_state(agent.critic, params["critic"]),
                          temperature=fresh_state(agent.temperature, params["temperature"]),
                          density=fresh_state(agent.density, params["density"]), target_critic_params=params["target_critic"])
    rl = {"observations": batches["rl_observations"], "actions": batches["rl_actions"],
          "rewards": batches["rl_rewards"][:, 0], "masks": batches["rl_masks"],
          "next_observations": batches["rl_next_observations"]}
    rl = {name: jnp.asarray(value, jnp.float32) for name, value in rl.items()}
    offline_rows = {"observations": jnp.asarray(batches["offline_observations"]),
                    "actions": jnp.asarray(batches["offline_actions"])}
    online_rows = {"observations": jnp.asarray(batches["online_observations"]),
                   "actions": jnp.asarray(batches["online_actions"])}

    def outputs(agent) -> dict:
        q = off2on.member_q(agent.critic.params, rl["observations"], rl["actions"], config)
        means, log_stds = off2on.member_gaussians(agent.actor.params, rl["observations"], config)
        mean, std = off2on.moment_match(means, log_stds)
        w = lambda rows: config.density.apply({"params": agent.density.params}, rows["observations"],  # noqa: E731
                                              rows["actions"])
        return {"q1": q[:, 0], "q2": q[:, 1], "member_mean": means, "member_log_std": log_stds, "policy_mean": mean,
                "policy_std": std, "w_offline": w(offline_rows), "w_online": w(online_rows), "w_rl": w(rl)}

    offline = buffers.from_arrays({name: np.asarray(value) for name, value in rl.items()})
    replay = off2on.Replay(buffers.from_arrays({name: np.asarray(value) for name, value in rl.items()}),
                           priorities.from_priorities(np.ones(rows, np.float32), 2 * rows))

    def step(agent):
        updated, new_replay, info = off2on.update(agent, offline, replay, config)
        target_key = jax.random.split(agent.key, 6)[4]  # the key update's td_target draws with
        info = {**info, "td_target": off2on.td_target(target_key, rl, agent.actor.params, agent.target_critic_params,
                                                      off2on.scalar_value(agent.temperature), config),
                "priorities": new_replay.tree.leaves[:rows]}
        after = outputs(updated)
        reset = {**updated.actor.params, **{path.split("/", 1)[1]: jnp.full_like(updated.actor.params[
            path.split("/", 1)[1]], value) for path, value in OFF2ON_EXTRA_LEAVES.items()}}
        means, log_stds = off2on.member_gaussians(reset, rl["observations"], config)
        summary = {"log_alpha_updated": updated.temperature.params["log_value"],
                   "updated_member_mean": after["member_mean"].mean(),
                   "updated_member_log_std": after["member_log_std"].mean(),
                   "updated_policy_std": after["policy_std"].mean(), "updated_q": (after["q1"].mean() + after["q2"].mean()) / 2,
                   # the updated actor with log_std_multiplier 1 and log_std_offset 0 (rlkit's policy has neither)
                   "updated_member_log_std_scalars_reset": log_stds.mean(),
                   "updated_policy_std_scalars_reset": off2on.moment_match(means, log_stds)[1].mean()}
        return updated, info, summary

    arrays = {f"out/{name}": value for name, value in outputs(agent).items()}
    with _FixedBatches(rl, offline_rows, online_rows):
        update = jax.jit(step)
        updated, info, _ = update(agent.replace(key=jax.random.PRNGKey(case["seed"])))
        arrays.update(flatten({"info": info, "updated": ours(updated)}))
        draws = []
        for index in range(case["keys"]):
            _, info, summary = update(agent.replace(key=jax.random.PRNGKey(1000 + index)))
            draws.append({**{name: value.mean() for name, value in info.items()}, **summary})
    if draws:
        arrays.update({f"dist/{name}": np.stack([np.asarray(d[name]) for d in draws]) for name in draws[0]})
    return {name: np.asarray(value) for name, value in arrays.items()}


def compare_off2on(cases: list[dict], batch: dict, theirs: dict, z: float) -> list[Check]:
    """Every check of every case, from the driver's arrays. The first mapping check is strict:
    ours has leaves theirs lacks, OFF2ON_LOG_STD_DEVIATION when they are exactly
    OFF2ON_EXTRA_LEAVES and nothing else differs, a failure otherwise. The second fills those
    leaves as OFF2ON_EXTRA_LEAVES says and must pass for the rest to run. The raw after-update
    log-std summaries (OFF2ON_LOG_STD_SUMMARIES) are that deviation too; their twins with our
    two scalars reset to 1 and 0 after the step must pass."""
    batches = off2on_batches(batch)
    checks = []
    for case in cases:
        name = case["case"]
        their_case = subtree(theirs, name)
        fresh = subtree(off2on_our_side(case, batches, None), "init")
        their_init = off2on_mapping(subtree(their_case, "init"))
        strict = mapping_check("off2on", name, "parameter mapping", their_init, fresh)
        if mapping_difference(their_init, fresh) == ([], sorted(OFF2ON_EXTRA_LEAVES), []):
            strict.note += "; rlkit's TanhGaussianPolicy has a last_fc_log_std layer only, ours learns log-std = " \
                           "multiplier x head + offset"
            OFF2ON_LOG_STD_DEVIATION.mark(strict)
        checks.append(strict)
        mapped = off2on_mapping(subtree(their_case, "init"), fill=True)
        filled = mapping_check("off2on", name, "parameter mapping, our extra leaves at 1 and 0", mapped, fresh)
        checks.append(filled)
        if not filled.passed:
            continue
        ours = off2on_our_side(case, batches, unflatten(mapped))
        for output in case["outputs"]:
            for key in (("q1", "q2") if output == "q" else (output,)):
                checks.append(compare_arrays("off2on", name, f"{key} before the update", their_case[f"out/{key}"],
                                             ours[f"out/{key}"], OUTPUT_TOLERANCE))
        for metric in case["exact"]:
            checks.append(missing("off2on", name, metric, ours, "info") or compare_arrays(
                "off2on", name, metric, off2on_their(their_case, "info", metric), ours[f"info/{metric}"],
                UPDATE_TOLERANCE))
        for metric in case["random"]:
            quantity = f"{metric} (mean over keys)"
            absent = missing("off2on", name, quantity, ours, "dist", metric)
            check = absent or compare_distribution(
                "off2on", name, quantity, off2on_their(their_case, "dist", metric), ours[f"dist/{metric}"], z)
            checks.append(check)
            if metric not in OFF2ON_LOG_STD_SUMMARIES:
                continue
            if not absent:
                check.note += "; ours as updated: its log-std multiplier and offset moved by the step"
                OFF2ON_LOG_STD_DEVIATION.mark(check)
            reset = f"{metric}_scalars_reset"
            quantity = f"{metric}, our log-std multiplier and offset reset to 1 and 0 after the step (mean over keys)"
            checks.append(missing("off2on", name, quantity, ours, "dist", reset) or compare_distribution(
                "off2on", name, quantity, off2on_their(their_case, "dist", metric), ours[f"dist/{reset}"], z))
        networks = ("actor", "critic", "target_critic", "temperature", "density") if case["updated"] \
            else tuple(case.get("updated_exact", ()))
        if networks:
            updated = off2on_mapping(subtree(their_case, "updated"), fill=True)
            for network in networks:
                checks.append(compare_trees("off2on", name, f"{network} parameters after the update",
                                            subtree(updated, network), subtree(ours, f"updated/{network}"),
                                            UPDATE_TOLERANCE))
    return checks


# ---------------------------------------------------------------------------------------------
# Running the drivers


@dataclasses.dataclass(frozen=True)
class Pair:
    """One algorithm: its reference, its driver, its cases and how its checks are made."""

    reference: compare.Reference
    driver: str
    cases: Callable[[ParityArgs], list[dict]]
    compare: Callable[[list[dict], dict, dict, float], list[Check]]
    rows: int = 2
    """Rows of make_batch's batch, in batch sizes."""
    driver_batch: Callable[[dict], dict] = lambda batch: batch
    """The batch as the driver reads it."""


PAIRS = {"rlpd": Pair(REFERENCES["rlpd"], "rlpd_parity.py", rlpd_cases, compare_rlpd),
         "calql": Pair(REFERENCES["cal-ql"], "calql_parity.py", lambda args: jaxcql_cases(args, calibrated=True),
                       functools.partial(compare_jaxcql, "calql")),
         "cql": Pair(REFERENCES["cal-ql"], "calql_parity.py", lambda args: jaxcql_cases(args, calibrated=False),
                     functools.partial(compare_jaxcql, "cql")),
         "iql": Pair(REFERENCES["iql"], "iql_parity.py", iql_cases, compare_iql),
         "wsrl": Pair(REFERENCES["wsrl"], "wsrl_parity.py", wsrl_cases, compare_wsrl),
         "off2on": Pair(REFERENCES["off2on"], "off2on_parity.py", off2on_cases, compare_off2on, OFF2ON_ROWS,
                        off2on_batches)}


def driver_command(args: ParityArgs, algorithm: str, input_path: str, output_path: str) -> list[str]:
    pair = PAIRS[algorithm]
    where = compare.paths(args, pair.reference)
    return [where["python"], os.path.join(compare.REFERENCE_DIR, pair.driver), "--source", where["source"],
            "--input", input_path, "--output", output_path, "--config", json.dumps(pair.cases(args))]


def run_algorithm(args: ParityArgs, algorithm: str, folder: str) -> list[Check]:
    pair = PAIRS[algorithm]
    batch = make_batch(args.seed, pair.rows * args.batch_size, args.observation_dim, args.action_dim)
    input_path, output_path = os.path.join(folder, f"{algorithm}-in.npz"), os.path.join(folder, f"{algorithm}-out.npz")
    save(input_path, {f"batch/{name}": value for name, value in pair.driver_batch(batch).items()})
    command = driver_command(args, algorithm, input_path, output_path)
    log(f"{algorithm}: {shlex.join(command)}")
    completed = subprocess.run(command, cwd=compare.REPO, capture_output=True, text=True, timeout=args.timeout)
    if completed.returncode != 0:
        return [Check(algorithm, "-", "reference driver", "exact", None, None, "-", False,
                      f"exit code {completed.returncode}: {completed.stderr[-2000:]}")]
    return pair.compare(pair.cases(args), batch, load(output_path), args.z)


# ---------------------------------------------------------------------------------------------
# Reporting


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def summary_table(checks: list[Check]) -> str:
    """Markdown: per algorithm and kind, how many checks passed, how many are named deviations
    (failed, but a difference the algorithm file names; listed below the table), the largest
    difference and the checks that failed."""
    rows = ["| algorithm | kind | checks | passed | named deviation | largest abs. difference | failed |",
            "|---|---|---|---|---|---|---|"]
    groups = dict.fromkeys((check.algorithm, check.kind) for check in checks)
    for algorithm, kind in groups:
        group = [check for check in checks if (check.algorithm, check.kind) == (algorithm, kind)]
        gaps = [check.max_abs for check in group if check.max_abs is not None]
        failed = [f"{check.case}: {check.quantity}" for check in group if check.status == "fail"]
        named = [check for check in group if check.status == "named deviation"]
        rows.append(f"| {algorithm} | {kind} | {len(group)} | {sum(check.passed for check in group)} | "
                    f"{len(named) or '-'} | {f'{max(gaps):.2e}' if gaps else '-'} | {'; '.join(failed) or '-'} |")
    named = [check for check in checks if check.status == "named deviation"]
    if named:
        rows.append("")
        rows.append("Named deviations (not passed, not failed):")
        rows.extend(f"* {check.algorithm} {check.case}: {check.quantity} -- {check.deviation}" for check in named)
    return "\n".join(rows)


def emit(line: dict, json_out: str | None) -> None:
    text = json.dumps(line)
    print(text, flush=True)
    if json_out:
        with open(json_out, "a") as file:
            file.write(text + "\n")


def validate(args: ParityArgs) -> None:
    """Every flag check, before anything is installed or run."""
    check(args.keys >= 2, f"--keys must be at least 2 (a standard error needs two draws), got {args.keys}.")
    check(args.z > 0, f"--z must be positive, got {args.z}.")
    for name in ("batch_size", "observation_dim", "action_dim", "hidden"):
        value = getattr(args, name)
        check(value >= 1, f"--{name.replace('_', '-')} must be at least 1, got {value}.")
    check(args.timeout > 0, f"--timeout must be positive, got {args.timeout}.")


def main(args: ParityArgs) -> int:
    validate(args)
    references = list({PAIRS[name].reference.name: PAIRS[name].reference for name in args.algorithms}.values())
    if args.dry_run:
        for reference in references:
            print(f"# setup {reference.name} (skipped when {compare.paths(args, reference)['marker']} matches)")
            for command in compare.setup_steps(args, reference):
                print(shlex.join(command))
        for algorithm in args.algorithms:
            print(f"# {algorithm}: the reference driver, then our side in this process")
            print(shlex.join(driver_command(args, algorithm, f"{algorithm}-in.npz", f"{algorithm}-out.npz")))
        return 0
    for reference in references:
        compare.prepare(args, reference)
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    ours = compare.git_commit()  # our commit, and whether algorithms/, common/ or benchmarks/ differ from it
    checks = []
    with tempfile.TemporaryDirectory() as folder:
        for algorithm in args.algorithms:
            reference = PAIRS[algorithm].reference
            for result in run_algorithm(args, algorithm, folder):
                checks.append(result)
                emit({**dataclasses.asdict(result), "reference": reference.repository,
                      "reference_commit": compare.source_and_commit(args, reference)[1], "ours": ours,
                      "date": date}, args.json_out)
    print()
    print(summary_table(checks))
    return exit_code(checks)


if __name__ == "__main__":
    try:
        sys.exit(main(tyro.cli(ParityArgs)))
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
