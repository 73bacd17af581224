"""Tests of benchmarks/build_dataset.py: tiny real builds in a temporary Minari root."""

import json
import os
import subprocess
import sys
import types

import gymnasium as gym
import minari
import numpy as np
import pytest
from minari.storage import get_dataset_path

from benchmarks import build_dataset as bd
from common import builders


@pytest.fixture(autouse=True)
def minari_root(tmp_path, monkeypatch):
    """Every test writes into its own Minari dataset root, never ~/.minari."""
    root = tmp_path / "datasets"
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    return root


def tiny_maze(maze="umaze", dense=False, num_steps=1500, seed=0, **kwargs):
    return bd.build_pointmaze(maze, dense, num_steps, seed, ref_episodes=4, **kwargs)


def arrays(dataset):
    """Concatenated (observations, actions, rewards) of all episodes."""
    episodes = list(dataset.iterate_episodes())
    obs = episodes[0].observations
    flat = (lambda e: e.observations["observation"]) if isinstance(obs, dict) else (
        lambda e: e.observations)
    return tuple(np.concatenate([f(e) for e in episodes]) for f in (
        flat, lambda e: e.actions, lambda e: e.rewards))


def fake_algorithm(monkeypatch, tmp_path, policy, name="fake_algo_for_tests"):
    """A run directory whose config names a fake algorithms.<name> module with load_policy."""
    module = types.ModuleType(f"algorithms.{name}")
    module.load_policy = lambda run_dir: policy
    monkeypatch.setitem(sys.modules, f"algorithms.{name}", module)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps({"algorithm": name}))
    return str(run_dir)


def test_pointmaze_dataset_loads_with_goal_observations_and_ref_scores():
    tiny_maze(dense=True)
    assert list(minari.list_local_datasets()) == ["local/pointmaze/umaze-dense-v0"]
    dataset = minari.load_dataset("local/pointmaze/umaze-dense-v0")
    assert dataset.total_steps == 1500
    assert set(dataset.observation_space.spaces) == {"observation", "achieved_goal", "desired_goal"}
    assert dataset.action_space.shape == (2,)
    meta = dataset.storage.metadata
    assert meta["ref_max_score"] > meta["ref_min_score"]
    assert dataset.spec.env_spec.id == "PointMaze_UMazeDense-v3"
    assert dataset.spec.env_spec.kwargs["reset_target"] is True
    eval_kwargs = dataset.recover_environment(eval_env=True).spec.kwargs
    assert eval_kwargs["continuing_task"] is True and eval_kwargs["reset_target"] is False
    assert any("g" in row for row in eval_kwargs["maze_map"])  # one fixed goal cell
    episodes = list(dataset.iterate_episodes())
    assert all(len(e) == 300 and e.truncations[-1] and not e.terminations.any()
               for e in episodes)  # continuing task: time-limit truncations only
    assert 0 < minari.get_normalized_score(dataset, np.array(meta["ref_max_score"])) <= 1


def test_expert_controller_reaches_goals_and_goal_is_redrawn():
    dataset = tiny_maze(num_steps=3000)
    successes = redrawn = 0
    for episode in dataset.iterate_episodes():
        success = episode.infos["success"][1:]  # success[t]: step t reached the goal
        goals = episode.observations["desired_goal"]
        changed = np.any(goals[1:] != goals[:-1], axis=1)  # changed[t]: obs t+1 has a new goal
        successes += int(success.sum())
        redrawn += int((success[:-1] & changed[1:]).sum())  # the goal moves right after success
        np.testing.assert_array_equal(episode.rewards, success.astype(float))  # sparse reward
    assert successes >= 10 and redrawn >= 10
    meta = dataset.storage.metadata
    assert meta["ref_max_score"] > meta["ref_min_score"] + 50  # the noiseless expert stays on goal


def test_same_seed_same_data_and_different_seed_different_data():
    a = arrays(tiny_maze(num_steps=800, seed=3, dataset_id="local/test/a-v0"))
    b = arrays(tiny_maze(num_steps=800, seed=3, dataset_id="local/test/b-v0"))
    c = arrays(tiny_maze(num_steps=800, seed=4, dataset_id="local/test/c-v0"))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], c[0]) and not np.array_equal(a[1], c[1])


def test_random_mujoco_build_has_box_spaces_and_env_action_bounds():
    dataset = bd.build_from_policy("InvertedPendulum-v5", "random", num_steps=1000)
    assert dataset is not None
    dataset = minari.load_dataset("local/invertedpendulum/random-v0")
    env = gym.make("InvertedPendulum-v5")
    assert isinstance(dataset.observation_space, gym.spaces.Box)
    assert dataset.observation_space.shape == env.observation_space.shape
    np.testing.assert_array_equal(dataset.action_space.low, env.action_space.low)  # [-3, 3]
    np.testing.assert_array_equal(dataset.action_space.high, env.action_space.high)
    _, actions, _ = arrays(dataset)
    assert actions.min() >= -3 and actions.max() <= 3 and np.abs(actions).max() > 2
    episodes = list(dataset.iterate_episodes())
    assert dataset.total_steps == 1000 and any(e.terminations[-1] for e in episodes)
    assert "ref_min_score" not in dataset.storage.metadata  # no ref_max known: no ref scores


def test_checkpoint_policy_actions_are_rescaled_and_ref_scores_stored(monkeypatch, tmp_path):
    seen = []

    def policy(observations):
        seen.append((observations.dtype, observations.shape))
        return np.full((len(observations), 1), 0.5, np.float32)

    run_dir = fake_algorithm(monkeypatch, tmp_path, policy)
    dataset = bd.build_from_policy("InvertedPendulum-v5", run_dir, num_steps=300, name="half",
                                   ref_max_score=1000.0, ref_episodes=3)
    assert dataset.storage.metadata["dataset_id"] == "local/invertedpendulum/half-v0"
    assert seen[0] == (np.float32, (1, 4))
    np.testing.assert_allclose(arrays(dataset)[1], 1.5)  # 0.5 in [-1, 1] -> 1.5 in [-3, 3]
    meta = dataset.storage.metadata
    assert meta["ref_max_score"] == 1000.0 and 0 < meta["ref_min_score"] < 100


def test_build_dispatches_buildable_ids_and_rejects_others(monkeypatch, minari_root):
    calls = []
    monkeypatch.setattr(builders, "build_pointmaze", lambda *a, **k: calls.append((a, k)))
    monkeypatch.setattr(builders, "build_from_policy", lambda *a, **k: calls.append((a, k)))
    bd.build("local/pointmaze/medium-dense-v0")
    bd.build("local/halfcheetah/random-v0")
    bd.build("local/pointmaze/medium-30k-v0")  # a size in the id: 30k steps instead of 200k
    assert calls[0][0] == ("medium", True, bd.DEFAULT_POINTMAZE_STEPS) and calls[1][0] == ("HalfCheetah-v5", None)
    assert calls[1][1]["dataset_id"] == "local/halfcheetah/random-v0"
    assert calls[2][0] == ("medium", False, 30_000) and calls[2][1]["dataset_id"] == "local/pointmaze/medium-30k-v0"
    assert bd.is_buildable("local/pointmaze/umaze-dense-v0")
    assert bd.is_buildable("local/hopper/random-v0")
    for bad in ["local/pointmaze/spiral-v0", "local/nosuchenv/random-v0", "D4RL/pointmaze/umaze-v2",
                "local/hopper/expert-v0", "local/pointmaze/umaze-v1", "local/pointmaze/umaze-0k-v0",
                "local/pointmaze/umaze-30-v0"]:
        assert not bd.is_buildable(bad)
        with pytest.raises(ValueError, match="Cannot build dataset"):
            bd.build(bad)
    assert not minari_root.exists() or not os.listdir(minari_root)


def test_existing_id_raises_unless_overwrite():
    first = arrays(tiny_maze(num_steps=400, seed=0))
    with pytest.raises(FileExistsError, match="already exists"):
        tiny_maze(num_steps=400, seed=1)
    replaced = arrays(tiny_maze(num_steps=500, seed=1, overwrite=True))
    assert len(replaced[1]) == 500 and not np.array_equal(first[1][:400], replaced[1][:400])
    assert list(minari.list_local_datasets()) == ["local/pointmaze/umaze-v0"]


def test_interrupted_build_leaves_no_dataset(monkeypatch, tmp_path, minari_root):
    calls = []

    def policy(observations):
        calls.append(1)
        if len(calls) == 200:
            raise KeyboardInterrupt  # Ctrl-C in the middle of data collection
        return np.zeros((len(observations), 1), np.float32)

    run_dir = fake_algorithm(monkeypatch, tmp_path, policy)
    with pytest.raises(KeyboardInterrupt):
        bd.build_from_policy("InvertedPendulum-v5", run_dir, num_steps=1000)
    assert not get_dataset_path("local/invertedpendulum/policy-v0").exists()
    assert os.listdir(minari_root) == [builders.LOCK_DIR]  # no staging directory left either (the lock files stay)


def test_failure_inside_minari_write_leaves_no_dataset(monkeypatch, minari_root):
    # Minari creates the dataset directory before writing metadata; fail right there.
    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("minari.data_collector.data_collector._generate_dataset_metadata", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        tiny_maze(num_steps=300)
    assert not get_dataset_path("local/pointmaze/umaze-v0").exists()
    assert os.listdir(minari_root) == [builders.LOCK_DIR] and minari.list_local_datasets() == {}


def test_cli_builds_and_reports(capsys):
    bd.cli(["pointmaze", "--maze", "open", "--dense", "--num-steps", "400", "--ref-episodes", "2"])
    out = capsys.readouterr().out
    assert "Wrote local/pointmaze/open-dense-v0" in out and "ref_max_score" in out
    assert minari.load_dataset("local/pointmaze/open-dense-v0").total_steps == 400


def test_policy_of_another_env_is_refused_before_loading(monkeypatch, tmp_path):
    run_dir = fake_algorithm(monkeypatch, tmp_path, policy=None)
    config_path = os.path.join(run_dir, "config.json")
    with open(config_path, "w") as file:  # what a PointMaze run writes
        json.dump({"algorithm": "fake_algo_for_tests", "env": "pointmaze-umaze", "observation_dim": 6,
                   "action_dim": 2}, file)
    with pytest.raises(SystemExit, match="observations of size 6, but InvertedPendulum-v5 has observations of "
                                         "size 4: pass a run of InvertedPendulum-v5"):
        bd.cli(["policy", "--env", "InvertedPendulum-v5", "--policy", run_dir])


def test_import_has_no_side_effects():
    code = ("import gymnasium as gym, benchmarks.build_dataset as bd; "
            "assert 'PointMaze_UMaze-v3' not in gym.registry")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""


def test_command_line_prints_no_gymnasium_robotics_notice(minari_root):
    result = subprocess.run([sys.executable, "benchmarks/build_dataset.py", "pointmaze", "--num-steps", "200",
                             "--ref-episodes", "1"], cwd=os.path.dirname(os.path.dirname(__file__)),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Wrote local/pointmaze/umaze-v0" in result.stdout
    assert "reward functions were updated" not in result.stderr
