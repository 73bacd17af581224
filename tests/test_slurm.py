"""The cluster path: a scheduler's stop reaches a checkpoint within seconds and nothing is lost.

Without a cluster (fast suite): SIGUSR2 (SLURM's time-limit warning) stops a script like SIGTERM,
within seconds whatever the chunk size; a stop mid-chunk or during an evaluation resumes exactly,
with every evaluation once; the runner's SLURM checkpoint hook sees its script exit at once;
--time-hours, sbatch refusals and duplicate submissions end in one message.

Marked `slurm`: the same on a real one-node SLURM that benchmarks/local_slurm.py starts on this
machine (root and apt needed; skipped with the reason otherwise). Run them with
`python -m pytest -q -m slurm tests/test_slurm.py`.
"""

from __future__ import annotations

import csv
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tyro

from algorithms import calql, cql, iql, off2on, rlpd, wsrl
from benchmarks import local_slurm, reproduce
from common import checkpoint
from common import run as harness
from common.cli import EXIT_STOPPED, RunStopped
from common.evaluation import Evaluator
from common.logger import CHECKPOINT_FILE, read_evaluations
from tests.conftest import REPO, scores
from tests.test_reproduce import fake_run, reproduce_cli, write_table

TINY_IQL = ["--hidden-dims", "32", "32", "--batch-size", "32", "--eval-episodes", "2", "--progress", "False"]
TINY_CQL = ["--actor-hidden-dims", "32", "32", "--critic-hidden-dims", "32", "32", "--batch-size", "32",
            "--cql-n-actions", "4", "--eval-episodes", "2", "--progress", "False"]
TINY_WSRL = ["--actor-hidden-dims", "32", "32", "--critic-hidden-dims", "32", "32", "--ensemble-size", "4",
             "--offline-batch-size", "32", "--batch-size", "32", "--cql-n-actions", "4", "--warmup-steps", "0",
             "--eval-episodes", "2", "--progress", "False"]
TINY_RLPD = ["--hidden-dims", "32", "32", "--num-qs", "4", "--batch-size", "32", "--eval-episodes", "2",
             "--progress", "False"]
TINY_OFF2ON = ["--actor-hidden-dims", "16", "16", "--critic-hidden-dims", "16", "16", "--density-hidden-dims", "16",
               "16", "--ensemble-size", "2", "--batch-size", "32", "--density-batch-size", "32", "--cql-n-actions", "2",
               "--bc-steps", "20", "--eval-episodes", "2", "--progress", "False"]
# each script with its tiny flags: every one runs its offline updates through Session.updates
SCRIPTS = {"iql": (iql, TINY_IQL), "cql": (cql, TINY_CQL), "calql": (calql, TINY_CQL), "wsrl": (wsrl, TINY_WSRL),
           "rlpd": (rlpd, TINY_RLPD), "off2on": (off2on, TINY_OFF2ON)}
OFFLINE_EVAL_FLAG = {"off2on": "--offline-eval-every"}  # the others evaluate both phases with --eval-every


def agent_leaves(run_dir: Path) -> list[np.ndarray]:
    import jax

    return [np.asarray(leaf) for leaf in jax.tree_util.tree_leaves(checkpoint.load(str(run_dir / CHECKPOINT_FILE))["agent"])]


def assert_same_agent(first: Path, second: Path) -> None:
    for a, b in zip(agent_leaves(first), agent_leaves(second), strict=True):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------------
# Stops within seconds, resumed exactly (no cluster)


@pytest.mark.parametrize("name", SCRIPTS)
def test_sigusr2_stops_a_script_within_seconds_even_inside_a_long_chunk(name, tiny_pointmaze, tmp_path):
    """One 1M-update chunk (log and evaluation every 1M): before, a stop waited for the whole chunk
    (hours here) and SIGUSR2 killed the script with no checkpoint at all. Now the checkpoint is on
    disk within one piece of updates: about 1 to 3 s on an idle 2-core CPU (docs/slurm.md). The
    bound asserted is 120 s, so that a machine busy with other work (a signal that lands in the
    piece's compilation waits for it: 30 s seen under load) cannot fail it, while a stop that waits
    for the chunk still does."""
    module, tiny = SCRIPTS[name]
    process = subprocess.Popen([sys.executable, f"algorithms/{name}.py", "--env", tiny_pointmaze, "--offline-steps",
                                "1000000", "--online-steps", "0", "--log-every", "1000000",
                                OFFLINE_EVAL_FLAG.get(name, "--eval-every"), "1000000", *tiny, "--log-dir",
                                str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None and not [
            path for path in tmp_path.glob("*/evaluations.jsonl") if path.read_text().strip()]:
        time.sleep(0.05)
    time.sleep(5.0)  # the evaluation at step 0 is written: now in the chunk's compilation or its updates
    sent = time.monotonic()
    process.send_signal(signal.SIGUSR2)
    while process.poll() is None and not list(tmp_path.glob(f"*/{CHECKPOINT_FILE}")) and time.monotonic() - sent < 120:
        time.sleep(0.02)
    latency = time.monotonic() - sent
    if latency >= 120:
        process.kill()  # still inside its chunk: the assertions below fail
    out, err = process.communicate(timeout=120)
    assert process.returncode == EXIT_STOPPED, out + err
    assert "SIGUSR2 received (a scheduler's time-limit warning)" in out and "stopped by SIGUSR2" in err
    (run_dir,) = [path.parent for path in tmp_path.glob("*/config.json")]
    progress = checkpoint.load(str(run_dir / CHECKPOINT_FILE))["progress"]
    assert progress["offline_step"] < 1_000_000 and progress["offline_step"] % module.STOP_CHECK_UPDATES == 0, out + err
    assert latency < 120.0, f"{latency:.1f} s from SIGUSR2 to the checkpoint on disk"


STOP_FLAGS = ["--offline-steps", "600", "--online-steps", "0", "--eval-every", "300", "--log-every", "300", *TINY_IQL]


@pytest.fixture(scope="module")
def reference_run(tiny_pointmaze, tmp_path_factory):
    """(flags, run folder) of an uninterrupted IQL run: 600 offline updates in the script's own
    pieces (100), evaluations at 0, 300, 600. The stopped runs below use pieces of 50: the same
    updates split otherwise must give the same agent."""
    flags = ["--env", tiny_pointmaze, *STOP_FLAGS]
    return flags, run_iql(flags, tmp_path_factory.mktemp("reference"))


def run_iql(flags: list[str], log_dir: Path) -> Path:
    return run_main(iql, flags, log_dir)


def run_main(module, flags: list[str], log_dir: Path) -> Path:
    module.main(tyro.cli(module.Args, args=[*flags, "--log-dir", str(log_dir)]))
    (run_dir,) = [path.parent for path in log_dir.glob("*/config.json")]
    return run_dir


@pytest.fixture(scope="module")
def references(tiny_pointmaze, tmp_path_factory):
    """reference(name, flags): the run folder of an uninterrupted run of SCRIPTS[name] with the
    script's own pieces, made once per module and flags."""
    made = {}

    def reference(name: str, flags: list[str]) -> Path:
        key = (name, tuple(flags))
        if key not in made:
            made[key] = run_main(SCRIPTS[name][0], flags, tmp_path_factory.mktemp(f"reference-{name}"))
        return made[key]
    return reference


def stop_at_piece(monkeypatch, number: int, online: bool = False) -> None:
    """SIGUSR2 during the `number`-th piece of Session.updates (counting only online pieces when
    `online`), through the script's own handler."""
    pieces, original = [0], harness.Session.updates

    def stopping(session, total, call, piece):
        def counted(size):
            if session.progress.online_step > 0 or not online:
                pieces[0] += 1
                if pieces[0] == number:
                    os.kill(os.getpid(), signal.SIGUSR2)  # the real signal, through the script's handler
            return call(size)
        return original(session, total, counted, piece)

    monkeypatch.setattr(harness.Session, "updates", stopping)


def stop_and_resume(module, flags: list[str], tmp_path: Path, monkeypatch) -> tuple[Path, dict]:
    """Run until the stop, check it ends in RunStopped, resume with the real Session.updates;
    returns (run folder, the stopped run's checkpointed progress)."""
    with pytest.raises(RunStopped, match="stopped by SIGUSR2"):
        run_main(module, flags, tmp_path / "stopped")
    (run_dir,) = [path.parent for path in (tmp_path / "stopped").glob("*/config.json")]
    progress = checkpoint.load(str(run_dir / CHECKPOINT_FILE))["progress"]
    monkeypatch.undo()  # the script's own pieces and the real Session.updates
    module.main(module.Args(resume=str(run_dir)))
    return run_dir, progress


def offline_flags(name: str, dataset: str) -> list[str]:
    return ["--env", dataset, "--offline-steps", "600", "--online-steps", "0", OFFLINE_EVAL_FLAG.get(name, "--eval-every"),
            "300", "--log-every", "300", *SCRIPTS[name][1]]


@pytest.mark.parametrize("name", SCRIPTS)
def test_a_stop_mid_chunk_checkpoints_there_and_resumes_exactly(name, tiny_pointmaze, references, tmp_path,
                                                                monkeypatch):
    """600 offline updates (chunks of 300) in pieces of 50, stopped in the third: the checkpoint
    is at update 150, and the resumed run (the script's own pieces) equals an uninterrupted one."""
    module, flags = SCRIPTS[name][0], offline_flags(name, tiny_pointmaze)
    reference = references(name, flags)
    monkeypatch.setattr(module, "STOP_CHECK_UPDATES", 50)
    stop_at_piece(monkeypatch, 3)
    run_dir, progress = stop_and_resume(module, flags, tmp_path, monkeypatch)
    assert progress["offline_step"] == 150  # mid-chunk
    assert scores(run_dir) == scores(reference)
    assert_same_agent(run_dir, reference)


@pytest.mark.parametrize("name", ["cql", "calql", "wsrl"])
def test_a_stop_in_the_last_piece_owes_the_phase_end_evaluation(name, tiny_pointmaze, references, tmp_path,
                                                                 monkeypatch):
    """The stop lands in the last of 12 pieces: the phase-end evaluation that opens the online
    phase is not started, the checkpoint owes it (WSRL's: after the switch to the fine-tuning
    agent), and the resumed run does it once, finishes, and equals an uninterrupted run."""
    module, flags = SCRIPTS[name][0], offline_flags(name, tiny_pointmaze)
    reference = references(name, flags)
    monkeypatch.setattr(module, "STOP_CHECK_UPDATES", 50)
    stop_at_piece(monkeypatch, 12)
    run_dir, progress = stop_and_resume(module, flags, tmp_path, monkeypatch)
    assert (progress["offline_step"], progress["owed_step"], progress["finished"]) == (600, 600, False)
    assert checkpoint.load(str(run_dir / CHECKPOINT_FILE))["progress"]["finished"]
    assert [record["step"] for record in read_evaluations(run_dir)] == [0, 300, 600]
    assert scores(run_dir) == scores(reference)
    assert_same_agent(run_dir, reference)


@pytest.mark.parametrize("name", ["cql", "calql"])
def test_a_stop_between_a_trajectorys_update_pieces_owes_the_rest(name, tiny_pointmaze, references, tmp_path,
                                                                  monkeypatch):
    """CQL and Cal-QL update after each trajectory (utd x its length, 300 here): stopped in the
    second piece of 50, the checkpoint owes the other 200 updates; the resumed run does them first
    and equals an uninterrupted run."""
    module, tiny = SCRIPTS[name]
    flags = ["--env", tiny_pointmaze, "--offline-steps", "50", "--online-steps", "400", "--eval-every", "200",
             "--log-every", "100", *tiny]
    reference = references(name, flags)
    monkeypatch.setattr(module, "STOP_CHECK_UPDATES", 50)
    stop_at_piece(monkeypatch, 2, online=True)
    run_dir, progress = stop_and_resume(module, flags, tmp_path, monkeypatch)
    assert (progress["online_step"], progress["pending_updates"]) == (300, 200)
    assert scores(run_dir) == scores(reference)
    assert_same_agent(run_dir, reference)


def test_a_stop_during_an_evaluation_leaves_it_to_the_resumed_run(reference_run, tmp_path, monkeypatch):
    """The stop arrives three environment steps into the evaluation at update 300: that evaluation
    is abandoned, the checkpoint owes it, and the resumed run does it first, so every evaluation
    appears once with the numbers of an uninterrupted run."""
    flags, reference = reference_run
    monkeypatch.setattr(iql, "STOP_CHECK_UPDATES", 50)
    calls, original = [0], Evaluator.__call__

    def stopped_in_the_second(evaluator, policy, seed, *rest):
        calls[0] += 1
        if calls[0] == 2:
            steps = [0]

            def policy_then_stop(observations, policy=policy):
                steps[0] += 1
                if steps[0] == 3:
                    os.kill(os.getpid(), signal.SIGUSR2)
                return policy(observations)
            return original(evaluator, policy_then_stop, seed, *rest)
        return original(evaluator, policy, seed, *rest)

    monkeypatch.setattr(Evaluator, "__call__", stopped_in_the_second)
    with pytest.raises(RunStopped):
        run_iql(flags, tmp_path / "stopped")
    (run_dir,) = [path.parent for path in (tmp_path / "stopped").glob("*/config.json")]
    progress = checkpoint.load(str(run_dir / CHECKPOINT_FILE))["progress"]
    assert (progress["offline_step"], progress["owed_phase"], progress["owed_step"]) == (300, "offline", 300)
    assert [record["step"] for record in read_evaluations(run_dir)] == [0]
    monkeypatch.setattr(Evaluator, "__call__", original)
    iql.main(iql.Args(resume=str(run_dir)))
    assert scores(run_dir) == scores(reference)
    assert_same_agent(run_dir, reference)


def test_a_stop_before_the_phase_end_evaluation_owes_it_and_finishes_after_it(reference_run, tmp_path, monkeypatch):
    """A stop during the last updates: the final evaluation is not started, the run is not
    finished; resumed, it evaluates and finishes."""
    flags, reference = reference_run
    monkeypatch.setattr(iql, "STOP_CHECK_UPDATES", 50)
    pieces, original = [0], harness.Session.updates

    def stop_in_the_last_piece(session, total, call, piece):
        def counted(size):
            pieces[0] += 1
            if pieces[0] == 12:  # 600 / 50: the last piece
                os.kill(os.getpid(), signal.SIGTERM)
            return call(size)
        return original(session, total, counted, piece)

    monkeypatch.setattr(harness.Session, "updates", stop_in_the_last_piece)
    with pytest.raises(RunStopped):
        run_iql(flags, tmp_path / "stopped")
    (run_dir,) = [path.parent for path in (tmp_path / "stopped").glob("*/config.json")]
    progress = checkpoint.load(str(run_dir / CHECKPOINT_FILE))["progress"]
    assert (progress["offline_step"], progress["owed_step"], progress["finished"]) == (600, 600, False)
    monkeypatch.setattr(harness.Session, "updates", original)
    iql.main(iql.Args(resume=str(run_dir)))
    assert checkpoint.load(str(run_dir / CHECKPOINT_FILE))["progress"]["finished"]
    assert scores(run_dir) == scores(reference)
    assert [record["step"] for record in read_evaluations(run_dir)] == [0, 300, 600]


# ---------------------------------------------------------------------------------------------
# The runner's SLURM hook and submission (stand-in tools)

STOPPABLE_SCRIPT = """import signal, sys, time
from pathlib import Path
def stop(number, frame):
    time.sleep(1.0)  # writes its checkpoint
    print("stopped by " + signal.Signals(number).name, file=sys.stderr, flush=True)
    sys.exit(3)
signal.signal(signal.SIGUSR2, stop)
signal.signal(signal.SIGTERM, stop)
Path(sys.argv[sys.argv.index("--log-dir") + 1], "started").write_text("")
time.sleep(300)
"""


def test_the_checkpoint_hook_sees_its_script_exit_at_once(tmp_path, monkeypatch):
    """submitit calls SlotJob.checkpoint from its SIGUSR2 handler while execute() waits for the
    script: the hook must see the script's exit (1 s here), not wait out its 75 s allowance."""
    fake_repo = tmp_path / "repo"
    (fake_repo / "algorithms").mkdir(parents=True)
    (fake_repo / "algorithms" / "iql.py").write_text(STOPPABLE_SCRIPT)
    monkeypatch.setattr(reproduce, "REPO", fake_repo)
    table = reproduce.load_table(str(write_table(tmp_path, "local/x")))
    task = reproduce.Task(table, "local/x", 0, tmp_path / "slot")
    job = reproduce.SlotJob(task)
    seen = {}

    def handler(number, frame):  # what submitit's handler does: call checkpoint, keep its answer
        started = time.monotonic()
        seen["resubmission"] = job.checkpoint()
        seen["seconds"] = time.monotonic() - started

    previous = signal.signal(signal.SIGUSR2, handler)
    try:
        def warn_once_running():
            deadline = time.time() + 30
            while not (task.slot / "started").exists() and time.time() < deadline:
                time.sleep(0.02)
            os.kill(os.getpid(), signal.SIGUSR2)  # lands while execute() is in process.wait()

        def started(process):
            job._process = process  # as SlotJob.__call__ records it
            threading.Thread(target=warn_once_running, daemon=True).start()
        code = reproduce.execute(task, on_start=started)
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert code == EXIT_STOPPED
    assert seen["seconds"] < 20, f"the hook took {seen['seconds']:.1f} s"
    assert isinstance(seen["resubmission"].function, reproduce.SlotJob)
    log = (task.slot / reproduce.LOG_FILE).read_text()
    assert "UTC segment starts: a fresh run" in log
    assert "segment ended: time limit (SIGUSR2, SLURM's warning before it)" in log


def stand_in_tools(tmp_path: Path, sbatch: str, squeue: str = "", sinfo: str = "") -> dict[str, str]:
    """sbatch / srun / squeue / sinfo stand-ins on PATH; sbatch keeps the file it is given."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in (("sbatch", f'cp "$1" {tmp_path}/submitted.sh\n{sbatch}'), ("srun", ""),
                       ("squeue", squeue), ("sinfo", sinfo)):
        tool = bin_dir / name
        tool.write_text(f"#!/bin/sh\n{body}\n")
        tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}


@pytest.mark.parametrize("hours, message", [(0.01, "--time-hours 0.01 is under 5 minutes"),
                                            (0, "--time-hours 0 is under 5 minutes"),
                                            ("inf", "--time-hours inf is not a time limit")])
def test_a_time_limit_too_short_for_the_warning_is_refused(tiny_pointmaze, tmp_path, hours, message):
    pytest.importorskip("submitit")
    env = stand_in_tools(tmp_path, 'echo "Submitted batch job 7"')
    path = write_table(tmp_path, tiny_pointmaze)
    result = reproduce_cli("run", str(path), "--root", str(tmp_path / "root"), "--slurm", "--time-hours", str(hours),
                           env=env)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and message in result.stderr
    assert not (tmp_path / "submitted.sh").exists()  # (before: `#SBATCH --time=0`, which SLURM reads as unlimited)
    assert reproduce.slurm_time(5) == "00:05:00" and reproduce.slurm_time(24 * 60 + 30) == "24:30:00"


@pytest.mark.parametrize("sbatch_error, flags, expected", [
    ("sbatch: error: Invalid generic resource (gres) specification", [], "--gpus-per-run 0"),
    ("sbatch: error: invalid partition specified: gpu\nsbatch: error: Batch job submission failed: Invalid partition name specified",
     ["--partition", "gpu"], "sinfo lists: debug, long."),
], ids=["no-gpus", "no-such-partition"])
def test_an_sbatch_refusal_is_one_error_naming_the_flag(tiny_pointmaze, tmp_path, sbatch_error, flags, expected):
    pytest.importorskip("submitit")
    env = stand_in_tools(tmp_path, f'printf "{sbatch_error}\\n" >&2\nexit 1', sinfo='printf "debug*\\nlong\\n"')
    path = write_table(tmp_path, tiny_pointmaze)
    result = reproduce_cli("run", str(path), "--root", str(tmp_path / "root"), "--slurm", *flags, env=env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert expected in result.stderr and "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.strip()][0].startswith("error: SLURM refused")
    assert len([line for line in result.stderr.splitlines() if line.strip()]) == 1


def test_slurm_without_sbatch_on_path_is_one_error(tiny_pointmaze, tmp_path):
    """Not on a cluster's login node: one message, not submitit's traceback ("Could not detect srun")."""
    pytest.importorskip("submitit")
    (tmp_path / "bin").mkdir()
    path = write_table(tmp_path, tiny_pointmaze)
    result = reproduce_cli("run", str(path), "--root", str(tmp_path / "root"), "--slurm", "--gpus-per-run", "0",
                           env={**os.environ, "PATH": str(tmp_path / "bin")})
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stdout + result.stderr
    assert lines[0].startswith("error: --slurm needs SLURM's sbatch and srun on PATH")


def test_a_second_submission_while_the_first_is_queued_submits_nothing(tiny_pointmaze, tmp_path):
    pytest.importorskip("submitit")
    calls = tmp_path / "sbatch_calls"
    env = stand_in_tools(tmp_path, f'echo x >> {calls}\necho "Submitted batch job 4242"',
                         squeue='case "$*" in *4242*) printf "4242_0 RUNNING\\n4242_1 PENDING\\n";; esac')
    path = write_table(tmp_path, tiny_pointmaze)
    command = ["run", str(path), "--root", str(tmp_path / "root"), "--slurm", "--gpus-per-run", "0"]
    first = reproduce_cli(*command, env=env)
    assert first.returncode == 0 and "submitted 2 runs as job array 4242" in first.stdout, first.stderr
    second = reproduce_cli(*command, env=env)
    assert second.returncode == 0, second.stderr
    assert "refused: 2 of this table's unfinished runs already have a queued or running SLURM task" in second.stdout
    assert "seed 0 (task 4242_0)" in second.stdout and "seed 1 (task 4242_1)" in second.stdout
    assert calls.read_text().count("x") == 1


def test_the_report_marks_numbers_read_off_a_figure(tmp_path):
    path = write_table(tmp_path, "local/x")
    path.write_text(path.read_text() + "published_approx = true\n")
    table = reproduce.load_table(str(path))
    fake_run(reproduce.slot_dir(tmp_path / "root", table, "local/x", 0), [0, 400], [1.0, 2.0], finished=True)
    out = reproduce.report(table, tmp_path / "root", tmp_path / "report", reps=100)
    text = (out / "report.md").read_text()
    assert "≈ 50.0 (read off a figure)" in text and "read by eye off a figure" in text
    with open(out / "report.csv") as file:
        assert next(csv.DictReader(file))["published_approx"] == "True"
    path.write_text(path.read_text().replace("published_approx = true\n", ""))  # a table without the field
    text = (reproduce.report(reproduce.load_table(str(path)), tmp_path / "root", tmp_path / "report2", reps=100)
            / "report.md").read_text()
    assert "≈" not in text and "| 50.0 |" in text


# ---------------------------------------------------------------------------------------------
# A real one-node SLURM (marked slurm)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    folder = tmp_path_factory.mktemp("slurm")
    try:
        local_slurm.start(folder)
    except (local_slurm.Unavailable, OSError, subprocess.CalledProcessError) as error:
        pytest.skip(f"no local SLURM: {error}")
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(folder / "slurm.conf")  # for reproduce.py, sbatch, squeue, and the jobs
    yield folder
    local_slurm.stop(folder)
    if previous is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = previous


def squeue(*args: str) -> str:
    return subprocess.run(["squeue", "-h", *args], capture_output=True, text=True).stdout


def wait_until(condition, timeout: float, what: str, slots=()) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.5)
    logs = "\n".join(f"--- {slot}\n{(slot / reproduce.LOG_FILE).read_text()[-3000:]}" for slot in slots
                     if (slot / reproduce.LOG_FILE).is_file())
    raise AssertionError(f"{what} within {timeout:.0f} s; queue: {squeue()!r}\n{logs}")


def segment_lines(slot: Path) -> list[str]:
    return [line for line in (slot / reproduce.LOG_FILE).read_text().splitlines() if line.startswith("[reproduce]")]


def evaluation_steps(slot: Path) -> list[int]:
    return [record["step"] for record in read_evaluations(reproduce.slot_state(slot).run_dir)]


SLURM_FLAGS = ["--slurm", "--gpus-per-run", "0", "--time-hours", "1", "--max-requeues", "3"]


@pytest.mark.slurm
@pytest.mark.xdist_group("slurm")  # one worker, one cluster (pytest runs with --dist loadgroup)
def test_slurm_a_table_finishes_a_duplicate_is_refused_and_a_rerun_submits_nothing(cluster, tiny_pointmaze, tmp_path):
    path, root = write_table(tmp_path, tiny_pointmaze), tmp_path / "root"  # two seeds, 400 updates each
    table = reproduce.load_table(str(path))
    slots = [reproduce.slot_dir(root, table, tiny_pointmaze, seed) for seed in (0, 1)]
    command = ["run", str(path), "--root", str(root), *SLURM_FLAGS, "--cpus-per-run", "2"]  # one at a time: 1 queued
    first = reproduce_cli(*command)
    assert first.returncode == 0 and "submitted 2 runs" in first.stdout, first.stdout + first.stderr
    duplicate = reproduce_cli(*command)
    assert duplicate.returncode == 0, duplicate.stderr
    assert "refused: 2 of this table's unfinished runs already have a queued or running SLURM task" in duplicate.stdout
    assert "nothing submitted" in duplicate.stdout and len(squeue("-r").splitlines()) == 2

    wait_until(lambda: all(reproduce.slot_state(slot).status == "done" for slot in slots) and not squeue(),
               300, "both runs did not finish", slots)
    report = reproduce_cli("report", str(path), "--root", str(root))
    assert report.returncode == 0, report.stderr
    with open(root / table.name / "report" / "report.csv") as file:
        (row,) = list(csv.DictReader(file))
    assert (row["seeds_finished"], row["seeds_unfinished"]) == ("2", "0")
    for slot in slots:
        lines = segment_lines(slot)
        assert len(lines) == 2 and "segment starts: a fresh run" in lines[0], lines
        assert "UTC [SLURM job " in lines[1] and lines[1].endswith("restart 0] segment ended: finished")
        assert evaluation_steps(slot) == [0, 100, 200, 300, 400]
    rerun = reproduce_cli(*command)
    assert rerun.returncode == 0 and "every run of this table has finished; nothing submitted." in rerun.stdout
    assert not squeue()


@pytest.mark.slurm
@pytest.mark.xdist_group("slurm")  # one worker, one cluster (pytest runs with --dist loadgroup)
def test_slurm_preemption_and_the_time_limit_warning_end_in_a_checkpoint_and_a_resume(cluster, tiny_pointmaze, tmp_path):
    """Seed 0 is pre-empted (`scontrol requeue`: SIGTERM to the step), seed 1 gets SLURM's
    time-limit warning (SIGUSR2 to every process of the step, as `--signal=USR2@90` sends it);
    both checkpoint within seconds, are requeued, resume and finish, every evaluation once."""
    flags = ["--hidden-dims", "32", "32", "--batch-size", "32", "--eval-every", "5000", "--eval-episodes", "2",
             "--log-every", "5000", "--checkpoint-every", "100000"]  # no periodic checkpoint before the stop
    path, root = write_table(tmp_path, tiny_pointmaze, offline_steps=40_000, flags=flags), tmp_path / "root"
    table = reproduce.load_table(str(path))
    slots = [reproduce.slot_dir(root, table, tiny_pointmaze, seed) for seed in (0, 1)]
    result = reproduce_cli("run", str(path), "--root", str(root), *SLURM_FLAGS, "--cpus-per-run", "1")
    assert result.returncode == 0, result.stdout + result.stderr
    job = result.stdout.split("job array ")[1].split(";")[0]

    def training(slot):  # the first evaluation is written: the loop runs
        state = [path for path in slot.glob("iql__*/evaluations.jsonl") if path.read_text().strip()]
        return bool(state)

    wait_until(lambda: all(training(slot) for slot in slots), 240, "the runs did not start training", slots)
    time.sleep(2)
    subprocess.run(["scontrol", "requeue", f"{job}_0"], check=True, capture_output=True)
    sent = time.monotonic()
    subprocess.run(["scancel", "--signal=USR2", f"{job}_1"], check=True, capture_output=True)
    wait_until(lambda: any("requeued" in line for line in segment_lines(slots[1])), 60,
               "the warned task did not checkpoint and requeue", slots)
    warned_seconds = time.monotonic() - sent

    wait_until(lambda: all(reproduce.slot_state(slot).status == "done" for slot in slots) and not squeue(),
               400, "the stopped runs did not finish", slots)
    preempted, warned = segment_lines(slots[0]), segment_lines(slots[1])
    assert any("segment ended: pre-empted or cancelled (SIGTERM" in line for line in preempted), preempted
    assert any("segment ended: time limit (SIGUSR2, SLURM's warning before it); checkpoint at step" in line
               and "requeued" in line for line in warned), warned
    for lines, slot in ((preempted, slots[0]), (warned, slots[1])):
        resumed = [line for line in lines if "segment starts: resuming" in line]
        assert resumed and "restart 1]" in resumed[0], lines
        assert lines[-1].endswith("segment ended: finished")
        assert evaluation_steps(slot) == list(range(0, 40_001, 5000))
        assert not (slot / ".abandoned").exists() and len(reproduce.run_folders(slot)) == 1
    assert warned_seconds < 30, f"{warned_seconds:.1f} s from SIGUSR2 to the requeue"
