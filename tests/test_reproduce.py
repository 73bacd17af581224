"""benchmarks/reproduce.py: table files, slot states, run / kill / re-run end to end on a tiny
table, the report's numbers against the run folders, and the SLURM submission (no cluster)."""

from __future__ import annotations

import csv
import fcntl
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from benchmarks import reproduce
from common import checkpoint
from tests.conftest import REPO

TINY_FLAGS = ["--hidden-dims", "32", "32", "--batch-size", "32", "--eval-every", "100", "--eval-episodes", "2",
              "--log-every", "50", "--checkpoint-every", "100"]


def write_table(folder: Path, env: str, **overrides) -> Path:
    """A tiny table file: IQL, one dataset, 400 offline updates, no online phase, two seeds."""
    fields = {"name": "tiny", "title": "tiny IQL", "algorithm": "iql", "seeds": 2, "offline_steps": 400,
              "online_steps": 0, "flags": TINY_FLAGS, "evaluation": "normalized score, last evaluation",
              "comparable": True, **overrides}
    lines = [f"{key} = {json.dumps(value)}" for key, value in fields.items()]
    lines += ["[source]", 'paper = "none (test)"', 'arxiv = "0000.00000"', 'arxiv_version = "v1"', 'table = "Table 0"',
              "[[runs]]", f"env = {json.dumps(env)}", "published = 50.0"]
    path = folder / "tiny.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def reproduce_cli(*args: str, **popen) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "benchmarks/reproduce.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, **popen)


def fake_run(slot: Path, steps: list[int], scores: list[float], finished: bool, name: str = "iql__x__0__t") -> Path:
    """A run folder as a script leaves it: config.json, evaluations.jsonl and a checkpoint."""
    run_dir = slot / name
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({"algorithm": "iql", "offline_steps": 100}))
    (run_dir / "evaluations.jsonl").write_text("".join(
        json.dumps({"step": s, "phase": "offline", "return": v, "normalized_score": v}) + "\n"
        for s, v in zip(steps, scores)))
    checkpoint.save(str(run_dir / "checkpoints" / "latest.msgpack"), {
        "agent": {"w": np.ones((50, 50), np.float32)}, "online_rows": {"r": np.zeros(10, np.float32)},
        "online_cursor": 0, "progress": {"offline_step": steps[-1], "online_step": 0, "finished": finished},
        "elapsed": 1.0})
    return run_dir


# ---------------------------------------------------------------------------------------------
# Table files


def test_every_table_file_loads_with_provenance_for_each_published_number():
    paths = reproduce.table_paths()
    assert len(paths) >= 8
    algorithms = set()
    for path in paths:
        table = reproduce.load_table(str(path))
        algorithms.add(table.algorithm)
        assert table.name == path.stem
        for field in reproduce.SOURCE_FIELDS:
            assert table.source[field].strip(), (path, field)
        for run in table.runs:
            assert isinstance(run.get("published"), (int, float)) != bool(run.get("published_missing")), (path, run)
        if not table.comparable:
            assert len(table.successor_note) > 40, path
    assert {"rlpd", "iql", "cql", "calql", "wsrl", "off2on"} <= algorithms


def parse_with_the_script(command: list[str]):
    """The script's own tyro parser and flag checks on a command the runner built (no data, no training)."""
    import importlib

    import tyro

    assert command[0] == "python" and command[1].startswith("algorithms/"), command
    module = importlib.import_module("algorithms." + Path(command[1]).stem)
    try:
        args = tyro.cli(module.Args, args=command[2:])
    except SystemExit as error:  # tyro's answer to an unknown flag or a bad value
        raise AssertionError(f"{command[1]} refuses {' '.join(command[2:])} (exit {error.code})") from None
    module.validate(args)  # e.g. off2on: --online-steps a multiple of --epoch-steps
    return args


def test_every_table_command_is_accepted_by_its_script_with_the_steps_in_the_right_flags(tmp_path):
    """Each table's first run, as the runner would start it, parsed by the script it calls: wsrl's and
    off2on's pre-training lengths go to --offline-steps, their fine-tuning to --online-steps."""
    assert reproduce.STEP_FLAGS["wsrl"] == ("--offline-steps", "--online-steps")
    assert reproduce.STEP_FLAGS["off2on"] == ("--offline-steps", "--online-steps")
    seen = set()
    for path in reproduce.table_paths():
        table = reproduce.load_table(str(path))
        run = table.runnable[0]
        command = reproduce.fresh_command(table, run["env"], 3, tmp_path / "slot")
        args = parse_with_the_script(command)
        offline_field, online_field = (flag[2:].replace("-", "_") for flag in reproduce.STEP_FLAGS[table.algorithm])
        assert getattr(args, offline_field) == table.offline_steps, (path, offline_field)
        assert getattr(args, online_field) == table.online_steps, (path, online_field)
        assert (args.env, args.seed, args.log_dir, args.progress) == (run["env"], 3, str(tmp_path / "slot"), False)
        seen.add(table.algorithm)
    assert {"wsrl", "off2on"} <= seen
    # the resume command too (its run folder need not exist to be parsed)
    table = reproduce.load_table("wsrl-antmaze")
    assert parse_with_the_script(reproduce.resume_command(table, tmp_path / "run")).resume == str(tmp_path / "run")


def test_rows_without_a_dataset_are_listed_but_never_run(tmp_path):
    path = write_table(tmp_path, "local/x")
    path.write_text(path.read_text() + '[[runs]]\nenv = "hopper-random"\npublished_missing = "not found"\n'
                    'dataset_missing = "no successor of D4RL hopper-random yet"\n')
    table = reproduce.load_table(str(path))
    assert [run["env"] for run in table.runnable] == ["local/x"] and len(table.runs) == 2
    assert {task.env for task in reproduce.tasks_for(table, 2, tmp_path / "root")} == {"local/x"}
    result = reproduce_cli("run", str(path), "--root", str(tmp_path / "root"), "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "# hopper-random: not run, no dataset: no successor of D4RL hopper-random yet" in result.stdout
    assert "--env hopper-random" not in result.stdout and result.stdout.count("--env local/x") == 2

    path.write_text(path.read_text().replace('"no successor of D4RL hopper-random yet"', '" "'))
    with pytest.raises(reproduce.ReproduceError, match="'dataset_missing' must say"):
        reproduce.load_table(str(path))
    path.write_text(path.read_text().replace('env = "local/x"\npublished = 50.0\n',
                                             'env = "local/x"\npublished = 50.0\ndataset_missing = "none"\n'))
    path.write_text(path.read_text().replace('dataset_missing = " "', 'dataset_missing = "none either"'))
    with pytest.raises(reproduce.ReproduceError, match="nothing to run"):
        reproduce.load_table(str(path))


@pytest.mark.parametrize("change, message", [
    ({"source": None}, "missing field 'source'"),
    ({"arxiv_version": None}, "lacks 'arxiv_version'"),
    ({"published": None}, "exactly one of 'published'"),
    ({"both": True}, "exactly one of 'published'"),
    ({"flags": ["--seed", "3"]}, "the runner sets it"),
    ({"flags": ["--online-steps", "5"]}, "the runner sets it"),
])
def test_a_table_without_provenance_or_with_runner_flags_is_refused(tmp_path, change, message):
    path = write_table(tmp_path, "local/x", flags=change.get("flags", TINY_FLAGS))
    text = path.read_text()
    if "source" in change:
        text = text.replace("[source]\n", "[unused]\n")
    if "arxiv_version" in change:
        text = text.replace('arxiv_version = "v1"\n', "")
    if "published" in change:
        text = text.replace("published = 50.0\n", "")
    if "both" in change:
        text += 'published_missing = "not found"\n'
    path.write_text(text)
    with pytest.raises(reproduce.ReproduceError, match=message):
        reproduce.load_table(str(path))


def test_list_prints_every_table_with_its_run_count():
    result = reproduce_cli("list")
    assert result.returncode == 0, result.stderr
    for path in reproduce.table_paths():
        table = reproduce.load_table(str(path))
        row = next(line for line in result.stdout.splitlines() if line.startswith(table.name + " "))
        assert f" {len(table.runnable) * table.seeds} " in row
    rlpd = next(line for line in result.stdout.splitlines() if line.startswith("rlpd-antmaze "))
    assert " 33 " in rlpd  # 300k steps at the measured 2.5 env steps/s
    assert "not measured" in rlpd
    off2on = next(line for line in result.stdout.splitlines() if line.startswith("off2on-locomotion "))
    assert " 12 " in off2on and " 60 " in off2on  # every row has a dataset (ours where Minari has none)
    assert " 178 " in off2on  # 1M vmapped pre-training updates at 1.6/s, then 250k steps at 15.4/s
    wsrl = next(line for line in result.stdout.splitlines() if line.startswith("wsrl-antmaze "))
    assert wsrl.count("not measured") == 3  # no measured WSRL throughput: CPU per run, CPU total, GPU


# ---------------------------------------------------------------------------------------------
# Slots


def test_slot_state_reads_completion_from_the_checkpoint(tmp_path):
    table = reproduce.load_table(str(write_table(tmp_path, "local/x")))
    task = reproduce.Task(table, "local/x", 0, tmp_path / "slot")
    assert task.state().status == "pending"
    assert task.command()[:4] == ["python", "algorithms/iql.py", "--env", "local/x"]

    (tmp_path / "slot" / "iql__no-checkpoint-yet").mkdir(parents=True)
    (tmp_path / "slot" / "iql__no-checkpoint-yet" / "config.json").write_text("{}")
    assert task.state().status == "pending"  # nothing to resume
    fake_run(tmp_path / "slot", [0, 100], [1.0, 2.0], finished=True, name="calql__x__0__other")
    assert task.state().status == "pending"  # another script's run folder is not this run

    run_dir = fake_run(tmp_path / "slot", [0, 100], [1.0, 2.0], finished=False)
    assert reproduce.read_progress(run_dir)["offline_step"] == 100
    state = task.state()
    assert (state.status, state.run_dir, state.step) == ("interrupted", run_dir, 100)
    assert task.command() == ["python", "algorithms/iql.py", "--resume", str(run_dir), "--progress", "False"]

    fake_run(tmp_path / "slot", [0, 100, 200], [1.0, 2.0, 3.0], finished=True, name="iql__x__0__t2")
    assert task.state().status == "done" and task.command() is None


def test_dry_run_prints_commands_and_refuses_a_slot_started_with_other_settings(tmp_path):
    path = write_table(tmp_path, "local/x")
    result = reproduce_cli("run", str(path), "--root", str(tmp_path / "root"), "--dry-run")
    assert result.returncode == 0, result.stderr
    commands = [line for line in result.stdout.splitlines() if line.startswith("python ")]
    assert len(commands) == 2 and all("--offline-steps 400" in line for line in commands)
    assert not (tmp_path / "root").exists()  # nothing was started

    table = reproduce.load_table(str(path))
    slot = reproduce.slot_dir(tmp_path / "root", table, "local/x", 0)
    slot.mkdir(parents=True)
    old = reproduce.fresh_command(table, "local/x", 0, slot)
    (slot / reproduce.COMMAND_FILE).write_text(json.dumps({"command": [*old[:-2], "--expectile", "0.9", *old[-2:]]}))
    result = reproduce_cli("run", str(path), "--root", str(tmp_path / "root"), "--dry-run")
    assert result.returncode == 2 and "was started with other settings" in result.stderr


# A table's script that pre-trains first (wsrl.py, off2on.py) does so inside its own run folder: a
# stopped run, in either phase, is resumed by its own script, and one killed before its first
# checkpoint is set aside and started afresh.

FAKE_SCRIPT = """import json, sys
from pathlib import Path
import msgpack  # the runner reads only the checkpoint's progress entry
argv = sys.argv[1:]
if "--resume" in argv:
    run_dir = Path(argv[argv.index("--resume") + 1])
else:
    run_dir = Path(argv[argv.index("--log-dir") + 1]) / "{name}__x__0__t"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({{"algorithm": "{name}"}}))
(run_dir / "checkpoints" / "latest.msgpack").write_bytes(msgpack.packb({{"agent": {{}},
    "progress": {{"offline_step": 9, "online_step": 9, "finished": True}}}}))
with open(run_dir.parent / "calls.txt", "a") as calls:
    calls.write("{name} " + " ".join(argv) + "\\n")
"""


def test_a_wsrl_slot_resumes_its_own_run_in_pre_training_and_restarts_one_without_a_checkpoint(tmp_path, monkeypatch):
    table = reproduce.load_table("wsrl-kitchen")
    task = reproduce.Task(table, "kitchen-mixed", 0, tmp_path / "slot")
    fresh = reproduce.fresh_command(table, "kitchen-mixed", 0, task.slot)
    assert task.command() == fresh and "--offline-steps" in fresh and "--pretrained" not in fresh
    stopped = fake_run(task.slot, [0, 100], [1.0, 2.0], finished=False, name="wsrl__kitchen__0__t")
    assert task.state().status == "interrupted"  # stopped during its pre-training (offline step 100)
    assert task.command() == ["python", "algorithms/wsrl.py", "--resume", str(stopped), "--progress", "False"]

    fake_repo = tmp_path / "repo"
    (fake_repo / "algorithms").mkdir(parents=True)
    (fake_repo / "algorithms" / "wsrl.py").write_text(FAKE_SCRIPT.format(name="wsrl"))
    monkeypatch.setattr(reproduce, "REPO", fake_repo)
    assert reproduce.execute(task) == 0
    assert (task.slot / "calls.txt").read_text().splitlines() == [f"wsrl --resume {stopped} --progress False"]
    assert task.state().status == "done" and task.command() is None

    other = reproduce.Task(table, "kitchen-partial", 0, tmp_path / "slot2")
    (other.slot / "wsrl__killed-before-its-checkpoint").mkdir(parents=True)
    (other.slot / "wsrl__killed-before-its-checkpoint" / "config.json").write_text("{}")
    assert reproduce.execute(other) == 0
    assert (other.slot / ".abandoned" / "wsrl__killed-before-its-checkpoint").is_dir()
    fresh_other = reproduce.fresh_command(table, "kitchen-partial", 0, other.slot)
    assert (other.slot / "calls.txt").read_text().splitlines() == ["wsrl " + " ".join(fresh_other[2:])]
    assert json.loads((other.slot / reproduce.COMMAND_FILE).read_text())["command"] == fresh_other


# ---------------------------------------------------------------------------------------------
# End to end: run, kill the runner mid-way, run again, report


def lock_is_free(slot: Path) -> bool:
    with open(slot / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(handle, fcntl.LOCK_UN)
        return True


@pytest.fixture(scope="module")
def killed_and_rerun(tiny_pointmaze, tmp_path_factory):
    """`run` on the tiny table (two seeds, one at a time), the runner SIGKILLed once seed 0 has
    finished and seed 1 has a checkpoint; then the same command again."""
    folder = tmp_path_factory.mktemp("reproduce")
    path, root = write_table(folder, tiny_pointmaze), folder / "root"
    table = reproduce.load_table(str(path))
    slots = [reproduce.slot_dir(root, table, tiny_pointmaze, seed) for seed in (0, 1)]
    runner = subprocess.Popen([sys.executable, "benchmarks/reproduce.py", "run", str(path), "--root", str(root),
                               "--jobs", "1"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 150
    while time.time() < deadline and runner.poll() is None:
        if reproduce.slot_state(slots[0]).status == "done" and reproduce.slot_state(slots[1]).status == "interrupted":
            break
        time.sleep(0.02)
    runner.send_signal(signal.SIGKILL)
    runner.wait()
    assert runner.returncode == -signal.SIGKILL, "the runner must be killed mid-way for this test to mean anything"
    before = {"seed0": (slots[0] / reproduce.LOG_FILE).read_text(),
              "seed0_evaluations": (reproduce.slot_state(slots[0]).run_dir / "evaluations.jsonl").read_text(),
              "seed1_state": reproduce.slot_state(slots[1])}
    deadline = time.time() + 60  # the orphaned run got SIGTERM: it checkpoints, exits and frees its slot
    while time.time() < deadline and not lock_is_free(slots[1]):
        time.sleep(0.1)
    rerun = reproduce_cli("run", str(path), "--root", str(root), "--jobs", "1")
    return table, root, slots, before, rerun


def test_rerun_after_kill_resumes_the_interrupted_run_and_skips_the_finished_one(killed_and_rerun):
    table, root, slots, before, rerun = killed_and_rerun
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "runs: 1 done before, 1 finished" in rerun.stdout
    # the finished run was not touched
    assert (slots[0] / reproduce.LOG_FILE).read_text() == before["seed0"]
    assert (reproduce.slot_state(slots[0]).run_dir / "evaluations.jsonl").read_text() == before["seed0_evaluations"]
    # the interrupted one was resumed in its own run folder, from its checkpoint, to the end
    assert before["seed1_state"].status == "interrupted" and 0 < before["seed1_state"].step < 400
    state = reproduce.slot_state(slots[1])
    assert state.status == "done" and state.run_dir == before["seed1_state"].run_dir
    assert len(reproduce.run_folders(slots[1])) == 1
    log = (slots[1] / reproduce.LOG_FILE).read_text()
    assert f"--resume {state.run_dir}" in log and "Resuming" in log
    steps = [record["step"] for record in reproduce.read_jsonl(state.run_dir / "evaluations.jsonl")]
    assert steps == [0, 100, 200, 300, 400]


def test_report_numbers_equal_those_computed_from_the_run_folders(killed_and_rerun, tmp_path):
    table, root, slots, _, _ = killed_and_rerun
    finals = [reproduce.read_jsonl(reproduce.slot_state(slot).run_dir / "evaluations.jsonl")[-1]["normalized_score"]
              for slot in slots]
    # an unfinished third seed, which must be shown and left out of every statistic
    fake_run(reproduce.slot_dir(root, table, table.runs[0]["env"], 2), [0, 100], [99.0, 99.0], finished=False)

    out = reproduce.report(table, root, tmp_path / "report", reps=2000)
    with open(out / "report.csv") as file:
        (row,) = list(csv.DictReader(file))
    assert int(row["seeds_finished"]) == 2 and int(row["seeds_unfinished"]) == 1
    assert float(row["mean"]) == pytest.approx(np.mean(finals))
    assert float(row["stderr"]) == pytest.approx(np.std(finals, ddof=1) / np.sqrt(2))
    assert float(row["iqm"]) == pytest.approx(np.mean(finals))  # two seeds: nothing is trimmed
    assert min(finals) - 1e-9 <= float(row["iqm_ci_low"]) <= float(row["iqm_ci_high"]) <= max(finals) + 1e-9
    successes = [reproduce.read_jsonl(reproduce.slot_state(slot).run_dir / "evaluations.jsonl")[-1]["success_rate"]
                 for slot in slots]
    assert float(row["success_rate"]) == pytest.approx(np.mean(successes))
    assert int(row["steps"]) == 400 and float(row["published"]) == 50.0
    assert "seed 2: interrupted at step 100" in row["unfinished"]
    text = (out / "report.md").read_text()
    assert f"{np.mean(finals):.1f} ± {np.std(finals, ddof=1) / np.sqrt(2):.1f}" in text
    assert "seed 2: interrupted at step 100" in text
    png = out / f"{reproduce.env_key(table.runs[0]['env'])}.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_links_the_last_video_of_each_run(tmp_path):
    table = reproduce.load_table(str(write_table(tmp_path, "local/pointmaze/umaze-dense-v0", seeds=3)))
    root = tmp_path / "root"
    slots = [reproduce.slot_dir(root, table, table.runs[0]["env"], seed) for seed in range(3)]
    recorded = fake_run(slots[0], [0, 100], [10.0, 20.0], finished=True)
    with open(recorded / "evaluations.jsonl", "w") as file:  # as --capture-video writes them
        for step in (0, 100):
            file.write(json.dumps({"step": step, "phase": "offline", "return": 1.0, "normalized_score": 1.0,
                                   "video": f"videos/offline_{step:07d}.mp4"}) + "\n")
    (recorded / "videos").mkdir()
    for step in (0, 100):
        (recorded / "videos" / f"offline_{step:07d}.mp4").write_bytes(b"mp4")
    fake_run(slots[1], [0, 100], [10.0, 20.0], finished=True)  # no videos: no link
    out = reproduce.report(table, root, tmp_path / "report", reps=100)
    text = (out / "report.md").read_text()
    link = os.path.relpath(recorded / "videos" / "offline_0000100.mp4", out)
    assert f"- local/pointmaze/umaze-dense-v0, seed 0 (done): [videos/offline_0000100.mp4]({link})" in text
    assert (out / link).resolve() == (recorded / "videos" / "offline_0000100.mp4").resolve()
    assert "offline_0000000.mp4" not in text and "seed 1 (" not in text
    (recorded / "videos" / "offline_0000100.mp4").unlink()  # a link to a missing file is left out
    assert "## Videos" not in (reproduce.report(table, root, tmp_path / "report", reps=100) / "report.md").read_text()


# ---------------------------------------------------------------------------------------------
# Statistics


def test_iqm_trims_a_quarter_at_each_end():
    assert reproduce.iqm(np.array([0.0, 10.0, 20.0, 1000.0])) == pytest.approx(15.0)
    assert reproduce.iqm(np.arange(8.0)) == pytest.approx(np.mean([2, 3, 4, 5]))


def test_stratified_bootstrap_resamples_within_each_dataset():
    # dataset A always scores 0, dataset B always 100: a stratified resample keeps half of each, so
    # every resampled mean is exactly 50; an unstratified one would vary.
    low, high = reproduce.stratified_bootstrap_ci([np.zeros(5), np.full(5, 100.0)], statistic=np.mean, reps=500)
    assert low == pytest.approx(50.0) and high == pytest.approx(50.0)
    scores = np.random.default_rng(0).normal(50, 10, 10)
    low, high = reproduce.stratified_bootstrap_ci([scores], reps=4000)
    assert low < reproduce.iqm(scores) < high and high - low > 1.0


def test_interval_matches_rliable():
    rliable = pytest.importorskip("rliable.library")
    from rliable import metrics

    scores = np.random.default_rng(1).normal(60, 15, size=(10, 3))  # 10 seeds x 3 datasets
    _, intervals = rliable.get_interval_estimates({"x": scores}, lambda s: np.array([metrics.aggregate_iqm(s)]),
                                                  reps=4000, random_state=np.random.RandomState(0))
    ours = reproduce.stratified_bootstrap_ci([scores[:, task] for task in range(3)], reps=4000)
    np.testing.assert_allclose(ours, intervals["x"][:, 0], atol=1.0)  # two bootstraps: Monte Carlo noise only


# ---------------------------------------------------------------------------------------------
# SLURM through submitit, without a cluster


def test_side_by_side_runs_load_each_dataset_once_first_and_stop_on_a_missing_one(tmp_path):
    path = write_table(tmp_path, "local/pointmaze/nosuchmaze-v0")
    result = reproduce_cli("run", str(path), "--root", str(tmp_path / "root"), "--jobs", "2")
    assert result.returncode == 2
    assert "cannot load the dataset of --env local/pointmaze/nosuchmaze-v0" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "root").exists()  # no run was started


def test_slurm_submission_is_one_requeueable_job_array_with_a_time_limit(tiny_pointmaze, tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    sbatch = bin_dir / "sbatch"  # records the file it is given, answers like SLURM
    sbatch.write_text(f'#!/bin/sh\ncp "$1" {tmp_path}/submitted.sh\necho "Submitted batch job 4242"\n')
    (bin_dir / "srun").write_text("#!/bin/sh\n")  # submitit looks for it before it submits
    for tool in (sbatch, bin_dir / "srun"):
        tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    path = write_table(tmp_path, tiny_pointmaze, seeds=4)
    root = tmp_path / "root"
    table = reproduce.load_table(str(path))
    fake_run(reproduce.slot_dir(root, table, tiny_pointmaze, 1), [0, 400], [1.0, 2.0], finished=True)  # done: not submitted

    result = reproduce_cli("run", str(path), "--root", str(root), "--slurm", "--partition", "gpu", "--gpus-per-run", "1",
                           "--time-hours", "2", "--max-parallel", "2", "--max-requeues", "5",
                           env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"})
    assert result.returncode == 0, result.stderr
    assert "submitted 3 runs as job array 4242" in result.stdout
    script = (tmp_path / "submitted.sh").read_text()
    assert "#SBATCH --array=0-2%2\n" in script  # 3 unfinished runs, 2 at a time
    assert "#SBATCH --time=02:00:00\n" in script  # HH:MM:SS (a bare number is minutes; 0 is unlimited)
    assert "#SBATCH --requeue" in script
    # the warning before the limit, to every process of the step (no B:), so the script itself gets it
    assert f"#SBATCH --signal=USR2@{reproduce.WARNING_SECONDS}\n" in script
    assert "#SBATCH --partition=gpu" in script and "#SBATCH --gpus-per-node=1" in script
    assert f"cd {REPO}" in script


def test_local_executor_runs_the_slot_job(tmp_path):
    submitit = pytest.importorskip("submitit")
    table = reproduce.load_table(str(write_table(tmp_path, "local/x")))
    task = reproduce.Task(table, "local/x", 0, tmp_path / "slot")
    fake_run(task.slot, [0, 400], [1.0, 2.0], finished=True)
    # through submitit's local executor (pickled, run in another process): a finished slot is left alone
    (job,) = reproduce.submit([reproduce.Task(table, "local/x", 1, tmp_path / "other")], tmp_path / "jobs", cluster="local")
    # a pending slot with an unknown dataset: the script fails, and the job reports it
    with pytest.raises(Exception, match="exit code 2"):
        job.result()
    assert reproduce.submit([task], tmp_path / "jobs2", cluster="local") == []
    assert isinstance(reproduce.SlotJob(task).checkpoint(), submitit.helpers.DelayedSubmission)
