"""Speed of this project's updates against the reference implementations, at identical shapes.

This is the command behind every "ours / theirs" speed ratio the README states. It is not run by
CI: it installs the reference code, and a full run takes tens of minutes on a CPU.

What it compares (one metric per pair, higher is faster):

  rlpd  ikostrikov/rlpd `SACLearner.update(batch, G)` (benchmarks/reference/rlpd_update.py)
        against our `rlpd.online_step` as benchmarks/speed.py times it: E=10 critics 3x256 with
        LayerNorm, G=20 critic steps per call, B=256; critic gradient steps per second.
  iql   nissymori/JAX-CORL `algos/iql.py` `update_n_times` (benchmarks/reference/jax_corl_update.py)
        against our IQL offline loop as benchmarks/offline_speed.py times it: 2x256 networks
        (JAX-CORL's default, our AntMaze preset); updates per second.
  cql   JAX-CORL `algos/cql.py` `update_n_times` against our CQL offline loop (offline_speed.py):
        3x256 actor and twin critics (our locomotion preset's shapes), 3 x 10 sampled actions,
        importance-sampled log-sum-exp; updates per second.

All at observation 29, action 8, batch 256 and a dataset of `--offline-rows` (1M) random rows
held on the device (RLPD's reference keeps its data in numpy, as its training script does).
Settings that change the computed work are matched on both sides (MATCHED below, passed on
the command lines); what the two codes do differently is listed per pair in DIFFERENCES and in
every JSON line. Learning rates and similar are matched too where both offer them, though they
do not change the work.

How it runs:
  1. Setup, once per cache folder (`--cache-dir`, default ~/.cache/o2o-compare/, outside the
     project): each reference is cloned at a pinned commit (`--rlpd-source`, `--jax-corl-source`:
     a URL or a local path or git directory) and gets its own virtual environment, holding the
     same jax, jaxlib, flax, optax and numpy versions as the interpreter running this script
     (read from it), so that a ratio compares code, not library versions, plus the reference's
     own dependencies (REFERENCES). JAX-CORL's files import d4rl, wandb and gym at top level;
     benchmarks/reference/stubs/ stands in for them, since only the update runs.
  2. Interleaved rounds (`--rounds`, 3): in each round, for each algorithm, one fresh
     subprocess times theirs and one times ours, the order alternating between rounds so that
     a slow drift of the machine does not favour one side. Each subprocess compiles (reported),
     makes one warm-up call, then times sequential calls for at least `--min-seconds` (the loop
     in benchmarks/reference/timing.py, the same for both sides).
  3. One JSON line per measurement on stdout (and appended to `--json-out`), then a Markdown
     table: per algorithm, the median and range of each side and the ratio of the medians.

    python benchmarks/compare.py                                   # 3 rounds of rlpd, iql, cql
    python benchmarks/compare.py --algorithms cql --rounds 5 --json-out compare.jsonl
    python benchmarks/compare.py --dry-run                         # print the steps and commands only
    python benchmarks/compare.py --setup-only                      # clone and install, time nothing
    python benchmarks/compare.py --rlpd-source /path/to/rlpd --jax-corl-source /path/to/JAX-CORL
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
from typing import Literal

import tyro

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE_DIR = os.path.join(REPO, "benchmarks", "reference")
PROJECT_PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy")  # pinned to this interpreter's versions


@dataclasses.dataclass(frozen=True)
class Reference:
    """A reference repository, the commit timed, and what its drivers need besides PROJECT_PACKAGES."""

    name: str
    repository: str
    url: str
    commit: str
    packages: tuple[str, ...]
    version_overrides: dict[str, str] = dataclasses.field(default_factory=dict)
    """PROJECT_PACKAGES pinned to another version because the reference does not run with ours."""


REFERENCES = {
    # The commit of the snapshot this was written against (the repository's only commit).
    # tfp-nightly: a JAX substrate that runs with jax 0.10 (tensorflow-probability 0.25, the last
    # release, fails on import there: jax.interpreters.xla.pytype_aval_mappings is gone); it is
    # also what distrax 0.1.9 requires. rlpd imports it as tensorflow_probability. gym 0.23.1: rlpd's
    # requirement (>= 0.21, < 0.24), for gym.spaces and gym.utils.seeding. ml-collections: its configs/.
    "rlpd": Reference("rlpd", "ikostrikov/rlpd", "https://github.com/ikostrikov/rlpd",
                      "c90fd4baf28c9c9ef40a81460a2e395092844f88",
                      ("tfp-nightly==0.26.0.dev20261027", "gym==0.23.1", "ml-collections==1.1.0")),
    # JAX-CORL's requirements.txt, less what only its training scripts use (d4rl, gym, mujoco-py,
    # wandb: stubbed) and its development tools; tqdm is a top-level import of the files.
    "jax-corl": Reference("jax-corl", "nissymori/JAX-CORL", "https://github.com/nissymori/JAX-CORL",
                          "d747dd8ad4fcc088ff9f1ade49a6be43a60f6556",
                          ("distrax==0.1.9", "tfp-nightly==0.26.0.dev20261027", "pydantic==2.14.3",
                           "omegaconf==2.4.0", "tqdm")),
}

ALGORITHM_REFERENCE = {"rlpd": "rlpd", "iql": "jax-corl", "cql": "jax-corl"}
METRIC = {"rlpd": "critic steps/s", "iql": "updates/s", "cql": "updates/s"}

# Settings matched on both sides: (our Args field, its value, their config field, its value); a
# field of None exists on one side only. Ours go to offline_speed.py's --set, theirs to
# jax_corl_update.py's --set, together with the batch size.
MATCHED = {
    "iql": [("hidden_dims", (256, 256), "hidden_dims", (256, 256)),
            ("expectile", 0.9, "expectile", 0.9), ("beta", 10.0, "beta", 10.0),  # our AntMaze preset
            ("discount", 0.99, "discount", 0.99), ("tau", 0.005, "tau", 0.005),
            ("actor_lr", 3e-4, "actor_lr", 3e-4), ("value_lr", 3e-4, "value_lr", 3e-4),
            ("critic_lr", 3e-4, "critic_lr", 3e-4),
            ("actor_lr_schedule", "constant", "opt_decay_schedule", False),
            ("dropout_rate", 0.0, None, None),
            (None, None, "layer_norm", False)],  # their value network's LayerNorm: ours has none
    "cql": [("actor_hidden_dims", (256, 256, 256), "hidden_dims", (256, 256, 256)),  # theirs: actor and critics
            ("critic_hidden_dims", (256, 256, 256), None, None),
            ("cql_n_actions", 10, "cql_n_actions", 10),
            ("cql_importance_sample", True, "cql_importance_sample", True),
            ("cql_temperature", 1.0, "cql_temp", 1.0), ("cql_alpha", 5.0, "cql_min_q_weight", 5.0),
            ("backup_entropy", False, "backup_entropy", False),
            ("discount", 0.99, "discount", 0.99), ("tau", 0.005, "soft_target_update_rate", 0.005),
            ("actor_lr", 1e-4, "policy_lr", 1e-4), ("critic_lr", 3e-4, "qf_lr", 3e-4),
            ("bc_steps", 0, None, None)],  # theirs: update_n_times(bc=False), its default
}
# RLPD: both sides' AntMaze settings (ours: speed.py's antmaze preset; theirs: configs/rlpd_config.py
# with the README's AntMaze command line, set in rlpd_update.py).
RLPD_SETTINGS = (["preset=antmaze", "num_qs=10", "num_min_qs=1", "hidden_dims=(256,256,256)", "critic LayerNorm",
                  "backup_entropy=False", "offline_ratio=0.5"],
                 ["configs/rlpd_config.py", "num_qs=10", "num_min_qs=1", "hidden_dims=(256,256,256)",
                  "critic_layer_norm=True", "backup_entropy=False", "offline_ratio=0.5"])
# JAX-CORL's Lagrange and max-target backup are JaxCQL's forms, which are ours under --recipe jaxcql.
CQL_RECIPE = "jaxcql"
CQL_TARGET_ACTION_GAP = 0.8  # our default; theirs defaults to 1.0 and is set to this

DIFFERENCES = {
    "rlpd": [
        "theirs gets the G x B rows as numpy arrays built on the host (drawing them is not timed, "
        "their transfer is); ours draws them inside the jitted call from on-device buffers",
        "ours' call also inserts one transition into the online buffer and samples the next action "
        "(the per-environment-step call of its training loop)",
        "theirs unrolls the G critic steps in Python inside the jit; ours runs them in a lax.scan",
    ],
    "iql": [
        "theirs runs n_jitted_updates=8 updates per jitted call, unrolled in Python; ours runs "
        "--ours-updates-per-call updates per call in a lax.scan",
        "theirs' policy mean has no tanh; ours squashes the mean with tanh (elementwise only)",
        "theirs' target critic carries its own (unused) Adam state",
        "theirs sets XLA_FLAGS=--xla_gpu_triton_gemm_any=True when imported (GPU only)",
    ],
    "cql": [
        "theirs differentiates each of its 5 losses (policy, qf1, qf2, log_alpha, alpha_prime) "
        "separately with respect to all parameters (value_and_multi_grad) and keeps each loss's "
        "own part; ours takes one gradient per loss with respect to its own parameters: the same "
        "gradients, computed differently",
        "theirs evaluates each twin critic separately on each of the 3 sampled-action sets; ours "
        "evaluates each critic once on all 3n sampled actions (parameters stacked as one vmapped "
        "ensemble, evaluated member by member)",
        "theirs runs n_jitted_updates=8 updates per jitted call, unrolled in Python; ours runs "
        "--ours-updates-per-call updates per call in a fori_loop",
        "theirs also computes the standard deviation of the sampled Q-values for its metrics",
        "theirs sets XLA_FLAGS=--xla_gpu_triton_gemm_any=True when imported (GPU only)",
    ],
}


@dataclasses.dataclass
class CompareArgs:
    rounds: int = 3
    """Interleaved rounds; each times every algorithm once per side in fresh subprocesses."""
    algorithms: tuple[Literal["rlpd", "iql", "cql"], ...] = ("rlpd", "iql", "cql")
    """Pairs to time."""
    cache_dir: str = "~/.cache/o2o-compare"
    """Where the reference checkouts and their virtual environments live (outside the project)."""
    rlpd_source: str = REFERENCES["rlpd"].url
    """ikostrikov/rlpd to clone: a URL, a local checkout or a git directory (a bare mirror)."""
    rlpd_commit: str = REFERENCES["rlpd"].commit
    """Commit of ikostrikov/rlpd to time."""
    jax_corl_source: str = REFERENCES["jax-corl"].url
    """nissymori/JAX-CORL to clone: a URL, a local checkout or a git directory."""
    jax_corl_commit: str = REFERENCES["jax-corl"].commit
    """Commit of nissymori/JAX-CORL to time."""
    observation_dim: int = 29
    """Observation size (AntMaze: 29)."""
    action_dim: int = 8
    """Action size (AntMaze: 8)."""
    batch_size: int = 256
    """Minibatch size B."""
    utd: int = 20
    """RLPD: G, critic steps per update call."""
    offline_rows: int = 1_000_000
    """Rows of the random dataset each side holds."""
    min_seconds: float = 5.0
    """Each measurement times sequential calls for at least this long (after compile and warm-up)."""
    ours_updates_per_call: int = 100
    """IQL and CQL: updates per call of our jitted offline loop."""
    cql_lagrange: bool = False
    """CQL: tune the penalty weight by Lagrange, on both sides (target gap 0.8)."""
    cql_max_target_backup: bool = False
    """CQL: max-target backup over the n sampled next actions, on both sides."""
    timeout: float = 1800.0
    """Seconds one measurement subprocess may take."""
    json_out: str | None = None
    """Also append the JSON lines to this file."""
    dry_run: bool = False
    """Print the setup steps and the measurement commands without running anything."""
    setup_only: bool = False
    """Make the reference checkouts and environments, then stop."""


# ---------------------------------------------------------------------------------------------
# Setup: checkouts and virtual environments


def installed_versions(names: tuple[str, ...] = PROJECT_PACKAGES) -> dict[str, str]:
    """Versions of `names` in this interpreter, the one that runs our side."""
    return {name: importlib.metadata.version(name) for name in names}


def source_and_commit(args, reference: Reference) -> tuple[str, str]:
    """Where to clone `reference` from and which commit: the fields `<name>_source` and
    `<name>_commit` of `args` (a CompareArgs here; benchmarks/parity.py passes its own)."""
    field = reference.name.replace("-", "_")
    return getattr(args, f"{field}_source"), getattr(args, f"{field}_commit")


def paths(args: CompareArgs, reference: Reference) -> dict[str, str]:
    root = os.path.expanduser(args.cache_dir)
    return {"root": root, "source": os.path.join(root, "src", reference.name),
            "venv": os.path.join(root, f"venv-{reference.name}"),
            "python": os.path.join(root, f"venv-{reference.name}", "bin", "python"),
            "marker": os.path.join(root, f"{reference.name}.ready.json")}


def requirements(reference: Reference) -> list[str]:
    """The reference's environment: our versions of PROJECT_PACKAGES (or its overrides), then its own."""
    versions = {**installed_versions(), **reference.version_overrides}
    return [f"{name}=={versions[name]}" for name in PROJECT_PACKAGES] + list(reference.packages)


def is_git(source: str) -> bool:
    """Whether `source` is a URL (cloned with git) or a local git checkout or git directory."""
    if not os.path.isdir(source):
        return True
    return subprocess.run(["git", "-C", source, "rev-parse", "--git-dir"], capture_output=True).returncode == 0


def setup_steps(args: CompareArgs, reference: Reference) -> list[list[str]]:
    """Commands that make the checkout and the virtual environment, in order. A local folder
    that is not a git repository is copied as it is (its commit is then taken on trust)."""
    source, commit = source_and_commit(args, reference)
    where = paths(args, reference)
    if is_git(source):
        checkout = [["git", "clone", "--quiet", "--no-checkout", source, where["source"]],
                    ["git", "-C", where["source"], "checkout", "--quiet", commit]]
    else:
        checkout = [["cp", "-R", source, where["source"]]]
    return [*checkout, [sys.executable, "-m", "venv", where["venv"]],
            [where["python"], "-m", "pip", "install", "--quiet", *requirements(reference)]]


def wanted_marker(args: CompareArgs, reference: Reference) -> dict:
    """What a ready setup must match (the commit, not where it was cloned from: the same code)."""
    return {"commit": source_and_commit(args, reference)[1], "requirements": requirements(reference),
            "python": sys.version.split()[0]}


def prepare(args: CompareArgs, reference: Reference) -> None:
    """Run setup_steps unless the cache already holds exactly this checkout and environment."""
    where = paths(args, reference)
    wanted = wanted_marker(args, reference)
    if os.path.exists(where["marker"]):
        with open(where["marker"]) as file:
            if json.load(file) == wanted:
                return
    for stale in (where["source"], where["venv"]):  # a partial or different setup: start again
        shutil.rmtree(stale, ignore_errors=True)
    os.makedirs(os.path.dirname(where["source"]), exist_ok=True)
    for command in setup_steps(args, reference):
        log(f"setup {reference.name}: {shlex.join(command)}")
        subprocess.run(command, check=True)
    with open(where["marker"], "w") as file:
        json.dump(wanted, file, indent=1)


def reference_versions(args: CompareArgs, reference: Reference) -> dict[str, str]:
    """Versions installed in the reference's environment (no JAX import)."""
    names = PROJECT_PACKAGES + tuple(package.split("==")[0] for package in reference.packages)
    code = ("import importlib.metadata as m, json, sys; "
            "print(json.dumps({n: m.version(n) for n in sys.argv[1:]}))")
    output = subprocess.run([paths(args, reference)["python"], "-c", code, *names], check=True,
                            capture_output=True, text=True).stdout
    return json.loads(output)


# ---------------------------------------------------------------------------------------------
# Measurement commands


def literal(value) -> str:
    """A value for a NAME=VALUE flag: a Python literal without spaces (one argv word); a string
    as it is (both sides read a VALUE that is not a literal as a string)."""
    return value if isinstance(value, str) else repr(value).replace(" ", "")


def cql_switches(args: CompareArgs) -> tuple[list[str], list[str]]:
    """The Lagrange and max-target-backup settings, as (ours, theirs) NAME=VALUE pairs."""
    ours = [f"recipe={CQL_RECIPE}", f"cql_lagrange={args.cql_lagrange}",
            f"max_target_backup={args.cql_max_target_backup}", f"cql_target_action_gap={CQL_TARGET_ACTION_GAP}"]
    theirs = [f"cql_lagrange={args.cql_lagrange}", f"cql_max_target_backup={args.cql_max_target_backup}",
              f"cql_target_action_gap={CQL_TARGET_ACTION_GAP}"]
    return ours, theirs


def matched_pairs(algorithm: str, args: CompareArgs) -> tuple[list[str], list[str]]:
    """NAME=VALUE settings for (ours, theirs): the batch size, MATCHED, and CQL's switches."""
    ours, theirs = [f"batch_size={args.batch_size}"], [f"batch_size={args.batch_size}"]
    for our_name, our_value, their_name, their_value in MATCHED[algorithm]:
        if our_name:
            ours.append(f"{our_name}={literal(our_value)}")
        if their_name:
            theirs.append(f"{their_name}={literal(their_value)}")
    if algorithm == "cql":
        ours_switches, theirs_switches = cql_switches(args)
        ours, theirs = ours + ours_switches, theirs + theirs_switches
    return ours, theirs


def shape_flags(args: CompareArgs) -> list[str]:
    return ["--observation-dim", str(args.observation_dim), "--action-dim", str(args.action_dim),
            "--offline-rows", str(args.offline_rows), "--min-seconds", str(args.min_seconds)]


def theirs_command(algorithm: str, args: CompareArgs) -> list[str]:
    reference = REFERENCES[ALGORITHM_REFERENCE[algorithm]]
    where = paths(args, reference)
    if algorithm == "rlpd":
        return [where["python"], os.path.join(REFERENCE_DIR, "rlpd_update.py"), "--source", where["source"],
                *shape_flags(args), "--batch-size", str(args.batch_size), "--utd", str(args.utd),
                "--hidden-dims", "256", "256", "256"]
    _, theirs = matched_pairs(algorithm, args)
    return [where["python"], os.path.join(REFERENCE_DIR, "jax_corl_update.py"), "--source", where["source"],
            "--algorithm", algorithm, *shape_flags(args), "--set", *theirs]


def ours_command(algorithm: str, args: CompareArgs) -> list[str]:
    if algorithm == "rlpd":  # the AntMaze preset: E=10, 3x256 with LayerNorm, one target critic
        return [sys.executable, os.path.join(REPO, "benchmarks", "speed.py"), "--domain", "antmaze",
                *shape_flags(args), "--batch-size", str(args.batch_size), "--utd", str(args.utd), "--calls", "1"]
    ours, _ = matched_pairs(algorithm, args)
    domain = "antmaze" if algorithm == "iql" else "locomotion"  # the presets named in the docstring
    return [sys.executable, os.path.join(REPO, "benchmarks", "offline_speed.py"), "--algorithms", algorithm,
            "--domain", domain, *shape_flags(args), "--updates", str(args.ours_updates_per_call), "--set", *ours]


def schedule(rounds: int, algorithms: tuple[str, ...]) -> list[tuple[int, str, str]]:
    """(round, algorithm, side) in run order: theirs first in odd rounds, ours first in even ones."""
    order = []
    for round_number in range(1, rounds + 1):
        sides = ("theirs", "ours") if round_number % 2 == 1 else ("ours", "theirs")
        order += [(round_number, algorithm, side) for algorithm in algorithms for side in sides]
    return order


# ---------------------------------------------------------------------------------------------
# Running and reporting


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def last_json_line(output: str) -> dict:
    """The last line of a measurement's stdout that is a JSON object (libraries may print first)."""
    for line in reversed(output.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError("no JSON line in the output")


def normalise(algorithm: str, side: str, result: dict) -> dict:
    """The fields every line shares, from whichever script measured it."""
    if side == "ours" and algorithm == "rlpd":  # speed.py
        steps, per_call = result["critic_steps_per_second"], result["utd"]
    elif side == "ours":  # offline_speed.py
        steps, per_call = result["steps_per_second"], result["updates_per_call"]
    else:  # the reference drivers
        steps, per_call = result["steps_per_second"], result["steps_per_call"]
    fields = {"steps_per_second": steps, "steps_per_call": per_call, "compile_seconds": result["compile_seconds"],
              "timed_calls": result["timed_calls"], "timed_seconds": result["timed_seconds"],
              "device": result["device"]}
    if "settings" in result:  # a reference driver: the reference's whole configuration
        fields["reference_config"] = result["settings"]
    return fields


def measure(command: list[str], timeout: float) -> dict:
    """Run one measurement subprocess from the repository root; its JSON result."""
    completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if completed.returncode != 0:
        raise RuntimeError(f"exit code {completed.returncode}: {completed.stderr[-3000:]}")
    return last_json_line(completed.stdout)


def git_commit() -> dict:
    """Our commit, and whether the code timed differs from it."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    changed = subprocess.run(["git", "status", "--porcelain", "--", "algorithms", "common", "benchmarks"],
                             cwd=REPO, capture_output=True, text=True).stdout.strip()
    return {"commit": head, "uncommitted_changes": bool(changed)}


def shapes(algorithm: str, args: CompareArgs) -> dict:
    sizes = {"observation_dim": args.observation_dim, "action_dim": args.action_dim,
             "batch_size": args.batch_size, "offline_rows": args.offline_rows}
    return {**sizes, "utd": args.utd} if algorithm == "rlpd" else sizes


def record(round_number: int, algorithm: str, side: str, command: list[str], outcome: dict, context: dict) -> dict:
    """One JSON line: the measurement (or its error) and everything needed to reproduce it."""
    reference = REFERENCES[ALGORITHM_REFERENCE[algorithm]]
    if algorithm == "rlpd":
        ours_settings, theirs_settings = RLPD_SETTINGS
    else:
        ours_settings, theirs_settings = matched_pairs(algorithm, context["args"])
    theirs_commit = {"repository": reference.repository, "commit": source_and_commit(context["args"], reference)[1]}
    return {"side": side, "algorithm": algorithm, "round": round_number, "metric": METRIC[algorithm],
            **outcome, "shapes": shapes(algorithm, context["args"]),
            "settings": {"ours": ours_settings, "theirs": theirs_settings},
            "differences": DIFFERENCES[algorithm],
            "versions": {"ours": context["ours_versions"], "theirs": context["versions"].get(reference.name)},
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": {"ours": context["ours_commit"], "theirs": theirs_commit},
            "command": shlex.join(command)}


def number(value: float) -> str:
    return f"{value:.1f}" if value < 1000 else f"{value:.0f}"


def side_summary(values: list[float]) -> str:
    if not values:
        return "n/a"
    return f"{number(statistics.median(values))} ({number(min(values))}-{number(max(values))}), n={len(values)}"


def ratio_table(lines: list[dict]) -> str:
    """Markdown: per algorithm, theirs' and ours' median (range) and the ratio of the medians."""
    rows = ["| algorithm | metric | theirs: median (range) | ours: median (range) | ours / theirs | "
            "compile s, theirs / ours (median) |", "|---|---|---|---|---|---|"]
    algorithms = list(dict.fromkeys(line["algorithm"] for line in lines))
    for algorithm in algorithms:
        def values(side, key="steps_per_second"):
            return [line[key] for line in lines if line["algorithm"] == algorithm and line["side"] == side
                    and line.get(key) is not None]
        theirs, ours = values("theirs"), values("ours")
        ratio = f"{statistics.median(ours) / statistics.median(theirs):.2f}" if theirs and ours else "n/a"
        compiles = [f"{statistics.median(v):.1f}" if v else "n/a"
                    for v in (values("theirs", "compile_seconds"), values("ours", "compile_seconds"))]
        reference = REFERENCES[ALGORITHM_REFERENCE[algorithm]].repository
        rows.append(f"| {algorithm} ({reference}) | {METRIC[algorithm]} | {side_summary(theirs)} | "
                    f"{side_summary(ours)} | {ratio} | {compiles[0]} / {compiles[1]} |")
    return "\n".join(rows)


def emit(line: dict, json_out: str | None) -> None:
    text = json.dumps(line)
    print(text, flush=True)
    if json_out:
        with open(json_out, "a") as file:
            file.write(text + "\n")


def dry_run(args: CompareArgs, references: list[Reference]) -> None:
    for reference in references:
        print(f"# setup {reference.name} (skipped when {paths(args, reference)['marker']} matches)")
        for command in setup_steps(args, reference):
            print(shlex.join(command))
    for round_number, algorithm, side in schedule(args.rounds, args.algorithms):
        command = theirs_command(algorithm, args) if side == "theirs" else ours_command(algorithm, args)
        print(f"# round {round_number}, {algorithm}, {side}")
        print(shlex.join(command))


def main(args: CompareArgs) -> int:
    references = [REFERENCES[name] for name in dict.fromkeys(ALGORITHM_REFERENCE[a] for a in args.algorithms)]
    if args.dry_run:
        dry_run(args, references)
        return 0
    for reference in references:
        prepare(args, reference)
    if args.setup_only:
        return 0
    context = {"args": args, "ours_versions": installed_versions(), "ours_commit": git_commit(),
               "versions": {reference.name: reference_versions(args, reference) for reference in references}}
    lines, failures = [], 0
    for round_number, algorithm, side in schedule(args.rounds, args.algorithms):
        command = theirs_command(algorithm, args) if side == "theirs" else ours_command(algorithm, args)
        log(f"round {round_number}, {algorithm}, {side}: {shlex.join(command)}")
        try:
            outcome = normalise(algorithm, side, measure(command, args.timeout))
        except (RuntimeError, ValueError, KeyError, subprocess.TimeoutExpired) as error:
            failures += 1
            outcome = {"steps_per_second": None, "error": str(error)[-3000:]}
            log(f"  failed: {outcome['error']}")
        line = record(round_number, algorithm, side, command, outcome, context)
        lines.append(line)
        emit(line, args.json_out)
    print()
    print(ratio_table(lines))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(tyro.cli(CompareArgs)))
