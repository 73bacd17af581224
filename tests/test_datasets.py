"""common/datasets.py: names, transitions, dict observations, AntMaze relabelling, offline errors."""

import time
import types

import gymnasium as gym
import numpy as np
import pytest

from common import datasets
from common.cli import UserError
from tests.conftest import teleport_ant_to_goal


def episode(rewards, terminations=None, truncations=None, observations=None):
    """A hand-built episode with Minari's EpisodeData fields (T+1 observations)."""
    n = len(rewards)
    observations = np.arange(n + 1, dtype=np.float32)[:, None] if observations is None else observations
    return types.SimpleNamespace(
        observations=observations, actions=np.zeros((n, 2), np.float32),
        rewards=np.asarray(rewards, np.float32),
        terminations=np.zeros(n, bool) if terminations is None else np.asarray(terminations),
        truncations=np.zeros(n, bool) if truncations is None else np.asarray(truncations))


@pytest.mark.parametrize("name, dataset_id, domain", [
    ("antmaze-large", "D4RL/antmaze/large-diverse-v1", "antmaze"),
    ("antmaze-medium", "D4RL/antmaze/medium-diverse-v1", "antmaze"),
    ("antmaze-large-play-v2", "D4RL/antmaze/large-play-v1", "antmaze"),
    ("antmaze-umaze", "D4RL/antmaze/umaze-v1", "antmaze"),
    ("hopper-medium-v2", "mujoco/hopper/medium-v0", "locomotion"),
    ("pen-human", "D4RL/pen/human-v2", "adroit"),
    ("kitchen-mixed", "D4RL/kitchen/mixed-v2", "kitchen"),
    ("pointmaze-large-dense", "D4RL/pointmaze/large-dense-v2", "pointmaze"),
    ("D4RL/door/cloned-v2", "D4RL/door/cloned-v2", "adroit"),
])
def test_resolve_names(name, dataset_id, domain):
    task = datasets.resolve(name)
    assert (task.dataset_id, task.domain, task.env_id) == (dataset_id, domain, None)


@pytest.mark.parametrize("name, sparse", [
    ("local/pointmaze/medium-30k-v0", True), ("pointmaze-medium", True), ("antmaze-large", True),
    ("local/pointmaze/umaze-dense-v0", False), ("pointmaze-large-dense", False), ("hopper-medium", False),
    ("kitchen-mixed", False),
    ("PointMaze_UMaze-v3", True), ("PointMaze_UMazeDense-v3", False),  # online-only Gymnasium envs
])
def test_sparse_reward_tasks_are_antmaze_and_sparse_pointmaze(name, sparse):
    assert datasets.resolve(name).sparse_reward == sparse


def test_resolve_gymnasium_env_is_online_only():
    task = datasets.resolve("Hopper-v5")
    assert task.dataset_id is None and task.env_id == "Hopper-v5" and task.domain == "locomotion"
    task = datasets.resolve("AntMaze_UMaze-v4")  # a Gymnasium-Robotics id
    assert task.dataset_id is None and task.domain == "antmaze"


def test_unknown_name_lists_closest():
    with pytest.raises(UserError, match="antmaze-large-diverse"):
        datasets.resolve("antmaze-large-divers")
    with pytest.raises(UserError, match="no D4RL random / medium-replay"):
        datasets.resolve("hopper-medium-replay-v2")


def test_termination_and_truncation_kept_apart():
    episodes = [episode([1, 2, 3], terminations=[0, 0, 1]), episode([4, 5], truncations=[0, 1])]
    data = datasets.episodes_to_transitions(episodes, "locomotion")
    np.testing.assert_array_equal(data["terminated"], [0, 0, 1, 0, 0])
    np.testing.assert_array_equal(data["truncated"], [0, 0, 0, 0, 1])
    np.testing.assert_array_equal(data["episode_ends"], [0, 0, 1, 0, 1])
    # next_observations come from the same episode, never across the boundary
    np.testing.assert_array_equal(data["next_observations"][:, 0], [1, 2, 3, 1, 2])


def test_relabel_antmaze_marks_every_next_position_within_half_a_unit():
    """The pure rule; tests/test_antmaze.py checks it on a real Minari-format dataset."""
    goal = np.array([2.0, -1.0])
    offsets = np.array([[0.0, 0.0], [0.3, 0.4], [0.46, 0.0], [0.0, -0.5001], [3.0, 3.0], [0.0, 0.2]])
    rewards, terminated = datasets.relabel_antmaze(goal + offsets, goal)
    np.testing.assert_array_equal(terminated, [1, 1, 1, 0, 0, 1])  # several terminals, nothing cut
    np.testing.assert_array_equal(rewards, terminated.astype(np.float32))
    assert rewards.dtype == np.float32 and terminated.dtype == bool


def test_other_domains_not_relabelled():
    data = datasets.episodes_to_transitions([episode([0, 1, 1])], "pointmaze")
    np.testing.assert_array_equal(data["rewards"], [0, 1, 1])
    assert not data["terminated"].any()


def test_dict_observation_order():
    observation = {"observation": np.array([3.0, 4.0]), "achieved_goal": np.array([1.0, 2.0]),
                   "desired_goal": np.array([5.0, 6.0])}
    np.testing.assert_array_equal(datasets.flatten_observation(observation, "antmaze"), [1, 2, 3, 4])
    np.testing.assert_array_equal(datasets.flatten_observation(observation, "pointmaze"), [3, 4, 5, 6])
    np.testing.assert_array_equal(datasets.flatten_observation(observation, "other"), [1, 2, 5, 6, 3, 4])
    batch = {key: np.stack([value, value + 10]) for key, value in observation.items()}
    np.testing.assert_array_equal(datasets.flatten_observation(batch, "antmaze"), [[1, 2, 3, 4], [11, 12, 13, 14]])


def test_antmaze_env_gives_d4rl_observation_and_ends_at_success():
    env = datasets.env_factory(datasets.Task("x", None, "AntMaze_UMaze-v4", "antmaze"))()
    observation, _ = env.reset(seed=0)
    assert observation.shape == (29,) and env.action_space.shape == (8,)
    np.testing.assert_allclose(observation[:2], env.unwrapped.ant_env.data.qpos[:2], atol=1e-6)  # x, y first
    _, reward, terminated, _, _ = env.step(np.zeros(8, np.float32))
    assert not terminated and reward == 0
    teleport_ant_to_goal(env)
    _, reward, terminated, _, info = env.step(np.zeros(8, np.float32))
    assert terminated and reward == 1 and info["success"]


def test_franka_kitchen_constructs_and_steps():
    env = datasets.env_factory(datasets.Task("x", None, "FrankaKitchen-v1", "kitchen"))()
    observation, _ = env.reset(seed=0)
    assert observation.shape == (59,)
    next_observation, reward, terminated, truncated, _ = env.step(np.zeros(9, np.float32))
    assert next_observation.shape == (59,) and np.isfinite(next_observation).all()


def test_actions_rescaled_to_env_bounds():
    env = datasets.FlatEnv(gym.make("Pendulum-v1"), "locomotion")  # torque bounds +-2
    assert env.action_space.high[0] == 1.0
    env.reset(seed=0)
    env.step(np.array([1.0], np.float32))
    assert env.unwrapped.last_u == pytest.approx(2.0)
    clipped = datasets.clip_actions(np.array([[-2.0], [0.0], [2.0]]), env.env.action_space)
    np.testing.assert_allclose(clipped[:, 0], [-1 + 1e-5, 0, 1 - 1e-5], atol=1e-7)


def test_scoring():
    returns, successes = np.array([10.0, 30.0]), np.array([True, False])
    assert datasets.Scoring(0.0, 40.0).normalized(returns, successes) == pytest.approx(50.0)
    assert datasets.Scoring().normalized(returns, successes) is None  # never invented
    assert datasets.Scoring(by_success=True).normalized(returns, successes) == pytest.approx(50.0)


def test_missing_dataset_offline_fails_fast_with_one_message(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    monkeypatch.setattr(datasets, "_can_reach", lambda host: False)  # as on a machine with no network
    start = time.time()
    with pytest.raises(UserError) as error:
        datasets.load_dataset(datasets.resolve("antmaze-large"))
    assert time.time() - start < 5
    message = str(error.value)
    assert "D4RL/antmaze/large-diverse-v1" in message
    assert str(tmp_path) in message
    assert "minari download D4RL/antmaze/large-diverse-v1" in message


def test_network_probe_is_quick_without_network(monkeypatch):
    for name in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    start = time.time()
    assert datasets._can_reach("127.0.0.1", port=1) is False  # nothing listens: refused at once
    assert datasets._can_reach("host.invalid") is False  # a name that never resolves
    assert time.time() - start < 4
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert datasets._can_reach("huggingface.co") is False


def test_misspelled_minari_id_offline_suggests_known_ids(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    monkeypatch.setattr(datasets, "_can_reach", lambda host: False)
    with pytest.raises(UserError, match="Closest known ids: D4RL/antmaze/large-diverse-v1"):
        datasets.load_dataset(datasets.resolve("D4RL/antmaze/lage-diverse-v1"))


def test_missing_local_id_that_cannot_be_built_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    with pytest.raises(UserError, match="common/builders.py cannot build it"):
        datasets.load_dataset(datasets.resolve("local/pointmaze/spiral-v0"))


def test_local_dataset_loads_as_flat_transitions(tiny_pointmaze):
    task = datasets.resolve(tiny_pointmaze)
    dataset = datasets.load_dataset(task)
    data = datasets.episodes_to_transitions(dataset.iterate_episodes(), task.domain)
    assert data["observations"].shape == (3000, 6)  # observation (4) + desired goal (2)
    assert data["truncated"].sum() == data["episode_ends"].sum() >= 1
    scoring = datasets.scoring_for(dataset, task.domain)
    assert scoring.ref_max > scoring.ref_min


# --- returns-to-go (Cal-QL) ---------------------------------------------------------------


def test_returns_to_go_stop_at_a_terminal():
    rewards = np.array([0.0, 0.0, 1.0, 0.0, 1.0])
    terminated = np.array([0, 0, 1, 0, 0], bool)
    episode_ends = np.array([0, 0, 0, 0, 1], bool)
    returns = datasets.returns_to_go(rewards, datasets.trajectory_ends(terminated, episode_ends), 0.5)
    np.testing.assert_allclose(returns, [0.25, 0.5, 1.0, 0.5, 1.0])  # nothing flows back across the terminal


def test_returns_to_go_stop_at_a_timeout_without_bootstrapping():
    rewards = np.array([1.0, 1.0, 1.0, 1.0])
    truncated_here = np.array([0, 1, 0, 1], bool)  # two timed-out episodes
    returns = datasets.returns_to_go(rewards, datasets.trajectory_ends(np.zeros(4, bool), truncated_here), 0.5)
    np.testing.assert_allclose(returns, [1.5, 1.0, 1.5, 1.0])


def test_failed_sparse_trajectory_gets_the_value_of_failing_forever():
    rewards = np.array([-5.0, -5.0, -5.0, -5.0, 5.0])  # a failure, then a success (AntMaze 10r - 5)
    ends = np.array([0, 0, 1, 0, 1], bool)
    returns = datasets.returns_to_go(rewards, ends, 0.99, failure_reward=-5.0)
    np.testing.assert_allclose(returns[:3], -500.0)
    np.testing.assert_allclose(returns[3:], [-5.0 + 0.99 * 5.0, 5.0], rtol=1e-6)  # the success: plain sum
    plain = datasets.returns_to_go(rewards, ends, 0.99)  # without the rule
    np.testing.assert_allclose(plain[:3], [-5 - 4.95 - 4.9005, -5 - 4.95, -5.0], rtol=1e-6)


def test_returns_to_go_split_at_an_observation_jump():
    observations = np.array([[0.0], [1.0], [7.0], [8.0]])
    next_observations = np.array([[1.0], [2.0], [8.0], [9.0]])  # row 1 -> row 2 is not continuous
    ends = datasets.trajectory_ends(np.zeros(4, bool), np.zeros(4, bool), observations, next_observations)
    np.testing.assert_array_equal(ends, [False, True, False, True])
    returns = datasets.returns_to_go(np.ones(4), ends, 0.5)
    np.testing.assert_allclose(returns, [1.5, 1.0, 1.5, 1.0])


def test_infinite_horizon_returns_continue_an_unterminated_trajectory():
    rewards, ends = np.array([1.0, 2.0]), np.array([False, True])
    np.testing.assert_allclose(datasets.returns_to_go(rewards, ends, 0.5, infinite_horizon=True), [3.0, 4.0])
    terminated = np.array([False, True])
    np.testing.assert_allclose(datasets.returns_to_go(rewards, ends, 0.5, terminated=terminated,
                                                      infinite_horizon=True), [2.0, 2.0])


def test_suggestions_name_only_envs_that_run_here():
    with pytest.raises(UserError) as error:
        datasets.resolve("halfcheetah-medium-expert-v2")
    message = str(error.value)
    assert "halfcheetah-medium" in message
    assert "HalfCheetah-v2" not in message and "HalfCheetah-v3" not in message  # mujoco_py envs
    with pytest.raises(UserError, match=r"HalfCheetah-v2 needs mujoco_py.*Closest names: HalfCheetah-v5"):
        datasets.resolve("HalfCheetah-v2")


def test_a_missing_simulator_dependency_is_one_message(monkeypatch):
    def make(*args, **kwargs):
        raise gym.error.DependencyNotInstalled("No module named 'mujoco_py'")

    monkeypatch.setattr(datasets.gym, "make", make)
    with pytest.raises(UserError, match="cannot be made here: No module named 'mujoco_py'"):
        datasets.env_factory(datasets.Task("Hopper-v5", None, "Hopper-v5", "locomotion"))()
