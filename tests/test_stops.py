"""Nothing lost on a stop, for every script: SIGTERM / SIGINT write a checkpoint and exit with 3
and a resume command that works, time-triggered checkpoints resume exactly after a SIGKILL, a
second Ctrl-C ends the process at once; and what a finished run leaves: the summary line and
the learning-curve PNG; display-only flags apply on resume."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tyro

from algorithms import calql, cql, iql, rlpd
from common import checkpoint
from common.cli import EXIT_STOPPED
from common.logger import CHECKPOINT_FILE, CURVE_FILE, read_evaluations
from tests.conftest import REPO, TINY_RUN, kill_after_checkpoint, run_script, scores

TINY = {
    rlpd: TINY_RUN,
    iql: ["--hidden-dims", "64", "64", "--batch-size", "64", "--eval-episodes", "2", "--progress", "False"],
    cql: ["--actor-hidden-dims", "64", "64", "--critic-hidden-dims", "64", "64", "--batch-size", "64",
          "--cql-n-actions", "4", "--eval-episodes", "2", "--progress", "False"],
}
TINY[calql] = TINY[cql]


def start(module, flags, log_dir: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, f"algorithms/{module.ALGORITHM}.py", *flags, "--log-dir", str(log_dir)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_evaluations(log_dir: Path, count: int, process: subprocess.Popen, timeout: float = 120) -> Path:
    """The run folder, once it holds `count` evaluations (the training loop is then running)."""
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        folders = list(log_dir.glob("*/config.json"))
        if folders and len(read_evaluations(folders[0].parent)) >= count:
            return folders[0].parent
        time.sleep(0.05)
    raise AssertionError(f"the run ended or stalled before its evaluation {count}: {process.communicate()}")


# Offline phases are stopped at the end of an update chunk, where the state is complete: the
# resumed run must equal an uninterrupted one. The stop handling is common/run.py's, the same in
# every script; one script per signal keeps the suite short (iql is stopped below as well). SIGINT
# and SIGTERM share one handler (tests/test_run.py), so the SIGINT case is in the slow tests.
@pytest.mark.parametrize("module, stop", [pytest.param(rlpd, signal.SIGINT, marks=pytest.mark.slow),
                                          (cql, signal.SIGTERM)], ids=["rlpd", "cql"])
def test_a_stop_signal_checkpoints_and_the_resumed_run_matches(module, stop, tiny_pointmaze, tmp_path):
    flags = ["--env", tiny_pointmaze, "--offline-steps", "800", "--online-steps", "0", "--log-every", "50",
             "--eval-every", "400", *TINY[module]]
    reference = module.main(tyro.cli(module.Args, args=[*flags, "--log-dir", str(tmp_path / "full")]))

    process = start(module, flags, tmp_path / "stopped")
    # A stop is seen between small update pieces, so one sent right after the step-0 evaluation
    # could checkpoint at step 0; after the second evaluation it lands mid-phase.
    run_dir = wait_for_evaluations(tmp_path / "stopped", 2, process)
    process.send_signal(stop)
    out, err = process.communicate(timeout=120)
    assert process.returncode == EXIT_STOPPED, err
    assert f"--resume {run_dir}" in err and "Summary:" in out
    payload = checkpoint.load(str(run_dir / CHECKPOINT_FILE))
    assert 0 < payload["progress"]["offline_step"] < 800 and not payload["progress"]["finished"]

    command = err.split("Continue with:")[1].split()  # the printed command, run as printed
    resumed = subprocess.run([sys.executable, *command[1:]], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert scores(run_dir) == scores(reference)


def test_time_triggered_checkpoints_resume_exactly_after_sigkill(tiny_pointmaze, tmp_path):
    # No step-scheduled checkpoint before the end: every checkpoint here is triggered by the clock,
    # at an episode end (every 300 steps), the first inside the random-action phase.
    flags = ["--env", tiny_pointmaze, "--online-steps", "900", "--start-training", "450",
             "--checkpoint-every", "1000000", "--checkpoint-minutes", "0.0001", *TINY_RUN]
    reference = rlpd.main(tyro.cli(rlpd.Args, args=[*flags, "--log-dir", str(tmp_path / "full")]))
    run_dir = kill_after_checkpoint("rlpd.py", flags, tmp_path / "killed",
                                    ready=lambda payload: payload["progress"]["online_step"] >= 300)
    assert len(scores(run_dir)) < len(scores(reference))
    rlpd.main(rlpd.Args(resume=str(run_dir)))
    assert scores(run_dir) == scores(reference)


def test_a_stop_mid_trajectory_keeps_the_owed_updates(tiny_pointmaze, tmp_path):
    """Cal-QL updates after each trajectory; a stop cuts the trajectory, saves its rows with the
    updates they are owed, and the resumed run does them: no update lost or repeated."""
    flags = ["--env", tiny_pointmaze, "--offline-steps", "0", "--online-steps", "900", "--eval-every", "300",
             "--utd", "2", *TINY[calql]]
    process = start(calql, flags, tmp_path)
    run_dir = wait_for_evaluations(tmp_path, 1, process)
    time.sleep(1.0)  # inside the first trajectory (the first updates come after 300 steps)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == EXIT_STOPPED, err
    progress = checkpoint.load(str(run_dir / CHECKPOINT_FILE))["progress"]
    assert 0 < progress["online_step"] < 900 and progress["pending_updates"] > 0

    calql.main(calql.Args(resume=str(run_dir)))
    payload = checkpoint.load(str(run_dir / CHECKPOINT_FILE))
    assert payload["progress"]["finished"] and payload["progress"]["pending_updates"] == 0
    assert len(payload["online_rows"]["rewards"]) == 900
    assert int(payload["agent"]["critic"]["step"]) == 2 * 900  # utd x every online step, exactly once
    assert [r["step"] for r in read_evaluations(run_dir)] == [0, 300, 600, 900]


# Every script's loop runs inside common/run.py's StopSignals (Session.run). A second Ctrl-C sent
# to a running script races its first: the first is only handled when the jitted piece it landed
# in returns, the loop then checkpoints at once, and two signals inside one piece arrive as one.
# So the property is checked where it is decided: once a first stop has been handled, a second
# Ctrl-C ends the process inside a long jitted call, without waiting for it to return.
SECOND_CTRL_C = """
import sys, time
import jax, jax.numpy as jnp
from common import run
with run.StopSignals() as stops:
    print("ready", flush=True)
    while stops.received is None:
        time.sleep(0.01)
    spin = jax.jit(lambda x: jax.lax.fori_loop(0, 2**31 - 1, lambda i, v: jnp.sin(v) + 1.0, x))
    print("first stop handled; in a long jitted call", flush=True)
    spin(jnp.ones(256)).block_until_ready()
print("the long call returned", flush=True)
"""


def test_a_second_ctrl_c_ends_the_process_inside_a_long_jitted_call():
    process = subprocess.Popen([sys.executable, "-c", SECOND_CTRL_C], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline() == "ready\n", process.stderr.read()
        process.send_signal(signal.SIGINT)
        lines = [process.stdout.readline() for _ in range(3)]  # the handler's message starts on a new line
        assert lines[1].startswith("SIGINT received (Ctrl-C)") and "in a long jitted call" in lines[2], lines
        time.sleep(1.0)  # compiled and running (the loop takes minutes)
        started = time.monotonic()
        process.send_signal(signal.SIGINT)
        out, _ = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == -signal.SIGINT and "returned" not in out
    assert time.monotonic() - started < 30  # not after the call (minutes)


def test_a_finished_run_prints_its_summary_and_draws_its_curve(tiny_pointmaze, tmp_path):
    result = run_script("iql.py", "--env", tiny_pointmaze, "--offline-steps", "200", "--online-steps", "0",
                        "--eval-every", "100", "--log-dir", str(tmp_path), *TINY[iql])
    assert result.returncode == 0, result.stderr
    (run_dir,) = tmp_path.iterdir()
    assert result.stdout.index("Preset pointmaze (iql): ours") < result.stdout.index(f"Run folder: {run_dir}")
    assert result.stdout.index(f"Run folder: {run_dir}") < result.stdout.index("[offline step 0]")
    final = read_evaluations(run_dir)[-1]
    summary = result.stdout.strip().splitlines()[-1]
    assert summary.startswith(f"Summary: final success rate {final['success_rate']:.2f}")
    assert f"final normalized score {final['normalized_score']:.1f}" in summary
    assert summary.endswith(f"200 steps, 0:00:{summary.split('steps, 0:00:')[1][:2]} wall time, run folder {run_dir}")
    assert (run_dir / CURVE_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow  # outside CI's 20-minute budget; `pytest -m slow` runs it
def test_display_flags_apply_on_resume(tiny_pointmaze, tmp_path):
    flags = ["--env", tiny_pointmaze, "--offline-steps", "1000", "--online-steps", "0", "--log-every", "50",
             "--eval-every", "500", *TINY[iql][:-2]]  # the bar on
    process = start(iql, flags, tmp_path)
    wait_for_evaluations(tmp_path, 1, process)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == EXIT_STOPPED and "step/s" in err  # the bar was shown
    run_dir = err.split("--resume ")[1].split()[0]
    result = run_script("iql.py", "--resume", run_dir, "--progress", "False", "--seed", "3", timeout=300)
    assert result.returncode == 0, result.stderr
    assert "step/s" not in result.stderr  # --progress False applies on resume
    assert "ignored: --seed." in result.stdout  # other flags do not
    assert "Preset pointmaze" not in result.stdout  # the preset note is for new runs
