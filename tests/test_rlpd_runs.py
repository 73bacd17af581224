"""rlpd.py end to end: smoke run, run folder, determinism, resume after SIGKILL, bad input, learning."""

import dataclasses
import json
import os
import time

import numpy as np
import pytest
import tyro

from algorithms import rlpd
from common import datasets
from common.logger import CHECKPOINT_FILE, read_evaluations
from tests.conftest import TINY_RUN, field_docstrings, kill_after_checkpoint, run_script, scalar_steps, scores

TINY_ARGS = dict(utd=2, batch_size=64, hidden_dims=(64, 64), start_training=100, eval_every=100,
                 eval_episodes=2, progress=False)


def test_smoke_run_writes_the_run_folder(tiny_pointmaze, tmp_path):
    result = run_script("rlpd.py", "--env", tiny_pointmaze, "--online-steps", "300", "--log-dir", str(tmp_path), *TINY_RUN)
    assert result.returncode == 0, result.stderr
    (run_dir,) = tmp_path.iterdir()
    assert run_dir.name.startswith("rlpd__local-pointmaze-umaze-dense-v0__0__")
    config = json.loads((run_dir / "config.json").read_text())
    assert config["algorithm"] == "rlpd" and config["num_qs"] == 10 and config["offline_ratio"] == 0.5
    assert config["target_entropy"] == -1.0  # resolved: -|A|/2 with |A| = 2
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(run_dir))
    records = read_evaluations(run_dir)
    assert [r["step"] for r in records] == [0, 100, 200, 300]
    assert {"return", "normalized_score", "success_rate", "wall_time", "phase"} <= set(records[-1])
    assert (run_dir / CHECKPOINT_FILE).is_file()
    assert "hyperparameter" in result.stdout  # the table printed at the start
    assert "Preset pointmaze (rlpd): ours, not a paper's" in result.stdout  # and what the preset is, and why


def test_tensorboard_scalars_readable(tiny_pointmaze, tmp_path):
    run_dir = rlpd.main(rlpd.Args(env=tiny_pointmaze, online_steps=200, log_dir=str(tmp_path), log_every=50, **TINY_ARGS))
    for tag in ("eval/return", "eval/normalized_score", "train/critic_loss", "train/temperature"):
        assert scalar_steps(run_dir, tag), tag
    assert all(value > 0 for _, value in scalar_steps(run_dir, "time/sps"))  # also without a progress bar


def test_offline_phase_then_online(tiny_pointmaze, tmp_path):
    run_dir = rlpd.main(rlpd.Args(env=tiny_pointmaze, offline_steps=200, online_steps=100, log_dir=str(tmp_path),
                                  log_every=50, **TINY_ARGS))
    records = read_evaluations(run_dir)
    assert [(r["step"], r["phase"]) for r in records] == [(0, "offline"), (100, "offline"), (200, "offline"),
                                                         (300, "online")]
    assert records[0]["return"] != records[2]["return"]  # the offline updates changed the policy


@pytest.mark.slow  # outside CI's 20-minute budget; `pytest -m slow` runs it
def test_same_seed_same_evaluations(tiny_pointmaze, tmp_path):
    def run(seed, folder):
        return scores(rlpd.main(rlpd.Args(env=tiny_pointmaze, online_steps=300, seed=seed,
                                          log_dir=str(tmp_path / folder), **TINY_ARGS)))
    first, second, other = run(0, "a"), run(0, "b"), run(1, "c")
    assert first == second
    assert [r["return"] for r in first] != [r["return"] for r in other]


@pytest.mark.parametrize("phase_flags", [
    # Online: the first checkpoint (step 300, an episode end) falls inside the random-action
    # phase, so the numpy generator's state matters as much as the networks' and the buffers'.
    ["--online-steps", "1500", "--start-training", "450"],
    # Offline: checkpoints every 150 updates, evaluations every 100. Slow: the offline-phase resume
    # is the harness's, checked in the fast suite on cql.py (tests/test_stops.py, a SIGTERM mid-phase).
    pytest.param(["--offline-steps", "900", "--online-steps", "300", "--log-every", "50"], marks=pytest.mark.slow),
], ids=["online", "offline"])
def test_resume_after_sigkill_matches_uninterrupted_run(tiny_pointmaze, tmp_path, phase_flags):
    flags = ["--env", tiny_pointmaze, "--checkpoint-every", "150", *TINY_RUN, *phase_flags]
    reference_dir = rlpd.main(tyro.cli(rlpd.Args, args=[*flags, "--log-dir", str(tmp_path / "full")]))

    run_dir = kill_after_checkpoint("rlpd.py", flags, tmp_path / "killed")
    assert len(scores(run_dir)) < len(scores(reference_dir))

    rlpd.main(rlpd.Args(resume=str(run_dir)))
    assert scores(run_dir) == scores(reference_dir)
    assert scalar_steps(run_dir, "eval/return") == scalar_steps(reference_dir, "eval/return")


@pytest.mark.parametrize("flags, message", [
    (["--offline-ratio", "1.5"], "--offline-ratio must lie in [0, 1]"),
    (["--utd", "0"], "--utd (G) must be at least 1"),
    (["--batch-size", "255"], "cannot be split"),
    (["--env", "antmaze-larg"], "Closest names: antmaze-large"),
    (["--env", "Hopper-v5"], "--offline-ratio 0"),
    (["--resume", "/nonexistent/run"], "no config.json"),
    (["--seed", "-1"], "--seed must be >= 0"),
    (["--critic-lr", "0"], "--critic-lr must be positive"),
    (["--log-dir", "/proc/no-such-folder"], "cannot create --log-dir"),
])
def test_bad_input_gets_one_message_and_exit_2(flags, message, tmp_path):
    start = time.time()
    result = run_script("rlpd.py", "--log-dir", str(tmp_path), *flags)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert time.time() - start < 30
    assert not list(tmp_path.iterdir())  # nothing was started


def test_missing_dataset_offline_message(tmp_path):
    env = {**os.environ, "MINARI_DATASETS_PATH": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    start = time.time()
    result = run_script("rlpd.py", "--env", "antmaze-large", "--log-dir", str(tmp_path / "runs"), env=env)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "minari download D4RL/antmaze/large-diverse-v1" in result.stderr
    assert time.time() - start < 30


def test_unreadable_checkpoint_is_reported(tiny_pointmaze, tmp_path):
    run_dir = rlpd.main(rlpd.Args(env=tiny_pointmaze, online_steps=100, log_dir=str(tmp_path), **TINY_ARGS))
    with open(os.path.join(run_dir, CHECKPOINT_FILE), "wb") as file:
        file.write(b"\x00 not a checkpoint")
    result = run_script("rlpd.py", "--resume", run_dir)
    assert result.returncode == 2 and "cannot read checkpoint" in result.stderr and "Traceback" not in result.stderr
    os.remove(os.path.join(run_dir, CHECKPOINT_FILE))
    result = run_script("rlpd.py", "--resume", run_dir)
    assert result.returncode == 2 and "no checkpoint" in result.stderr


def test_help_documents_every_flag():
    result = run_script("rlpd.py", "--help", env={**os.environ, "COLUMNS": "400"})
    assert result.returncode == 0
    docs = field_docstrings(rlpd.Args)
    help_text = " ".join(result.stdout.split())
    for field in dataclasses.fields(rlpd.Args):
        assert field.name in docs, f"{field.name} has no docstring"
        assert "--" + field.name.replace("_", "-") in help_text, field.name
        assert " ".join(docs[field.name].split()) in help_text, field.name


def test_builder_makes_a_dataset_from_our_checkpoint(tmp_path, minari_session_root):
    from benchmarks.build_dataset import build_from_policy

    run_dir = rlpd.main(rlpd.Args(env="InvertedPendulum-v5", offline_ratio=0.0, online_steps=200,
                                  log_dir=str(tmp_path), **TINY_ARGS))
    policy = rlpd.load_policy(run_dir)
    observations = np.zeros((3, 4), np.float32)
    assert policy(observations).shape == (3, 1)
    dataset = build_from_policy("InvertedPendulum-v5", run_dir, num_steps=200, name="rlpd-tiny", ref_episodes=2)
    assert dataset.total_steps == 200


@pytest.mark.slow
def test_rlpd_learns_inverted_pendulum_online(tmp_path):
    """A random policy balances for ~20 steps; RLPD reaches 1000 (the cap) within 4000 steps."""
    run_dir = rlpd.main(rlpd.Args(env="InvertedPendulum-v5", offline_ratio=0.0, online_steps=4000,
                                  start_training=500, utd=4, batch_size=128, hidden_dims=(128, 128),
                                  eval_every=500, eval_episodes=5, log_dir=str(tmp_path), progress=False))
    records = read_evaluations(run_dir)
    assert records[0]["return"] < 100  # untrained
    assert max(r["return"] for r in records if r["step"] >= 3000) >= 500


def test_antmaze_pipeline_end_to_end(minari_session_root, tmp_path):
    """A small real AntMaze dataset (random actions, recorded by Minari's DataCollector as the
    Minari AntMaze sets are: continuing task keeping its goal, dict observations, an eval env spec
    with a D4RL goal cell) runs through D4RL's relabelling, the 29-dim observation, the
    0.5-success env and success-based scoring."""
    import copy

    import gymnasium as gym
    import gymnasium_robotics
    import minari

    gym.register_envs(gymnasium_robotics)
    collection = gym.make("AntMaze_UMaze-v4", continuing_task=True, reset_target=False, max_episode_steps=200)
    env = minari.DataCollector(collection)
    env.reset(seed=0)
    env.action_space.seed(0)
    eval_goal = env.unwrapped.maze.cell_rowcol_to_xy(np.array([3, 1]))  # the eval map's `g` cell below
    for step in range(600):
        if step in (50, 450):  # the ant is put on the evaluation goal twice (a state change)
            ant = env.unwrapped.ant_env
            qpos = ant.data.qpos.copy()
            qpos[:2] = eval_goal
            ant.set_state(qpos, ant.data.qvel)
        _, _, terminated, truncated, _ = env.step(env.action_space.sample())
        if terminated or truncated:
            env.reset()
    eval_spec = copy.deepcopy(collection.spec)
    eval_spec.kwargs["maze_map"] = [[1, 1, 1, 1, 1], [1, "r", 0, 0, 1], [1, 1, 1, 0, 1], [1, "g", 0, 0, 1],
                                    [1, 1, 1, 1, 1]]
    dataset = env.create_dataset("local/antmaze/random-tiny-v0", eval_env=eval_spec,
                                 algorithm_name="random", ref_min_score=0.0, ref_max_score=1.0)
    data = rlpd.load_offline_data(datasets.resolve(dataset.spec.dataset_id), dataset, dataset.action_space)
    next_xy = np.concatenate([e.observations["achieved_goal"][1:] for e in dataset.iterate_episodes()])
    reached = np.linalg.norm(next_xy - eval_goal, axis=1) <= 0.5  # D4RL's label of every step
    assert reached.sum() >= 2
    np.testing.assert_array_equal(data["masks"] == 0, reached)
    assert len(data["rewards"]) == 600  # nothing is dropped
    np.testing.assert_array_equal(data["rewards"], np.where(reached, 0.0, -1.0))  # r - 1

    run_dir = rlpd.main(rlpd.Args(env="local/antmaze/random-tiny-v0", online_steps=200, log_dir=str(tmp_path),
                                  **{**TINY_ARGS, "eval_every": 200}))
    config = json.loads(open(os.path.join(run_dir, "config.json")).read())
    assert config["domain"] == "antmaze" and config["observation_dim"] == 29
    assert config["num_min_qs"] == 1 and config["backup_entropy"] is False  # the AntMaze preset
    for record in read_evaluations(run_dir):
        assert record["normalized_score"] == pytest.approx(100 * record["success_rate"])
