"""common/logger.py and common/checkpoint.py: run folders, evaluations, atomic checkpoints."""

import os

import numpy as np
import pytest

from common import checkpoint
from common.cli import UserError
from common.logger import Resumed, RunLogger, new_run_dir, read_evaluations


def test_runs_started_in_the_same_second_get_their_own_folders(tmp_path):
    first = new_run_dir(str(tmp_path), "rlpd", "D4RL/pen/human-v2", 0)
    second = new_run_dir(str(tmp_path), "rlpd", "D4RL/pen/human-v2", 0)
    assert first != second and os.path.isdir(first) and os.path.isdir(second)
    assert os.path.basename(first).startswith("rlpd__D4RL-pen-human-v2__0__")


def test_resumed_logger_keeps_only_evaluations_before_the_checkpoint(tmp_path):
    logger = RunLogger(str(tmp_path), {"seed": 0}, total_steps=10, progress=False)
    for step in (0, 5, 5, 10):  # the last two were written after a checkpoint taken at step 5
        logger.evaluation(step, "online", {"return": float(step)})
    logger.close()
    RunLogger(str(tmp_path), {"seed": 0}, 10, Resumed(step=5, evaluations=2, elapsed=1.0), progress=False).close()
    assert [record["step"] for record in read_evaluations(str(tmp_path))] == [0, 5]


def test_checkpoint_round_trip(tmp_path):
    path = str(tmp_path / "c.msgpack")
    checkpoint.save(path, {"a": np.arange(3), "b": {"c": 1.5}, "s": "text"})
    loaded = checkpoint.load(path)
    np.testing.assert_array_equal(loaded["a"], np.arange(3))
    assert loaded["b"]["c"] == 1.5 and loaded["s"] == "text"


def test_failed_save_keeps_the_previous_checkpoint(tmp_path):
    path = str(tmp_path / "c.msgpack")
    checkpoint.save(path, {"version": 1})
    with pytest.raises(Exception):
        checkpoint.save(path, {"version": 2, "bad": object()})  # cannot be serialized
    assert checkpoint.load(path)["version"] == 1
    assert os.listdir(tmp_path) == ["c.msgpack"]  # no temporary file left behind


def test_damaged_checkpoint_is_a_user_error(tmp_path):
    path = tmp_path / "c.msgpack"
    path.write_bytes(b"\x93garbage")
    with pytest.raises(UserError, match="cannot read checkpoint"):
        checkpoint.load(str(path))
    with pytest.raises(UserError, match="no checkpoint"):
        checkpoint.load(str(tmp_path / "missing.msgpack"))
