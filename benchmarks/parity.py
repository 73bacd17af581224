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

Randomness is removed where the algorithm allows, so that it can neither hide a difference nor
raise a false alarm: the actor's log-std output layer is set to kernel 0 and a bias below the
log-std clip (every tanh-Gaussian sample is then tanh(mean) up to e^-20), the temperature to e^-30
where that isolates the critic and actor, and the critic subset to the whole ensemble.

    python benchmarks/parity.py                         # every algorithm, one JSON line per check, then a table
    python benchmarks/parity.py --algorithms rlpd --keys 200
    python benchmarks/parity.py --dry-run               # print the set-up and the driver commands only
    python benchmarks/parity.py --rlpd-source /path/to/rlpd

It is not part of the fast test suite (it installs the reference code); tests/test_parity.py
checks the mapping and the comparison on a stand-in "official" agent (ours with one deliberate
change). docs/parity.md holds the last result.
"""

from __future__ import annotations

import dataclasses
import datetime
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
from benchmarks.reference.parity_io import flatten, load, save, subtree, unflatten  # noqa: E402

OUTPUT_TOLERANCE = (1e-5, 1e-5)  # (absolute, relative): the same float32 network on the same input
UPDATE_TOLERANCE = (1e-5, 1e-4)  # one update: the same gradients summed in another order, through Adam
DEFAULT_Z = 4.0  # distribution checks: standard errors of the difference of the means


@dataclasses.dataclass
class ParityArgs:
    algorithms: tuple[Literal["rlpd"], ...] = ("rlpd",)
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


def mapping_check(algorithm: str, case: str, quantity: str, theirs: dict, ours: dict) -> Check:
    """Whether two flat trees have the same leaves with the same shapes; names the leaves that differ."""
    only_theirs = sorted(set(theirs) - set(ours))
    only_ours = sorted(set(ours) - set(theirs))
    shapes = sorted(path for path in set(theirs) & set(ours) if np.shape(theirs[path]) != np.shape(ours[path]))
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


def rename(flat: dict, renames: dict[str, str]) -> dict:
    """The flat tree with each path component renamed by `renames` (components not named stay)."""
    return {"/".join(renames.get(part, part) for part in path.split("/")): value for path, value in flat.items()}


# ---------------------------------------------------------------------------------------------
# The batch both sides get


def make_batch(seed: int, rows: int, observation_dim: int, action_dim: int) -> dict[str, np.ndarray]:
    """Random transitions with every key the official updates read (rlpd: masks and dones).
    Rewards are AntMaze's r - 1 (-1, 0 at the goal): a target whose mean is far from the initial
    Q-values, so that a term of the wrong sign in the target changes the squared TD error."""
    rng = np.random.default_rng(seed)
    masks = (rng.uniform(size=rows) > 0.2).astype(np.float32)  # some terminal rows
    return {"observations": rng.normal(size=(rows, observation_dim)).astype(np.float32),
            "actions": rng.uniform(-0.9, 0.9, (rows, action_dim)).astype(np.float32),
            "rewards": (1.0 - masks) - 1.0,
            "masks": masks, "dones": masks == 0,
            "next_observations": rng.normal(size=(rows, observation_dim)).astype(np.float32)}


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

    def fresh(state, new_params):
        return state.replace(params=new_params, opt_state=state.tx.init(new_params))

    agent = agent.replace(actor=fresh(agent.actor, params["actor"]), critic=fresh(agent.critic, params["critic"]),
                          target_critic_params=params["target_critic"],
                          temperature=fresh(agent.temperature, params["temp"]))
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
# Running the drivers


@dataclasses.dataclass(frozen=True)
class Pair:
    """One algorithm: its reference, its driver, its cases and how its checks are made."""

    reference: compare.Reference
    driver: str
    cases: Callable[[ParityArgs], list[dict]]
    compare: Callable[[list[dict], dict, dict, float], list[Check]]


PAIRS = {"rlpd": Pair(compare.REFERENCES["rlpd"], "rlpd_parity.py", rlpd_cases, compare_rlpd)}


def driver_command(args: ParityArgs, algorithm: str, input_path: str, output_path: str) -> list[str]:
    pair = PAIRS[algorithm]
    where = compare.paths(args, pair.reference)
    return [where["python"], os.path.join(compare.REFERENCE_DIR, pair.driver), "--source", where["source"],
            "--input", input_path, "--output", output_path, "--config", json.dumps(pair.cases(args))]


def run_algorithm(args: ParityArgs, algorithm: str, folder: str) -> list[Check]:
    pair = PAIRS[algorithm]
    batch = make_batch(args.seed, 2 * args.batch_size, args.observation_dim, args.action_dim)
    input_path, output_path = os.path.join(folder, f"{algorithm}-in.npz"), os.path.join(folder, f"{algorithm}-out.npz")
    save(input_path, {f"batch/{name}": value for name, value in batch.items()})
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
    """Markdown: per algorithm and kind, how many checks passed and the largest difference."""
    rows = ["| algorithm | kind | checks | passed | largest abs. difference | failed |", "|---|---|---|---|---|---|"]
    groups = dict.fromkeys((check.algorithm, check.kind) for check in checks)
    for algorithm, kind in groups:
        group = [check for check in checks if (check.algorithm, check.kind) == (algorithm, kind)]
        gaps = [check.max_abs for check in group if check.max_abs is not None]
        failed = [f"{check.case}: {check.quantity}" for check in group if not check.passed]
        rows.append(f"| {algorithm} | {kind} | {len(group)} | {len(group) - len(failed)} | "
                    f"{f'{max(gaps):.2e}' if gaps else '-'} | {'; '.join(failed) or '-'} |")
    return "\n".join(rows)


def emit(line: dict, json_out: str | None) -> None:
    text = json.dumps(line)
    print(text, flush=True)
    if json_out:
        with open(json_out, "a") as file:
            file.write(text + "\n")


def main(args: ParityArgs) -> int:
    references = [PAIRS[name].reference for name in dict.fromkeys(args.algorithms)]
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
    checks = []
    with tempfile.TemporaryDirectory() as folder:
        for algorithm in args.algorithms:
            reference = PAIRS[algorithm].reference
            for check in run_algorithm(args, algorithm, folder):
                checks.append(check)
                emit({**dataclasses.asdict(check), "reference": reference.repository,
                      "reference_commit": compare.source_and_commit(args, reference)[1], "date": date}, args.json_out)
    print()
    print(summary_table(checks))
    return 0 if all(check.passed for check in checks) else 1


if __name__ == "__main__":
    sys.exit(main(tyro.cli(ParityArgs)))
