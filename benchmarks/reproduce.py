"""Reproduce a paper table with one command: runs on this machine or a SLURM cluster, then a report.

  python benchmarks/reproduce.py list                                  # the tables, run counts, time estimates
  python benchmarks/reproduce.py run rlpd-antmaze --seeds 10 --jobs 2  # every run of a table on this machine
  python benchmarks/reproduce.py run rlpd-antmaze --dry-run            # print every command, run nothing
  python benchmarks/reproduce.py run calql-antmaze --slurm --partition gpu --gpus-per-run 1
  python benchmarks/reproduce.py report rlpd-antmaze                   # Markdown + CSV table, learning curves

A table is a small TOML file in benchmarks/tables/ (or any path given as TABLE): the algorithm,
datasets, step counts and flags, and the published numbers with their provenance (paper, table or
figure, arXiv version). Where a number was not found, the file says so (`published_missing`).

Every run is one call of an algorithm script, exactly as a user would type it, in its own slot
folder: `{root}/{table}/{env}/seed{N}/`, which holds the script's run folder (config.json,
evaluations.jsonl, checkpoints/latest.msgpack) and `reproduce.log` (the script's output). A slot's
state is read from the run folder alone (common/run.py): a checkpoint whose `progress.finished`
is true is done and skipped; any other checkpoint is resumed with `--resume RUN_DIR`; a run folder
with no checkpoint yet (killed within its first minutes) is moved to `.abandoned/` and started
afresh. So running the same command again after a crash, a Ctrl-C or a pre-emption finishes the
interrupted runs and redoes nothing (wsrl.py and off2on.py pre-train inside their own run folder,
which resumes as any other). A slot records the command it was started with
(`command.json`); a table whose flags have changed since refuses to mix the two.

Runs that a SIGTERM / SIGINT stops (the runner forwards them to its children, and a child whose
runner dies gets a SIGTERM on Linux) write a checkpoint first, within seconds. On SLURM, jobs are
one job array (one task per run) submitted with submitit: `--time` as HH:MM:SS (at least 5
minutes), `--requeue`, and `--signal=USR2@90` without `B:`, so SLURM's warning 90 s before the
limit reaches every process of the step, the training script included, which checkpoints on
SIGUSR2 as on SIGTERM and exits 3; submitit's handler (`SlotJob.checkpoint`) waits for that exit
and requeues the task, which resumes the slot. Pre-emption (`scontrol requeue`) is SIGTERM to the
step: the script checkpoints, SLURM requeues. Each slot's reproduce.log says where each segment
started and why it ended. A second `run --slurm` of a table skips the slots that still have a
queued or running task (`submissions.jsonl` beside submitit's files, and `squeue`); sbatch
refusals end in one `error:` line naming the flag to change. The tests on a real one-node SLURM
(benchmarks/local_slurm.py) are `pytest -m slurm tests/test_slurm.py`; docs/slurm.md.

The report reads only run folders. Per dataset: the final normalized score (the last evaluation
of each finished run) as mean and standard error over seeds, and the interquartile mean with a
95% percentile interval from a stratified bootstrap (resampling seeds within each dataset;
computed with numpy as in rliable, which is not a dependency: `pip install rliable` resolves
pandas 3, with which its `arch` dependency fails to import), beside the published number.
Unfinished runs are listed as such and never averaged in.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import fcntl
import io
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TABLES_DIR = REPO / "benchmarks" / "tables"
DEFAULT_ROOT = "runs/reproduce"
CONFIG_FILE = "config.json"  # as written by common/logger.py
EVALUATIONS_FILE = "evaluations.jsonl"
CHECKPOINT_FILE = os.path.join("checkpoints", "latest.msgpack")
COMMAND_FILE = "command.json"
LOG_FILE = "reproduce.log"
EXIT_STOPPED = 3  # common/cli.py: stopped by a signal after writing its checkpoint

# The one place where a table's two lengths become flags: algorithm -> (flag of `offline_steps`,
# flag of `online_steps`). A table keeps the same two fields for every algorithm; what they mean
# is each script's: offline gradient updates then environment steps, except
#   wsrl:   offline_steps = the updates of its Cal-QL / CQL pre-training, online_steps = fine-tuning
#           environment steps;
#   off2on: offline_steps = pre-training updates of each of the N CQL agents (all N in one vmapped
#           update), online_steps = fine-tuning environment steps (a multiple of --epoch-steps, 1000).
STEP_FLAGS: dict[str, tuple[str, str]] = {
    "rlpd": ("--offline-steps", "--online-steps"),
    "iql": ("--offline-steps", "--online-steps"),
    "cql": ("--offline-steps", "--online-steps"),
    "calql": ("--offline-steps", "--online-steps"),
    "wsrl": ("--offline-steps", "--online-steps"),
    "off2on": ("--offline-steps", "--online-steps"),
}
ALGORITHMS = tuple(STEP_FLAGS)
# Flags a table may not set: the runner sets them (or, --pretrained, a table runs from scratch).
RUNNER_FLAGS = ("--env", "--seed", "--log-dir", "--resume", "--progress", "--pretrained",
                *sorted({flag for flags in STEP_FLAGS.values() for flag in flags}))

# Measured update throughput on this project's 2-core CPU (docs/speed.md), steps per second of each
# phase: (algorithm, domain) -> (offline steps/s, online steps/s, where it was measured). No GPU
# figure exists yet: the GPU column of `list` says so instead of guessing.
CPU_RATES: dict[tuple[str, str], tuple[float | None, float | None, str]] = {
    ("rlpd", "antmaze"): (None, 2.5, "docs/speed.md: E=10 3x256 G=20, 2.5 env steps/s"),
    ("rlpd", "locomotion"): (None, 4.3, "docs/speed.md: E=10 2x256 G=20, 4.3 env steps/s"),
    ("iql", "antmaze"): (144.0, None, "docs/speed.md offline updates: 144 updates/s"),
    ("cql", "antmaze"): (5.2, None, "docs/speed.md offline updates: 5.2 updates/s"),
    ("calql", "antmaze"): (5.0, None, "docs/speed.md offline updates: 5.0 updates/s"),
    ("iql", "pointmaze"): (134.0, 134.0, "docs/algorithms/iql.md no-argument run: 40k + 40k steps of the pointmaze preset in 9 min 56 s"),
    ("off2on", "locomotion"): (1.6, 15.4, "docs/algorithms/off2on.md speed: 1.6 vmapped updates of 5 CQL members/s, 15.4 env steps/s"),
}


class ReproduceError(Exception):
    """A problem the user can fix; printed alone, exit code 2."""


# --------------------------------------------------------------------------------------------
# Tables


@dataclasses.dataclass
class Table:
    name: str
    title: str
    algorithm: str
    seeds: int
    offline_steps: int
    online_steps: int
    flags: list[str]
    evaluation: str
    comparable: bool
    successor_note: str
    source: dict[str, str]
    reference_source: dict[str, str] | None
    runs: list[dict[str, Any]]
    path: Path
    aggregate: dict[str, Any] | None = None  # [aggregate]: the paper's number over several tasks, where it has one

    @property
    def runnable(self) -> list[dict[str, Any]]:
        """The rows that can run today: not those whose dataset has no successor yet (`dataset_missing`)."""
        return [run for run in self.runs if not run.get("dataset_missing")]


SOURCE_FIELDS = ("paper", "arxiv", "arxiv_version", "table")


def table_paths() -> list[Path]:
    return sorted(TABLES_DIR.glob("*.toml"))


def load_table(name: str) -> Table:
    """A table by name (benchmarks/tables/NAME.toml) or by path, checked field by field."""
    path = Path(name)
    if not (path.suffix == ".toml" and path.is_file()):
        path = TABLES_DIR / f"{name}.toml"
    if not path.is_file():
        known = ", ".join(p.stem for p in table_paths())
        raise ReproduceError(f"no table {name!r}; known tables: {known} (or give a path to a .toml file).")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise ReproduceError(f"cannot read {path}: {error}") from None
    problems = table_problems(data)
    if problems:
        raise ReproduceError(f"{path}: " + "; ".join(problems))
    return Table(name=data["name"], title=data["title"], algorithm=data["algorithm"], seeds=int(data["seeds"]),
                 offline_steps=int(data["offline_steps"]), online_steps=int(data["online_steps"]),
                 flags=[str(flag) for flag in data.get("flags", [])], evaluation=data["evaluation"],
                 comparable=bool(data["comparable"]), successor_note=data.get("successor_note", "").strip(),
                 source=data["source"], reference_source=data.get("reference_source"), runs=data["runs"], path=path,
                 aggregate=data.get("aggregate"))


def table_problems(data: dict[str, Any]) -> list[str]:
    """What a table file lacks: every published number needs its provenance, every run either a
    published number or the reason there is none."""
    problems = []
    for key in ("name", "title", "algorithm", "seeds", "offline_steps", "online_steps", "evaluation", "comparable",
                "source", "runs"):
        if key not in data:
            problems.append(f"missing field {key!r}")
    if problems:
        return problems
    if data["algorithm"] not in ALGORITHMS:
        problems.append(f"algorithm {data['algorithm']!r} is not one of {', '.join(ALGORITHMS)}")
    for field in SOURCE_FIELDS:
        if not str(data["source"].get(field, "")).strip():
            problems.append(f"[source] lacks {field!r} (write 'not checked' or 'not found' rather than leave it out)")
    if not data["comparable"] and not data.get("successor_note", "").strip():
        problems.append("comparable = false needs a successor_note saying what differs")
    for flag in data.get("flags", []):
        if str(flag).split("=")[0] in RUNNER_FLAGS:
            problems.append(f"flags may not set {flag}: the runner sets it")
    if not data["runs"]:
        problems.append("no runs")
    elif all(str(run.get("dataset_missing", "")).strip() for run in data["runs"]):
        problems.append("every run has 'dataset_missing': nothing to run")
    envs = [run.get("env") for run in data["runs"]]
    if len(set(envs)) != len(envs):
        problems.append("an env is listed twice")
    for run in data["runs"]:
        if "env" not in run:
            problems.append("a run lacks 'env'")
            continue
        has_number = isinstance(run.get("published"), (int, float))
        has_reason = bool(str(run.get("published_missing", "")).strip())
        if has_number == has_reason:
            problems.append(f"run {run['env']}: give exactly one of 'published' (a number) or 'published_missing' (why)")
        if "dataset_missing" in run:
            if not str(run["dataset_missing"]).strip():
                problems.append(f"run {run['env']}: 'dataset_missing' must say which dataset is needed and why it is missing")
        if any(key.startswith("reference") for key in run) and not data.get("reference_source"):
            problems.append(f"run {run['env']}: a reference number needs a [reference_source]")
    return problems


def domain_of(env: str) -> str:
    """The domain as common.datasets names it (for time estimates only; the script decides)."""
    lowered = env.lower()
    for domain in ("antmaze", "pointmaze", "kitchen"):
        if domain in lowered:
            return domain
    if any(task in lowered for task in ("pen", "door", "hammer", "relocate")):
        return "adroit"
    return "locomotion"


def cpu_hours(table: Table, env: str) -> float | None:
    """Hours of one run on this project's 2-core CPU, from measured throughput; None where not measured."""
    offline_rate, online_rate, _ = CPU_RATES.get((table.algorithm, domain_of(env)), (None, None, ""))
    if table.algorithm in ("iql", "cql", "calql") and online_rate is None:
        online_rate = offline_rate  # one update per environment step online; the env step is not counted
    seconds = 0.0
    for steps, rate in ((table.offline_steps, offline_rate), (table.online_steps, online_rate)):
        if steps:
            if rate is None:
                return None
            seconds += steps / rate
    return seconds / 3600


def hour_text(hours: float) -> str:
    return f"{hours:.2f}" if hours < 1 else f"{hours:.1f}" if hours < 10 else f"{hours:.0f}"


def list_tables(out=sys.stdout) -> None:
    rows = [("table", "algorithm", "datasets", "seeds", "runs", "steps (offline + online)", "CPU h / run",
             "CPU h total", "GPU h", "published numbers", "comparable")]
    for path in table_paths():
        table = load_table(str(path))
        hours = [cpu_hours(table, run["env"]) for run in table.runnable]
        per_run = "not measured" if None in hours else (f"{hour_text(min(hours))}-{hour_text(max(hours))}"
                                               if min(hours) != max(hours) else hour_text(hours[0]))
        total = "not measured" if None in hours else hour_text(sum(hours) * table.seeds)
        missing = len(table.runs) - len(table.runnable)
        found = sum(isinstance(run.get("published"), (int, float)) for run in table.runs)
        rows.append((table.name, table.algorithm, str(len(table.runnable)) + (f" (+{missing} no data)" if missing else ""),
                     str(table.seeds), str(len(table.runnable) * table.seeds), f"{table.offline_steps:,} + {table.online_steps:,}",
                     per_run, total, "not measured", f"{found}/{len(table.runs)}", "yes" if table.comparable else "no"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for index, row in enumerate(rows):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip(), file=out)
        if index == 0:
            print("  ".join("-" * width for width in widths), file=out)
    print("\nCPU hours: this project's 2-core CPU at the throughput measured in docs/speed.md; \"not measured\" "
          "where no figure exists (none is guessed). IQL, CQL and Cal-QL online steps are counted at their offline update rate (environment steps "
          "and evaluations left out), so their figures are lower bounds.\nGPU hours: not measured on a GPU yet; none is guessed.\n"
          "runs = datasets x the table's default seed count (`run --seeds N` changes it). \"+N no data\": rows of "
          "the paper whose dataset has no successor yet (`dataset_missing` in the table); they are not run.", file=out)


# --------------------------------------------------------------------------------------------
# Slots: one folder per (table, dataset, seed), holding the script's run folder


def env_key(env: str) -> str:
    return env.replace("/", "-")


def slot_dir(root: str | Path, table: Table, env: str, seed: int) -> Path:
    """Absolute, because the scripts run from the repository root whatever the caller's folder."""
    return Path(root).absolute() / table.name / env_key(env) / f"seed{seed}"


def fresh_command(table: Table, env: str, seed: int, slot: Path) -> list[str]:
    """What a user would type for this run (the script path relative to the repository root)."""
    offline_flag, online_flag = STEP_FLAGS[table.algorithm]
    return ["python", f"algorithms/{table.algorithm}.py", "--env", env, "--seed", str(seed),
            offline_flag, str(table.offline_steps), online_flag, str(table.online_steps),
            *table.flags, "--log-dir", str(slot), "--progress", "False"]


def resume_command(table: Table, run_dir: Path) -> list[str]:
    return ["python", f"algorithms/{table.algorithm}.py", "--resume", str(run_dir), "--progress", "False"]


def run_folders(slot: Path, algorithm: str | None = None) -> list[Path]:
    """The run folders in a slot; with `algorithm`, only that script's."""
    if not slot.is_dir():
        return []
    return sorted(path for path in slot.iterdir() if path.is_dir() and (path / CONFIG_FILE).is_file()
                  and (algorithm is None or path.name.startswith(f"{algorithm}__")))


def read_progress(run_dir: Path) -> dict[str, Any] | None:
    """The `progress` entry of a run's checkpoint, read without loading its arrays (the agent and
    the online buffer are skipped over in the msgpack stream); None when there is no checkpoint."""
    import msgpack

    path = run_dir / CHECKPOINT_FILE
    if not path.is_file():
        return None
    try:
        with open(path, "rb") as file:
            unpacker = msgpack.Unpacker(file, raw=False, max_buffer_size=2**31 - 1)
            for _ in range(unpacker.read_map_header()):
                key = unpacker.unpack()
                if key == "progress":
                    return dict(unpacker.unpack())
                unpacker.skip()
    except Exception as error:  # a damaged file: report it, do not guess
        raise ReproduceError(f"cannot read the checkpoint of {run_dir}: {error}") from None
    raise ReproduceError(f"the checkpoint of {run_dir} has no progress entry; is it a run of this project?")


@dataclasses.dataclass
class SlotState:
    status: str  # "done", "interrupted" (has a checkpoint), "pending" (nothing to resume)
    run_dir: Path | None = None
    step: int = 0


def slot_state(slot: Path, algorithm: str | None = None) -> SlotState:
    """What a slot's run folders (of `algorithm`) say: finished, resumable from a checkpoint, or to be started."""
    best = SlotState("pending")
    for run_dir in run_folders(slot, algorithm):
        progress = read_progress(run_dir)
        if progress is None:
            continue
        step = int(progress.get("offline_step", 0)) + int(progress.get("online_step", 0))
        if progress.get("finished"):
            return SlotState("done", run_dir, step)
        if best.status == "pending" or step > best.step:
            best = SlotState("interrupted", run_dir, step)
    return best


@dataclasses.dataclass
class Task:
    table: Table
    env: str
    seed: int
    slot: Path

    def state(self) -> SlotState:
        return slot_state(self.slot, self.table.algorithm)

    def command(self, state: SlotState | None = None) -> list[str] | None:
        state = state or self.state()
        if state.status == "done":
            return None
        if state.status == "interrupted":
            return resume_command(self.table, state.run_dir)
        return fresh_command(self.table, self.env, self.seed, self.slot)

    def describe(self, state: SlotState | None = None) -> str:
        """The slot's state in words (dry run)."""
        state = state or self.state()
        return state.status + (f" (step {state.step})" if state.run_dir else "")

    def check_settings(self) -> None:
        """A slot started with other settings (the table changed since) is not silently mixed in."""
        path = self.slot / COMMAND_FILE
        if path.is_file():
            recorded = json.loads(path.read_text())["command"]
            wanted = fresh_command(self.table, self.env, self.seed, self.slot)
            if recorded != wanted:
                raise ReproduceError(
                    f"{self.slot} was started with other settings:\n  {shlex.join(recorded)}\nnow:\n  "
                    f"{shlex.join(wanted)}\nUse another --root, or remove that folder to start it again.")


def tasks_for(table: Table, seeds: int, root: str | Path) -> list[Task]:
    return [Task(table, run["env"], seed, slot_dir(root, table, run["env"], seed))
            for run in table.runnable for seed in range(seeds)]


def _die_with_parent() -> None:
    """In the child: SIGTERM when the runner dies (Linux), so an orphaned run checkpoints and stops."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class SlotBusy(Exception):
    pass


STOP_REASONS = {"SIGTERM": "pre-empted or cancelled (SIGTERM: scontrol requeue, pre-emption, scancel, the runner)",
                "SIGUSR2": "time limit (SIGUSR2, SLURM's warning before it)",
                "SIGUSR1": "time limit (SIGUSR1, the scheduler's warning before it)",
                "SIGINT": "interrupted (SIGINT)"}


def log_line(task: Task, text: str) -> None:
    """One `[reproduce]` line in the slot's reproduce.log (with the SLURM job, where there is one)."""
    job = (f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}"
           if "SLURM_ARRAY_JOB_ID" in os.environ else os.environ.get("SLURM_JOB_ID"))  # (one run: no array)
    where = f" [SLURM job {job}, restart {os.environ.get('SLURM_RESTART_COUNT', '0')}]" if job else ""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    with open(task.slot / LOG_FILE, "a") as log:
        log.write(f"[reproduce] {stamp} UTC{where} {text}\n")


def segment_start(task: Task, state: SlotState, command: list[str]) -> str:
    if "--resume" in command:
        run_dir = Path(command[command.index("--resume") + 1])
        progress = read_progress(run_dir) or {}
        step = int(progress.get("offline_step", 0)) + int(progress.get("online_step", 0))
        return f"segment starts: resuming {run_dir.name} from its checkpoint at step {step}"
    return "segment starts: a fresh run"


def segment_end(task: Task, code: int) -> str:
    """Why a segment ended, in words: the exit code, and for a stop the signal the script names."""
    if code == 0:
        return "segment ended: finished"
    if code == EXIT_STOPPED:
        tail = (task.slot / LOG_FILE).read_text()[-4000:]
        names = [name for name in STOP_REASONS if f"stopped by {name}" in tail]
        state = task.state()
        reason = STOP_REASONS[max(names, key=lambda name: tail.rindex(f"stopped by {name}"))] if names else "stopped by a signal"
        return f"segment ended: {reason}; checkpoint at step {state.step}"
    if code < 0:
        return f"segment ended: failure (killed by {signal.Signals(-code).name}, no checkpoint written by it)"
    return f"segment ended: failure (exit code {code})"


def execute(task: Task, env: dict[str, str] | None = None, on_start=None) -> int:
    """Run (or resume) one slot's script to its end, holding the slot's lock; returns its exit
    code (0 finished, 3 stopped by a signal after its checkpoint). `on_start(process)` sees the
    child. reproduce.log gets the script's output and, per segment, where it started and why it ended."""
    task.slot.mkdir(parents=True, exist_ok=True)
    lock = open(task.slot / ".lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise SlotBusy(f"{task.slot} is being run by another process") from None
    try:
        task.check_settings()
        previous = None
        while True:  # normally one segment; the loop guards a run that exits 0 unfinished
            state = task.state()
            if state.status == "done":
                return 0
            if state.status == "pending":  # killed before its first checkpoint: nothing to resume
                abandoned = run_folders(task.slot, task.table.algorithm)
                if abandoned:
                    (task.slot / ".abandoned").mkdir(exist_ok=True)
                    for run_dir in abandoned:
                        run_dir.rename(task.slot / ".abandoned" / run_dir.name)
                    log_line(task, f"moved to .abandoned/ (no checkpoint to resume): {', '.join(d.name for d in abandoned)}")
                (task.slot / COMMAND_FILE).write_text(json.dumps(
                    {"command": fresh_command(task.table, task.env, task.seed, task.slot)}, indent=1))
            command = task.command(state)
            if command == previous:  # it ended well but did not move the slot on: do not loop
                log_line(task, f"{command[1]} exited 0 without finishing this slot; stopping.")
                return 1
            log_line(task, segment_start(task, state, command))
            with open(task.slot / LOG_FILE, "a") as log:
                log.write(f"$ {shlex.join(command)}\n")
                log.flush()
                process = subprocess.Popen([sys.executable, *command[1:]], cwd=REPO, stdout=log,
                                           stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                           preexec_fn=_die_with_parent,
                                           pass_fds=(lock.fileno(),))  # an orphaned child keeps the slot locked
                if on_start is not None:
                    on_start(process)
                code = process.wait()
            log_line(task, segment_end(task, code))
            if code != 0:
                return code
            previous = command
    finally:
        lock.close()


def prepare_datasets(tasks: list[Task], out=sys.stdout) -> None:
    """Load each unfinished dataset once, one at a time, before runs start side by side: the first
    use of a dataset downloads it (Minari) or builds it (local/...), and two runs doing that at
    once would race for the same folder. On SLURM this happens on the submitting machine."""
    envs = list(dict.fromkeys(task.env for task in tasks if task.state().status != "done"))
    for env in envs:
        print(f"[dataset] {env}", file=out, flush=True)
        code = ("import sys\nfrom common import datasets\nfrom common.cli import UserError\ntry:\n"
                "    task = datasets.resolve(sys.argv[1])\n"
                "    if task.dataset_id is not None: datasets.load_dataset(task)\n"
                "except UserError as error:\n    sys.exit(str(error))")
        result = subprocess.run([sys.executable, "-c", code, env], cwd=REPO, capture_output=True, text=True)
        if result.returncode != 0:
            raise ReproduceError(f"cannot load the dataset of --env {env}:\n{result.stderr.strip()}")


def detect_gpus() -> list[str]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [gpu for gpu in visible.split(",") if gpu.strip()]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [str(index) for index, line in enumerate(line for line in listing.splitlines() if line.startswith("GPU"))]


def run_local(tasks: list[Task], jobs: int, gpus: list[str], out=sys.stdout) -> dict[str, int]:
    """Run the unfinished tasks, `jobs` at a time (worker w on GPU w mod len(gpus), if any).
    SIGINT / SIGTERM: no new run starts, running ones get SIGTERM (they checkpoint), then exit."""
    todo = [task for task in tasks if task.state().status != "done"]
    counts = {"done before": len(tasks) - len(todo), "finished": 0, "stopped": 0, "failed": 0, "busy": 0}
    queue, lock = list(todo), threading.Lock()
    children: set[subprocess.Popen] = set()
    stopping = threading.Event()

    def stop(number, frame):
        stopping.set()
        print(f"\n{signal.Signals(number).name}: stopping the running runs (they write a checkpoint); "
              f"run the same command again to continue.", file=out, flush=True)
        with lock:
            for child in children:
                if child.poll() is None:
                    child.send_signal(signal.SIGTERM)

    def worker(index: int) -> None:
        env = {"CUDA_VISIBLE_DEVICES": gpus[index % len(gpus)]} if gpus else {}
        if gpus and jobs > len(gpus):  # runs share a GPU: JAX must not take 75% of its memory each
            env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
        while not stopping.is_set():
            with lock:
                if not queue:
                    return
                task = queue.pop(0)

            def started(process):
                with lock:
                    children.add(process)
                    if stopping.is_set():
                        process.send_signal(signal.SIGTERM)

            print(f"[start] {task.slot}", file=out, flush=True)
            try:
                code = execute(task, env, started)
            except SlotBusy as busy:
                print(f"[busy] {busy}", file=out, flush=True)
                with lock:
                    counts["busy"] += 1
                continue
            outcome = "finished" if code == 0 else "stopped" if code == EXIT_STOPPED else "failed"
            with lock:
                counts[outcome] += 1
            detail = "" if code in (0, EXIT_STOPPED) else f" (exit code {code}; see {task.slot / LOG_FILE})"
            print(f"[{outcome}] {task.slot}{detail}", file=out, flush=True)

    previous = {number: signal.signal(number, stop) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        threads = [threading.Thread(target=worker, args=(index,), daemon=True) for index in range(max(1, jobs))]
        for thread in threads:
            thread.start()
        for thread in threads:
            while thread.is_alive():
                thread.join(0.2)
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    return counts


# --------------------------------------------------------------------------------------------
# SLURM (submitit)


def _submitit():
    try:
        import submitit
    except ImportError:
        raise ReproduceError("--slurm needs submitit: pip install submitit") from None
    return submitit


WARNING_SECONDS = 90  # SLURM's USR2 this long before the time limit (submitit's default signal delay)
CHECKPOINT_WAIT_SECONDS = 75  # what the warning leaves for the run's checkpoint, before submitit requeues
MIN_TIME_MINUTES = 5  # a time limit must leave room for start-up, some training, the warning and the checkpoint
SUBMISSIONS_FILE = "submissions.jsonl"  # in the table's slurm folder: job id -> the slot of each array task


class SlotJob:
    """One run as a submitit job.

    SLURM's warning ahead of the time limit is `--signal=USR2@90` without `B:`: SLURM sends SIGUSR2
    to every process of the job step, so the training script gets it directly (it stops like on
    SIGTERM: checkpoint within seconds, exit code 3), and so does submitit's process, which calls
    `checkpoint` here: it forwards SIGUSR2 to the script (for a signal sent to submitit alone),
    waits for the script's own exit, and returns this job for submitit to requeue; the requeued
    task resumes the slot. Pre-emption (`scontrol requeue`, a higher-priority job) is SIGTERM to
    every process of the step: the script checkpoints and exits 3, SLURM requeues the task."""

    def __init__(self, task: Task):
        self.task = task
        self._process = None

    def __call__(self) -> str:
        code = execute(self.task, on_start=lambda process: setattr(self, "_process", process))
        self._process = None
        if code == EXIT_STOPPED:
            return "stopped"
        if code != 0:
            raise RuntimeError(f"{self.task.slot}: exit code {code}; see {self.task.slot / LOG_FILE}")
        return "finished"

    def checkpoint(self, *args, **kwargs):
        """Runs inside submitit's signal handler, while `execute` is blocked in the child's wait
        (which holds Popen's wait lock: `poll` would call a dead child running), so the child is
        watched with waitid(WNOWAIT), which reads its exit without reaping it."""
        process = self._process
        if process is not None:
            code = wait_for_exit(process, timeout=0)
            if code is None:
                process.send_signal(signal.SIGUSR2)
                code = wait_for_exit(process, timeout=CHECKPOINT_WAIT_SECONDS)
            if code is None:
                log_line(self.task, f"segment ended: time limit; the run did not exit within "
                                    f"{CHECKPOINT_WAIT_SECONDS} s of SIGUSR2; requeued from its last checkpoint")
            elif code == EXIT_STOPPED:
                log_line(self.task, f"segment ended: {STOP_REASONS['SIGUSR2']}; checkpoint at step "
                                    f"{self.task.state().step}; requeued")
            else:
                log_line(self.task, f"segment ended: {segment_end(self.task, code).split(': ', 1)[1]} during the "
                                    f"time-limit warning; requeued")
        return _submitit().helpers.DelayedSubmission(SlotJob(self.task))

    def __getstate__(self):
        return {"task": self.task, "_process": None}


def wait_for_exit(process: subprocess.Popen, timeout: float) -> int | None:
    """The exit code of a child once it has exited (negative: killed by that signal), None if it
    is still running after `timeout` seconds. The child is left unreaped (WNOWAIT)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:  # reaped already: its code is Popen's
            return process.returncode
        if result is not None and result.si_pid == process.pid:
            return result.si_status if result.si_code == os.CLD_EXITED else -result.si_status
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.05)


def slurm_time(minutes: int) -> str:
    """SLURM's `--time` as HH:MM:SS (a bare number would be read as minutes; 0 is unlimited)."""
    return f"{minutes // 60:02d}:{minutes % 60:02d}:00"


def time_limit_minutes(hours: float) -> int:
    if not math.isfinite(hours):
        raise ReproduceError(f"--time-hours {hours:g} is not a time limit: give the hours a task may run, "
                             f"e.g. --time-hours 24.")
    minutes = round(hours * 60)
    if not minutes >= MIN_TIME_MINUTES:
        raise ReproduceError(f"--time-hours {hours:g} is under {MIN_TIME_MINUTES} minutes: a task needs time to start, "
                             f"train, and checkpoint on the warning {WARNING_SECONDS} s before its limit "
                             f"(e.g. --time-hours {MIN_TIME_MINUTES / 60:.2f}).")
    return minutes


def live_tasks(folder: Path) -> dict[Path, str]:
    """Slots of this table folder with a SLURM task still queued or running: slot -> task id, from
    the submissions recorded beside submitit's files and what `squeue` says of them."""
    path = folder / SUBMISSIONS_FILE
    if not path.is_file() or shutil.which("squeue") is None:
        return {}
    live = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        result = subprocess.run(["squeue", "-h", "-r", "-j", record["job_id"], "-o", "%i %T"],
                                capture_output=True, text=True)
        if result.returncode != 0:
            continue  # a job SLURM no longer knows
        for task_id, task_state in (row.split() for row in result.stdout.splitlines() if row.strip()):
            index = task_id.rsplit("_", 1)[-1]
            if index.isdigit() and int(index) < len(record["slots"]) and task_state not in (
                    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED",
                    "BOOT_FAIL", "DEADLINE"):
                live[Path(record["slots"][int(index)])] = task_id
    return live


def sbatch_problem(message: str, partition: str | None, gpus_per_run: int) -> str:
    """sbatch's refusal as one sentence naming the flag to change."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    said = "; ".join(line.removeprefix("sbatch: error: ") for line in lines[-2:]) or "no message"
    lowered = message.lower()
    if "invalid partition" in lowered:
        listing = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True) \
            if shutil.which("sinfo") else None
        known = ", ".join(name.strip().rstrip("*") for name in listing.stdout.split()) if listing and listing.returncode == 0 else ""
        return (f"SLURM refused the job array ({said}): --partition {partition or '(the default)'} is not a partition here"
                + (f"; sinfo lists: {known}." if known else "."))
    if gpus_per_run and ("gres" in lowered or "gpu" in lowered):
        return (f"SLURM refused the job array ({said}): this cluster has no GPUs to give (or not on this partition). "
                f"Use --gpus-per-run 0 to run on CPUs, or --partition with GPU nodes.")
    if "memory" in lowered:
        return f"SLURM refused the job array ({said}): lower --mem-gb."
    if "cpu" in lowered or "node configuration" in lowered:
        return f"SLURM refused the job array ({said}): lower --cpus-per-run (or --gpus-per-run)."
    if "time limit" in lowered:
        return f"SLURM refused the job array ({said}): lower --time-hours to the partition's limit."
    return f"SLURM refused the job array ({said}); change the flag it names."


def submit(tasks: list[Task], folder: Path, cluster: str = "slurm", partition: str | None = None,
           gpus_per_run: int = 1, cpus_per_run: int = 4, time_minutes: int = 24 * 60, max_parallel: int = 256,
           max_requeues: int = 20, mem_gb: int | None = None, out=sys.stdout) -> list:
    """Submit the unfinished tasks that have no queued or running task yet, as one job array;
    returns the submitit jobs."""
    submitit = _submitit()
    todo = [task for task in tasks if task.state().status != "done"]
    live = live_tasks(folder) if cluster == "slurm" else {}
    queued = [task for task in todo if task.slot.absolute() in live]
    if queued:
        print(f"refused: {len(queued)} of this table's unfinished runs already have a queued or running SLURM task "
              f"(not submitted again): " + ", ".join(f"{task.env} seed {task.seed} (task {live[task.slot.absolute()]})"
                                                     for task in queued), file=out)
    todo = [task for task in todo if task not in queued]
    if not todo:
        return []
    if cluster == "slurm" and not (shutil.which("sbatch") and shutil.which("srun")):
        raise ReproduceError("--slurm needs SLURM's sbatch and srun on PATH: run this on a login node of the cluster "
                             "(or without --slurm, to run the table on this machine).")
    parameters = dict(timeout_min=time_minutes, cpus_per_task=cpus_per_run, name=f"reproduce-{todo[0].table.name}")
    if cluster == "slurm":
        parameters.update(slurm_array_parallelism=max_parallel, slurm_signal_delay_s=WARNING_SECONDS,
                          slurm_additional_parameters={"requeue": True, "time": slurm_time(time_minutes)})
        if gpus_per_run:
            parameters["gpus_per_node"] = gpus_per_run
        if partition:
            parameters["slurm_partition"] = partition
        if mem_gb:
            parameters["mem_gb"] = mem_gb
        parameters["slurm_setup"] = [f"cd {shlex.quote(str(REPO))}"]
    said = io.StringIO()
    try:
        executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster, slurm_max_num_timeout=max_requeues)
        executor.update_parameters(**parameters)
        with contextlib.redirect_stderr(said):  # submitit echoes sbatch's stderr; it goes in the one message
            with executor.batch():
                jobs = [executor.submit(SlotJob(task)) for task in todo]
    except Exception as error:  # sbatch's refusal (submitit's FailedJobError) or submitit's own
        if cluster == "slurm":
            raise ReproduceError(sbatch_problem(f"{said.getvalue()}\n{error}", partition, gpus_per_run)) from None
        raise ReproduceError(f"submitit could not submit the runs: {error}") from None
    if cluster == "slurm":
        with open(folder / SUBMISSIONS_FILE, "a") as file:
            file.write(json.dumps({"job_id": jobs[0].job_id.split("_")[0],
                                   "slots": [str(task.slot.absolute()) for task in todo]}) + "\n")
    return jobs


# --------------------------------------------------------------------------------------------
# Report


def read_jsonl(path: Path) -> list[dict]:
    records = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a torn last line
    return records


def iqm(scores: np.ndarray, axis=None) -> np.ndarray:
    """Interquartile mean: the mean of the middle 50% (scipy's trim_mean, as rliable computes it)."""
    from scipy import stats

    return stats.trim_mean(scores, proportiontocut=0.25, axis=axis)


def stratified_bootstrap_ci(scores_by_task: list[np.ndarray], statistic=iqm, reps: int = 50_000, alpha: float = 0.05,
                            seed: int = 0) -> tuple[float, float]:
    """Percentile interval of `statistic` over all runs, resampling runs with replacement within
    each task (stratum), as rliable's StratifiedBootstrap does."""
    rng = np.random.default_rng(seed)
    samples = [np.asarray(scores)[rng.integers(0, len(scores), size=(reps, len(scores)))] for scores in scores_by_task]
    values = statistic(np.concatenate(samples, axis=1), axis=1)
    low, high = np.percentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(low), float(high)


def metric_of(record: dict) -> tuple[str, float]:
    if "normalized_score" in record:
        return "normalized_score", float(record["normalized_score"])
    return "return", float(record["return"])


@dataclasses.dataclass
class RunResult:
    env: str
    seed: int
    status: str  # done / interrupted / pending
    run_dir: Path | None
    evaluations: list[dict]
    offline_steps: int = 0

    @property
    def final(self) -> float | None:
        return metric_of(self.evaluations[-1])[1] if self.status == "done" and self.evaluations else None

    @property
    def last_step(self) -> int:
        return int(self.evaluations[-1]["step"]) if self.evaluations else 0


def collect(table: Table, root: str | Path, seeds: int | None = None) -> list[RunResult]:
    """Every run of a table that exists under `root` (all seeds found, or seeds 0..N-1 when given)."""
    results = []
    for run in table.runs:
        env_folder = Path(root) / table.name / env_key(run["env"])
        found = sorted(int(path.name[4:]) for path in env_folder.glob("seed*") if path.name[4:].isdigit())
        for seed in (range(seeds) if seeds is not None else found):
            state = slot_state(slot_dir(root, table, run["env"], seed), table.algorithm)
            evaluations, offline = [], table.offline_steps
            if state.run_dir is not None:
                evaluations = read_jsonl(state.run_dir / EVALUATIONS_FILE)
                config = json.loads((state.run_dir / CONFIG_FILE).read_text())
                offline = int(config.get("offline_steps") or 0)
            results.append(RunResult(run["env"], seed, state.status, state.run_dir, evaluations, offline))
    return results


def fmt(value: float | None, digits: int = 1) -> str:
    return "" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.{digits}f}"


def summarize(table: Table, results: list[RunResult], reps: int = 50_000) -> list[dict[str, Any]]:
    """One row per dataset (and an aggregate row): statistics over finished runs only."""
    rows, finals_by_env = [], []
    for run in table.runs:
        mine = [r for r in results if r.env == run["env"]]
        done = [r for r in mine if r.status == "done" and r.final is not None]
        finals = np.array([r.final for r in done])
        unfinished = [r for r in mine if r not in done]
        row = {"dataset": run["env"], "paper_dataset": run.get("paper_dataset", ""), "seeds_finished": len(done),
               "seeds_unfinished": len(unfinished),
               "unfinished": "; ".join(f"seed {r.seed}: {r.status}" + (f" at step {r.last_step}" if r.evaluations else "")
                                       for r in unfinished),
               "steps": max((r.last_step for r in done), default=0),
               "metric": metric_of(done[0].evaluations[-1])[0] if done else "",
               "mean": float(finals.mean()) if len(finals) else None,
               "stderr": float(finals.std(ddof=1) / np.sqrt(len(finals))) if len(finals) > 1 else None,
               "iqm": float(iqm(finals)) if len(finals) else None, "iqm_ci_low": None, "iqm_ci_high": None,
               "success_rate": (float(np.mean([r.evaluations[-1]["success_rate"] for r in done]))
                                if done and all("success_rate" in r.evaluations[-1] for r in done) else None),
               "published": run.get("published"), "published_offline": run.get("published_offline"),
               "published_approx": bool(run.get("published_approx", False)),
               "published_missing": run.get("published_missing", ""),
               "reference": run.get("reference"), "reference_offline": run.get("reference_offline")}
        if len(finals):
            row["iqm_ci_low"], row["iqm_ci_high"] = stratified_bootstrap_ci([finals], reps=reps)
            finals_by_env.append(finals)
        if not mine:
            row["unfinished"] = "no runs found"
        rows.append(row)
    if len(finals_by_env) > 1:
        every = np.concatenate(finals_by_env)
        low, high = stratified_bootstrap_ci(finals_by_env, reps=reps)
        published = [run.get("published") for run in table.runs]
        aggregate = table.aggregate or {}
        if isinstance(aggregate.get("published"), (int, float)):  # the paper's own aggregate (may cover other tasks)
            published, approx = float(aggregate["published"]), bool(aggregate.get("published_approx", False))
        else:
            published = float(np.mean(published)) if all(isinstance(p, (int, float)) for p in published) else None
            approx = any(run.get("published_approx") for run in table.runs)
        rows.append({"dataset": "all (IQM over every finished run, stratified by dataset)", "paper_dataset": "",
                     "seeds_finished": len(every), "seeds_unfinished": sum(r["seeds_unfinished"] for r in rows),
                     "unfinished": "", "steps": max(r["steps"] for r in rows), "metric": rows[0]["metric"],
                     "mean": float(every.mean()), "stderr": None, "iqm": float(iqm(every)), "iqm_ci_low": low,
                     "success_rate": None,
                     "iqm_ci_high": high,
                     "published": published, "published_approx": approx,
                     "published_offline": None, "published_missing": "", "reference": None, "reference_offline": None})
    return rows


CSV_FIELDS = ("dataset", "paper_dataset", "metric", "seeds_finished", "seeds_unfinished", "steps", "mean", "stderr",
              "iqm", "iqm_ci_low", "iqm_ci_high", "success_rate", "published", "published_approx", "published_offline",
              "published_missing", "reference",
              "reference_offline", "unfinished")


def last_videos(results: list[RunResult], out_dir: Path) -> list[tuple[RunResult, str, str]]:
    """(run, video as the run folder names it, link relative to `out_dir`) for each run whose
    evaluations name a video (--capture-video) that is on disk: the last one it recorded."""
    found = []
    for result in results:
        videos = [record["video"] for record in result.evaluations if record.get("video")]
        if result.run_dir is not None and videos and (result.run_dir / videos[-1]).is_file():
            found.append((result, videos[-1], os.path.relpath(result.run_dir / videos[-1], out_dir)))
    return found


def markdown(table: Table, rows: list[dict[str, Any]], plots: dict[str, str],
             videos: list[tuple[RunResult, str, str]] = ()) -> str:
    source = table.source
    has_reference = any(row["reference"] is not None for row in rows)
    lines = [f"# {table.title}", "",
             f"Table `{table.name}` ({table.path.name}): `algorithms/{table.algorithm}.py`, "
             f"{table.offline_steps:,} offline updates + {table.online_steps:,} online steps; {table.evaluation}.", "",
             f"Published: {source['paper']}, arXiv {source['arxiv']} ({source['arxiv_version']}), {source['table']}."
             + (f" {source['note']}" if source.get("note") else ""), ""]
    if table.reference_source:
        lines += [f"Reference: {table.reference_source.get('name', '')} ({table.reference_source.get('url', '')}).", ""]
    if not table.comparable:
        lines += ["**Not directly comparable.** " + " ".join(table.successor_note.split()), ""]
    has_success = any(row["success_rate"] is not None for row in rows)
    header = ["dataset", "finished seeds", "steps", "mean ± s.e.", "IQM [95% CI]"]
    if has_success:
        header.append("success rate (mean)")
    header.append("published")
    if has_reference:
        header.append("reference")
    header += ["unfinished runs (not averaged)", "curve"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        published = fmt(row["published"]) if row["published"] is not None else (
            f"not found: {row['published_missing']}" if row["published_missing"] else "")
        if row["published_offline"] is not None:
            published = f"{fmt(row['published_offline'])} → {published}"
        if row["published_approx"] and row["published"] is not None:
            published = f"≈ {published} (read off a figure)"
        mean = f"{fmt(row['mean'])} ± {fmt(row['stderr'])}" if row["stderr"] is not None else fmt(row["mean"])
        interval = (f"{fmt(row['iqm'])} [{fmt(row['iqm_ci_low'])}, {fmt(row['iqm_ci_high'])}]"
                    if row["iqm"] is not None else "")
        cells = [row["dataset"], str(row["seeds_finished"]), f"{row['steps']:,}", mean, interval]
        if has_success:
            cells.append(fmt(row["success_rate"], 2))
        cells.append(published)
        if has_reference:
            reference = fmt(row["reference"]) if row["reference"] is not None else ""
            if row["reference_offline"] is not None:
                reference = f"{fmt(row['reference_offline'])} → {reference}"
            cells.append(reference)
        cells += [row["unfinished"] or "none", f"![]({plots[row['dataset']]})" if row["dataset"] in plots else ""]
        lines.append("| " + " | ".join(cells) + " |")
    metric = next((row["metric"] for row in rows if row["metric"]), "normalized_score")
    lines += ["", f"Score: the {metric.replace('_', ' ')} of the last evaluation of each finished run. Mean ± "
              "standard error over seeds; IQM = interquartile mean with a 95% percentile interval from a "
              "stratified bootstrap (50,000 resamples of seeds within each dataset). Published numbers "
              "`a → b` are offline → after online fine-tuning."]
    if any(row["published_approx"] for row in rows):
        lines += ["", "`≈`: a published number read by eye off a figure of the paper or its official code "
                  "(no table prints it), so approximate; the table file names the figure."]
    if table.aggregate and table.aggregate.get("over") and rows[-1]["dataset"].startswith("all "):
        lines += ["", f"Published aggregate (last row): over {table.aggregate['over']}."]
    if videos:
        lines += ["", "## Videos", "", "The last evaluation episode each run recorded (--capture-video):", ""]
        lines += [f"- {result.env}, seed {result.seed} ({result.status}): [{video}]({link.replace(' ', '%20')})"
                  for result, video, link in videos]
    return "\n".join(lines) + "\n"


def plot_curves(table: Table, results: list[RunResult], rows: list[dict[str, Any]], out_dir: Path) -> dict[str, str]:
    """One PNG per dataset: mean over finished seeds with a ±1 s.e. band, unfinished runs as thin
    dotted lines, the offline/online boundary, and the published final number as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = {}
    for run, row in zip(table.runs, rows):
        mine = [r for r in results if r.env == run["env"] and r.evaluations]
        if not mine:
            continue
        figure, axis = plt.subplots(figsize=(6, 3.6), dpi=100)
        done = [r for r in mine if r.status == "done"]
        if done:
            steps = sorted(set.intersection(*(set(e["step"] for e in r.evaluations) for r in done)))
            curves = np.array([[metric_of(next(e for e in r.evaluations if e["step"] == s))[1] for s in steps]
                               for r in done])
            mean = curves.mean(axis=0)
            band = curves.std(axis=0, ddof=1) / np.sqrt(len(done)) if len(done) > 1 else np.zeros_like(mean)
            axis.plot(steps, mean, color="tab:blue", label=f"mean of {len(done)} finished seed(s)")
            axis.fill_between(steps, mean - band, mean + band, color="tab:blue", alpha=0.25, label="± 1 s.e.")
        for index, r in enumerate(r for r in mine if r.status != "done"):
            axis.plot([e["step"] for e in r.evaluations], [metric_of(e)[1] for e in r.evaluations], color="tab:red",
                      linestyle=":", linewidth=1, label="unfinished run" if index == 0 else None)
        offline = max((r.offline_steps for r in mine), default=0)
        if offline > 0:
            axis.axvline(offline, color="gray", linestyle="--", linewidth=1, label="offline | online")
        if isinstance(run.get("published"), (int, float)):
            axis.axhline(run["published"], color="black", linestyle="-.", linewidth=1, label="published (final)")
        if isinstance(run.get("reference"), (int, float)):
            axis.axhline(run["reference"], color="tab:green", linestyle="-.", linewidth=1, label="reference (final)")
        axis.set_xlabel("step (offline updates, then environment steps)")
        axis.set_ylabel(metric_of(mine[0].evaluations[-1])[0].replace("_", " "))
        axis.set_title(f"{table.algorithm}: {run['env']}", fontsize=9)
        axis.legend(loc="best", fontsize=7)
        figure.tight_layout()
        name = f"{env_key(run['env'])}.png"
        figure.savefig(out_dir / name)
        plt.close(figure)
        files[run["env"]] = name
    return files


def report(table: Table, root: str | Path, out_dir: Path | None = None, seeds: int | None = None,
           reps: int = 50_000) -> Path:
    """Write report.md (linking each run's last video, where --capture-video recorded one),
    report.csv and one learning-curve PNG per dataset; returns the folder."""
    out_dir = Path(out_dir) if out_dir is not None else Path(root) / table.name / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    results = collect(table, root, seeds)
    rows = summarize(table, results, reps)
    plots = plot_curves(table, results, rows, out_dir)
    (out_dir / "report.md").write_text(markdown(table, rows, plots, last_videos(results, out_dir)))
    with open(out_dir / "report.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({key: ("" if row[key] is None else row[key]) for key in CSV_FIELDS})
    return out_dir


# --------------------------------------------------------------------------------------------
# Command line


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python benchmarks/reproduce.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="the tables, their run counts and time estimates")

    run = commands.add_parser("run", help="run every unfinished run of a table (skips finished ones, resumes interrupted ones)")
    run.add_argument("table", help="table name (benchmarks/tables/NAME.toml) or path to a .toml file")
    run.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default: the table's count)")
    run.add_argument("--root", default=DEFAULT_ROOT, help=f"folder of the slot folders (default {DEFAULT_ROOT})")
    run.add_argument("--jobs", type=int, default=1, help="runs at once on this machine (one per GPU where there are several)")
    run.add_argument("--gpus", default=None, help="comma-separated GPU ids to spread runs over (default: all visible)")
    run.add_argument("--dry-run", action="store_true", help="print each run's state and command; run nothing")
    run.add_argument("--slurm", action="store_true", help="submit one SLURM job array through submitit instead")
    run.add_argument("--partition", default=None, help="SLURM partition")
    run.add_argument("--gpus-per-run", type=int, default=1, help="GPUs per SLURM task (0: none)")
    run.add_argument("--cpus-per-run", type=int, default=4, help="CPUs per SLURM task")
    run.add_argument("--mem-gb", type=int, default=None, help="memory per SLURM task")
    run.add_argument("--time-hours", type=float, default=24.0,
                     help=f"SLURM time limit per task (at least {MIN_TIME_MINUTES} minutes; written as HH:MM:SS); "
                          f"a run checkpoints on the warning {WARNING_SECONDS} s before it and is requeued")
    run.add_argument("--max-parallel", type=int, default=256, help="SLURM array tasks running at once")
    run.add_argument("--max-requeues", type=int, default=20, help="requeues of one task after reaching its time limit (submitit counts these; pre-emptions are not counted)")

    rep = commands.add_parser("report", help="Markdown + CSV table and learning curves from the run folders")
    rep.add_argument("table")
    rep.add_argument("--root", default=DEFAULT_ROOT)
    rep.add_argument("--out", default=None, help="output folder (default ROOT/TABLE/report)")
    rep.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default: every seed found)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.command == "list":
        list_tables()
        return 0
    table = load_table(args.table)
    if args.command == "report":
        out = report(table, args.root, args.out, args.seeds)
        print((out / "report.md").read_text())
        print(f"Written: {out / 'report.md'}, {out / 'report.csv'} and the curves beside them.")
        return 0
    seeds = args.seeds if args.seeds is not None else table.seeds
    if seeds < 1 or args.jobs < 1:
        raise ReproduceError("--seeds and --jobs must be at least 1.")
    if args.slurm:
        time_minutes = time_limit_minutes(args.time_hours)
        for flag, value in (("--cpus-per-run", args.cpus_per_run), ("--max-parallel", args.max_parallel)):
            if value < 1:
                raise ReproduceError(f"{flag} must be at least 1, got {value}.")
        for flag, value in (("--gpus-per-run", args.gpus_per_run), ("--max-requeues", args.max_requeues)):
            if value < 0:
                raise ReproduceError(f"{flag} must be >= 0, got {value}.")
        if args.mem_gb is not None and args.mem_gb < 1:
            raise ReproduceError(f"--mem-gb must be at least 1, got {args.mem_gb}.")
    tasks = tasks_for(table, seeds, args.root)
    for task in tasks:
        task.check_settings()
    if args.dry_run:
        for run in table.runs:
            if run.get("dataset_missing"):
                print(f"# {run['env']}: not run, no dataset: {' '.join(str(run['dataset_missing']).split())}")
        for task in tasks:
            state = task.state()
            command = task.command(state)
            print(f"# {task.env} seed {task.seed}: {task.describe(state)}")
            print(shlex.join(command) if command else "# nothing to do")
        return 0
    if args.slurm or args.jobs > 1:
        prepare_datasets(tasks)
    if args.slurm:
        folder = Path(args.root) / table.name / "slurm"
        jobs = submit(tasks, folder, "slurm", args.partition, args.gpus_per_run, args.cpus_per_run,
                      time_minutes, args.max_parallel, args.max_requeues, args.mem_gb)
        if jobs:
            print(f"submitted {len(jobs)} runs as job array {jobs[0].job_id.split('_')[0]}; logs in {folder}. "
                  f"Run the same command again after a failure: finished runs are skipped.")
        elif all(task.state().status == "done" for task in tasks):
            print("every run of this table has finished; nothing submitted.")
        else:
            print("nothing submitted: every unfinished run already has a queued or running task.")
        return 0
    gpus = args.gpus.split(",") if args.gpus else detect_gpus()
    counts = run_local(tasks, args.jobs, gpus)
    print("runs: " + ", ".join(f"{value} {key}" for key, value in counts.items()))
    if counts["stopped"] or counts["busy"]:
        return EXIT_STOPPED
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ReproduceError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
