"""common/run.py and the run folder's outputs: flag tables, --resume, checkpoint payload, stops,
time-based checkpoints, the summary line, the learning-curve PNG, the phase-aware progress rate."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import stat

import jax.numpy as jnp
import numpy as np
import pytest

from common import buffers, logger, run
from common.cli import UserError


@dataclasses.dataclass
class Args:
    seed: int = 0
    eval_every: int = 10
    checkpoint_every: int = 100
    checkpoint_minutes: float = 10.0
    hidden_dims: tuple[int, ...] | None = None
    progress: bool = True
    resume: str | None = None
    log_dir: str = "runs"


RULES = [*[rule for rule in run.RUN_RULES if rule[0] in ("seed", "eval_every", "checkpoint_every",
                                                           "checkpoint_minutes")],
         ("hidden_dims", run.widths, "must be positive widths")]


@pytest.mark.parametrize("flags, message", [
    (dict(seed=-1), "--seed must be >= 0, got -1."),
    (dict(eval_every=0), "--eval-every must be >= 1, got 0."),
    (dict(checkpoint_minutes=0.0), "--checkpoint-minutes must be positive, got 0.0."),
    (dict(hidden_dims=(64, 0)), "--hidden-dims must be positive widths, got (64, 0)."),
])
def test_flag_table_names_the_flag_and_the_value(flags, message):
    with pytest.raises(UserError) as error:
        run.check_flags(Args(**flags), RULES)
    assert str(error.value) == message


def test_unset_preset_flags_pass_the_table():
    run.check_flags(Args(hidden_dims=None), RULES)


def test_log_dir_that_is_a_file_is_named_as_such(tmp_path):
    path = tmp_path / "runs"
    path.write_text("")
    with pytest.raises(UserError, match="is a file, not a folder"):
        run.check_log_dir(str(path))


def write_run_folder(tmp_path, algorithm="toy", **saved):
    run_dir = tmp_path / "toy__x__0__1"
    run_dir.mkdir()
    config = {"algorithm": algorithm, **dataclasses.asdict(Args(**saved)), "observation_dim": 3}
    (run_dir / logger.CONFIG_FILE).write_text(json.dumps(config))
    return str(run_dir)


def test_resume_uses_saved_args_but_display_flags_given_now(tmp_path, capsys):
    run_dir = write_run_folder(tmp_path, hidden_dims=[32, 32], eval_every=7)
    agent = {"w": jnp.ones(2)}
    online = buffers.empty_like({"x": np.zeros(1, np.float32)}, 4)
    run.save_checkpoint(run_dir, agent, online, run.Progress(offline_step=5), 1.0)
    args, folder, payload = run.resolve_resume(Args(resume=run_dir, progress=False, seed=3), "toy")
    assert folder == run_dir and payload["progress"]["offline_step"] == 5
    assert args.hidden_dims == (32, 32) and args.eval_every == 7  # saved, lists back to tuples
    assert args.progress is False  # display-only: applies on resume
    assert args.seed == 0
    assert "ignored: --seed" in capsys.readouterr().out


def test_resume_of_another_algorithm_or_without_checkpoint_is_refused(tmp_path):
    run_dir = write_run_folder(tmp_path, algorithm="other")
    with pytest.raises(UserError, match="is a run of 'other', not toy"):
        run.resolve_resume(Args(resume=run_dir), "toy")
    os.remove(os.path.join(run_dir, logger.CONFIG_FILE))
    with pytest.raises(UserError, match="no config.json"):
        run.resolve_resume(Args(resume=run_dir), "toy")


def test_take_pretrained_refuses_only_an_explicit_conflicting_flag():
    pretrained = Args(seed=5, hidden_dims=(32, 32), eval_every=7)
    taken = run.take_pretrained(Args(seed=1), pretrained, ("hidden_dims", "eval_every"))
    assert (taken.seed, taken.hidden_dims, taken.eval_every) == (1, (32, 32), 7)  # the rest stays the caller's
    assert run.take_pretrained(Args(hidden_dims=(32, 32)), pretrained, ("hidden_dims",)).hidden_dims == (32, 32)
    with pytest.raises(UserError, match=r"^--hidden-dims \(64,\) differs from the --pretrained run's \(32, 32\)"):
        run.take_pretrained(Args(hidden_dims=(64,)), pretrained, ("hidden_dims", "eval_every"))


def test_checkpoint_payload_round_trip_with_extras(tmp_path):
    run_dir = str(tmp_path)
    agent = {"w": jnp.arange(3.0), "step": jnp.int32(4)}
    online = buffers.insert(buffers.empty_like({"x": np.zeros(2, np.float32)}, 5), {"x": np.ones(2, np.float32)})
    rng = np.random.default_rng(7)
    rng.normal()
    progress = run.Progress(offline_step=10, online_step=3, episode=2, evaluations=4, next_checkpoint=20)
    run.save_checkpoint(run_dir, agent, online, progress, 12.5, numpy_rng=run.rng_state(rng),
                        pending_action=run.optional_array(None))
    payload = run.read_checkpoint(run_dir, ("numpy_rng", "pending_action"))
    template = {"w": jnp.zeros(3), "step": jnp.int32(0)}
    empty = buffers.empty_like({"x": np.zeros(2, np.float32)}, 5)
    restored, restored_online, restored_progress, elapsed = run.restore_checkpoint(payload, run_dir, template, empty)
    np.testing.assert_array_equal(restored["w"], [0.0, 1.0, 2.0])
    assert int(restored["step"]) == 4
    assert int(restored_online.size) == 1 and int(restored_online.cursor) == 1
    np.testing.assert_array_equal(restored_online.data["x"][0], [1.0, 1.0])
    assert restored_progress == progress and elapsed == 12.5
    assert run.rng_from_state(payload["numpy_rng"]).normal() == rng.normal()
    assert run.array_or_none(payload["pending_action"]) is None


def test_checkpoint_missing_an_entry_is_one_message(tmp_path):
    run.save_checkpoint(str(tmp_path), {"w": jnp.ones(1)}, buffers.empty_like({"x": np.zeros(1)}, 2),
                        run.Progress(), 0.0)
    with pytest.raises(UserError, match="it lacks numpy_rng"):
        run.read_checkpoint(str(tmp_path), ("numpy_rng",))


def test_checkpoint_file_mode_follows_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        run.save_checkpoint(str(tmp_path), {"w": jnp.ones(1)}, buffers.empty_like({"x": np.zeros(1)}, 2),
                            run.Progress(), 0.0)
    finally:
        os.umask(previous)
    mode = stat.S_IMODE(os.stat(tmp_path / logger.CHECKPOINT_FILE).st_mode)
    assert mode == 0o644


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_is_recorded_and_hands_sigint_back_to_the_system(stop):
    previous = signal.getsignal(signal.SIGINT)
    with run.StopSignals() as stops:
        assert signal.getsignal(signal.SIGINT) == stops._handle
        os.kill(os.getpid(), stop)
        assert stops.received == stop.name
        assert signal.getsignal(signal.SIGINT) == signal.SIG_DFL  # a second Ctrl-C ends the process at once
    assert signal.getsignal(signal.SIGINT) == previous and signal.getsignal(signal.SIGTERM) != stops._handle


class FakeLogger:
    def __init__(self):
        self.synced = 0

    def sync(self):
        self.synced += 1

    def elapsed(self):
        return 1.0


def test_checkpoint_due_by_steps_by_wall_clock_and_by_signal(tmp_path, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(run.time, "monotonic", lambda: clock[0])
    session = run.Session("toy", Args(checkpoint_every=100, checkpoint_minutes=10.0), str(tmp_path),
                          run.Progress(next_checkpoint=100), FakeLogger(), None)
    assert not session.checkpoint_due(50)
    assert session.checkpoint_due(100)
    clock[0] += 10 * 60
    assert session.checkpoint_due(51)  # ten minutes since the start, step schedule not reached
    online = buffers.empty_like({"x": np.zeros(1)}, 2)
    session.save(51, {"w": jnp.ones(1)}, online)
    assert not session.checkpoint_due(52) and session.progress.next_checkpoint == 100
    session.stops.received = "SIGTERM"
    assert session.checkpoint_due(53)
    with pytest.raises(run.Stopped):  # the checkpoint is written, then the loop is left
        session.save(53, {"w": jnp.ones(1)}, online)
    assert os.path.isfile(tmp_path / logger.CHECKPOINT_FILE)


def test_summary_line_and_learning_curve(tmp_path):
    run_dir = str(tmp_path)
    records = [{"step": 0, "phase": "offline", "return": 1.0, "normalized_score": 10.0, "success_rate": 0.1},
               {"step": 50, "phase": "offline", "return": 3.0, "normalized_score": 40.0, "success_rate": 0.6},
               {"step": 100, "phase": "online", "return": 2.0, "normalized_score": 30.0, "success_rate": 0.4}]
    with open(os.path.join(run_dir, logger.EVALUATIONS_FILE), "w") as file:
        file.writelines(json.dumps(record) + "\n" for record in records)
    line = logger.summarize(logger.read_evaluations(run_dir), 100, 3725.0, run_dir)
    assert line == (f"Summary: final success rate 0.40 (best 0.60), final normalized score 30.0 (best 40.0), "
                    f"100 steps, 1:02:05 wall time, run folder {run_dir}")
    logger.plot_learning_curve(run_dir, offline_steps=50)
    with open(os.path.join(run_dir, logger.CURVE_FILE), "rb") as file:
        assert file.read(8) == b"\x89PNG\r\n\x1a\n"


def test_progress_rate_after_a_phase_change_reflects_the_new_phase(tmp_path, monkeypatch):
    clock = [0.0]
    monkeypatch.setattr("tqdm.std.time", lambda: clock[0])
    monkeypatch.setattr(logger.time, "time", lambda: clock[0])
    run_logger = logger.RunLogger(str(tmp_path), {"algorithm": "toy"}, 10_000, progress=True)
    for _ in range(50):  # a fast phase: 100 steps per second
        clock[0] += 1.0
        run_logger.advance(100)
    run_logger.new_phase("online")
    for _ in range(5):  # a slow phase: 2 steps per second
        clock[0] += 1.0
        run_logger.advance(2)
    rate = run_logger.bar.format_dict["rate"] or run_logger.bar.format_dict["n"] / run_logger.bar.format_dict["elapsed"]
    run_logger.close()
    assert rate == pytest.approx(2.0, rel=0.3)


@pytest.mark.parametrize("script", ["rlpd", "iql", "cql", "calql"])
def test_every_boolean_flag_takes_a_value(script):
    import importlib

    import tyro

    module = importlib.import_module(f"algorithms.{script}")
    booleans = [field.name for field in dataclasses.fields(module.Args) if "bool" in str(field.type)]
    assert "progress" in booleans
    for name in booleans:
        flag = "--" + name.replace("_", "-")
        parsed = tyro.cli(module.Args, args=[flag, "False"])
        assert getattr(parsed, name) is False, name
        with pytest.raises(SystemExit):  # no bare switch and no --no- twin: one style everywhere
            tyro.cli(module.Args, args=["--no-" + flag[2:]])
