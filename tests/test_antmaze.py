"""AntMaze as D4RL defines it (common/datasets.py): labels against the evaluation goal, evaluation
within 0.5 of the episode's goal, and trajectory splits at several terminals per episode.

The data is real: a small dataset recorded with Minari's own DataCollector in Minari's AntMaze
format (continuing task, goal kept per episode, dict observations, eval env spec with a D4RL
evaluation map). Its episodes are commanded to goals other than the evaluation goal; the ant is
moved inside the simulator (state changes, as `tests.conftest.teleport_ant_to_goal`) so that it
passes through the evaluation-goal region several times and dwells at its own goal.
"""

import copy

import gymnasium as gym
import numpy as np
import pytest

from common import datasets
from common.cli import UserError
from common.evaluation import Evaluator
from tests.conftest import teleport_ant_to_goal

R, G = "r", "g"
# D4RL's U-maze evaluation map on Gymnasium-Robotics' U_MAZE walls: reset top-left, goal bottom-left.
EVAL_MAP = [[1, 1, 1, 1, 1], [1, R, 0, 0, 1], [1, 1, 1, 0, 1], [1, G, 0, 0, 1], [1, 1, 1, 1, 1]]
EVAL_GOAL = np.array([-4.0, -4.0])  # centre of cell (3, 1): x = 1.5 * 4 - 10, y = 10 - 3.5 * 4
OTHER_MAP = [[1, 1, 1, 1, 1], [1, G, 0, 0, 1], [1, 1, 1, 0, 1], [1, R, 0, 0, 1], [1, 1, 1, 1, 1]]
OTHER_GOAL = np.array([-4.0, 4.0])  # centre of cell (1, 1)
EPISODE_STEPS = 60
# Per episode: the commanded (own) goal cell, never the evaluation goal's, and the start cell.
EPISODES = [((1, 3), (1, 1)), ((3, 3), (1, 2)), ((1, 2), (3, 3))]
# Step -> where the ant is put before that step (then one step at rest: zero action).
EVENTS = {
    5: ("eval goal", (0.0, 0.0)),  # reaches the evaluation goal ...
    9: ("away", None),  # ... leaves it ...
    14: ("eval goal", (0.3, -0.2)),  # ... and comes back: a second visit, a second terminal run
    18: ("away", None),
    22: ("eval goal", (0.48, 0.0)),  # inside D4RL's 0.5 but outside Gymnasium-Robotics' 0.45
    23: ("away", None),
    27: ("eval goal", (0.0, -0.52)),  # just outside 0.5
    28: ("away", None),
    35: ("own goal", None),  # then dwells at its own goal (Minari's reward 1) to the end
}


def put_ant_at(env, xy) -> None:
    """Put the ant at rest at `xy`: a state change inside the simulator, like
    `teleport_ant_to_goal`; the env then steps as usual."""
    ant = env.unwrapped.ant_env
    qpos = ant.data.qpos.copy()
    qpos[:2] = xy
    ant.set_state(qpos, np.zeros_like(ant.data.qvel))


def collector(steps: int):
    import minari

    datasets.register_robotics_envs()
    env = gym.make("AntMaze_UMaze-v4", continuing_task=True, reset_target=False, max_episode_steps=steps)
    return minari.DataCollector(env)


def eval_spec(env, maze_map):
    """Minari's AntMaze recipe: the collection env's spec with a D4RL evaluation maze map."""
    spec = copy.deepcopy(env.env.spec)  # the env inside the DataCollector
    spec.kwargs["maze_map"] = maze_map
    return spec


@pytest.fixture(scope="module")
def antmaze(minari_session_root):
    """The test dataset (see the module docstring); returns the loaded Minari dataset."""
    env = collector(EPISODE_STEPS)
    rng = np.random.default_rng(0)
    for number, (goal_cell, reset_cell) in enumerate(EPISODES):
        env.reset(seed=number, options={"goal_cell": np.array(goal_cell), "reset_cell": np.array(reset_cell)})
        away = env.unwrapped.maze.cell_rowcol_to_xy(np.array(reset_cell))
        for step in range(EPISODE_STEPS):
            action = 0.5 * rng.uniform(-1, 1, 8)
            if step in EVENTS:
                kind, offset = EVENTS[step]
                if kind == "eval goal":
                    put_ant_at(env, EVAL_GOAL + offset)
                elif kind == "away":
                    put_ant_at(env, away)
                else:
                    teleport_ant_to_goal(env)
            if step in EVENTS or step >= 35:
                action = np.zeros(8)
            _, _, terminated, truncated, _ = env.step(action)
            assert not terminated and truncated == (step == EPISODE_STEPS - 1)
    return env.create_dataset("local/antmaze/labels-test-v0", eval_env=eval_spec(env, EVAL_MAP),
                              algorithm_name="scripted", ref_min_score=0.0, ref_max_score=1.0)


def raw_columns(dataset):
    episodes = list(dataset.iterate_episodes())
    return {
        "episodes": episodes,
        "xy": np.concatenate([e.observations["achieved_goal"][:-1] for e in episodes]),
        "next_xy": np.concatenate([e.observations["achieved_goal"][1:] for e in episodes]),
        "own_goal": np.concatenate([e.observations["desired_goal"][1:] for e in episodes]),
        "rewards": np.concatenate([e.rewards for e in episodes]),
        "truncations": np.concatenate([e.truncations for e in episodes]),
    }


# --- the labelling goal -------------------------------------------------------------------


def test_labelling_goal_is_the_goal_cell_centre_of_the_eval_env(antmaze):
    np.testing.assert_allclose(datasets.antmaze_goal(antmaze), EVAL_GOAL, atol=1e-12)


def test_labelling_goal_follows_the_eval_env_spec(minari_session_root):
    """Same collection env, another evaluation map: another goal (nothing hard-coded); an
    evaluation map with no single goal cell is a clear error."""
    env = collector(5)
    env.reset(seed=0)
    for _ in range(5):
        env.step(np.zeros(8))
    other = env.create_dataset("local/antmaze/labels-other-goal-v0", eval_env=eval_spec(env, OTHER_MAP),
                               algorithm_name="scripted")
    np.testing.assert_allclose(datasets.antmaze_goal(other), OTHER_GOAL, atol=1e-12)
    data = datasets.dataset_transitions(other, "antmaze")
    next_xy = np.concatenate([e.observations["achieved_goal"][1:] for e in other.iterate_episodes()])
    np.testing.assert_array_equal(data["terminated"], np.linalg.norm(next_xy - OTHER_GOAL, axis=1) <= 0.5)

    env.reset(seed=1)
    for _ in range(5):
        env.step(np.zeros(8))
    no_goal = env.create_dataset("local/antmaze/labels-no-goal-v0", eval_env=gym.make("AntMaze_UMaze-v4").spec,
                                 algorithm_name="scripted")
    with pytest.raises(UserError, match="0 goal cells"):
        datasets.dataset_transitions(no_goal, "antmaze")


def test_antmaze_transitions_need_the_goal():
    with pytest.raises(ValueError, match="dataset_transitions"):
        datasets.episodes_to_transitions([], "antmaze")


# --- the labels -----------------------------------------------------------------------------


def test_every_step_is_labelled_against_the_eval_goal_and_nothing_is_dropped(antmaze):
    raw = raw_columns(antmaze)
    data = datasets.dataset_transitions(antmaze, "antmaze")
    assert len(data["rewards"]) == sum(len(e.actions) for e in raw["episodes"]) == antmaze.total_steps

    distance = np.linalg.norm(raw["next_xy"] - EVAL_GOAL, axis=1)  # the NEXT position
    reached = distance <= 0.5
    np.testing.assert_array_equal(data["rewards"], reached.astype(np.float32))
    np.testing.assert_array_equal(data["terminated"], reached)
    np.testing.assert_array_equal(data["truncated"], raw["truncations"])  # time limits stay as they are
    np.testing.assert_array_equal(data["next_observations"][:, :2], raw["next_xy"].astype(np.float32))

    # The data is able to tell the rule from its near misses:
    assert ((distance > 0.45) & (distance <= 0.5)).any()  # Gymnasium-Robotics' 0.45 would miss these
    assert ((distance > 0.5) & (distance < 0.55)).any()  # a looser radius would take these
    current = np.linalg.norm(raw["xy"] - EVAL_GOAL, axis=1) <= 0.5
    assert (current != reached).any()  # the current position would label other steps
    # Minari's own reward (1 near each episode's own goal) is ignored:
    assert np.linalg.norm(raw["own_goal"] - EVAL_GOAL, axis=1).min() > 2.0
    assert (raw["rewards"] > 0).sum() >= 10 * len(EPISODES) and not data["rewards"][raw["rewards"] > 0].any()


def test_an_episode_holds_several_terminals_and_keeps_its_time_limit(antmaze):
    data = datasets.dataset_transitions(antmaze, "antmaze")
    for number in range(len(EPISODES)):
        rows = slice(number * EPISODE_STEPS, (number + 1) * EPISODE_STEPS)
        terminated = data["terminated"][rows]
        runs = np.flatnonzero(np.diff(terminated.astype(int)) == 1)  # separate visits to the goal
        assert terminated.sum() >= 3 and len(runs) >= 2
        assert data["truncated"][rows][-1] and data["episode_ends"][rows][-1]
        assert not data["episode_ends"][rows][:-1].any()


def test_trajectories_split_at_every_terminal(antmaze):
    """IQL's and Cal-QL's trajectory ends: every terminal and every episode end, nothing else
    (next observations continue the following row within an episode)."""
    data = datasets.dataset_transitions(antmaze, "antmaze")
    ends = datasets.trajectory_ends(data["terminated"], data["episode_ends"], data["observations"],
                                    data["next_observations"])
    np.testing.assert_array_equal(ends, data["terminated"] | data["episode_ends"])

    returns = datasets.returns_to_go(10 * data["rewards"] - 5, ends, 0.99, failure_reward=-5.0)
    np.testing.assert_allclose(returns[data["terminated"]], 5.0)  # nothing flows back across a terminal
    before = np.flatnonzero(data["terminated"][1:] & ~ends[:-1])  # a step just before a first terminal
    assert len(before) >= 2
    np.testing.assert_allclose(returns[before], -5.0 + 0.99 * 5.0, rtol=1e-6)
    last_terminal = np.flatnonzero(data["terminated"][:EPISODE_STEPS]).max()
    np.testing.assert_allclose(returns[last_terminal + 1:EPISODE_STEPS], -500.0)  # the tail never succeeds


def test_returns_to_go_with_several_terminals_by_hand():
    rewards = np.array([0, 0, 1, 1, 0, 0, 1, 0, 0], np.float32)  # terminals at 2, 3 and 6 (D4RL labels)
    terminated = rewards.astype(bool)
    episode_ends = np.zeros(9, bool)
    episode_ends[-1] = True
    ends = datasets.trajectory_ends(terminated, episode_ends)
    np.testing.assert_array_equal(ends, [0, 0, 1, 1, 0, 0, 1, 0, 1])
    returns = datasets.returns_to_go(10 * rewards - 5, ends, 0.5, failure_reward=-5.0)
    np.testing.assert_allclose(returns, [-5 - 2.5 + 1.25, -5 + 2.5, 5, 5, -5 - 2.5 + 1.25, -5 + 2.5, 5,
                                         -10, -10])


# --- evaluation -----------------------------------------------------------------------------


def make_eval_env(dataset):
    task = datasets.Task(dataset.spec.dataset_id, dataset.spec.dataset_id, None, "antmaze")
    return datasets.env_factory(task, dataset)


@pytest.mark.parametrize("offset, success", [((0.48, 0.0), True), ((0.0, -0.49), True), ((0.52, 0.0), False),
                                             ((0.0, 0.6), False)])
def test_evaluation_succeeds_and_ends_within_half_a_unit(antmaze, offset, success):
    env = make_eval_env(antmaze)()
    env.reset(seed=3)
    goal = env.unwrapped.goal.copy()
    put_ant_at(env, goal + offset)
    observation, reward, terminated, truncated, info = env.step(np.zeros(8, np.float32))
    assert abs(np.linalg.norm(observation[:2] - goal) - np.linalg.norm(offset)) < 1e-3  # the ant stayed put
    assert (info["success"], terminated, reward, truncated) == (success, success, float(success), False)
    np.testing.assert_array_equal(env.unwrapped.goal, goal)  # the goal is kept during the episode


def test_evaluation_goal_is_redrawn_near_the_goal_cell_at_every_reset(antmaze):
    env = make_eval_env(antmaze)()
    goals = []
    for seed in range(20):
        env.reset(seed=seed)
        goals.append(env.unwrapped.goal.copy())
    goals = np.array(goals)
    assert np.abs(goals - EVAL_GOAL).max() <= 1.0  # Gymnasium-Robotics: +-0.25 x maze scaling 4
    assert len(np.unique(goals.round(6), axis=0)) == 20
    assert env.spec.kwargs["continuing_task"] and not env.spec.kwargs["reset_target"]


def test_evaluator_counts_a_success_at_0_48_and_not_at_0_52(antmaze):
    evaluator = Evaluator(make_eval_env(antmaze), 2, datasets.scoring_for(antmaze, "antmaze"))

    def policy(observations):  # holds ant 0 at 0.48 from its goal and ant 1 at 0.52 from its
        for env, distance in zip(evaluator.envs, (0.48, 0.52)):
            put_ant_at(env, env.unwrapped.goal + (distance, 0.0))
        return np.zeros((len(observations), 8))

    metrics = evaluator(policy, seed=0)
    evaluator.close()
    assert metrics["success_rate"] == 0.5 and metrics["normalized_score"] == 50.0
    assert metrics["return"] == 0.5  # reward 1 at the one success, 0 elsewhere
    assert metrics["length"] == (1 + EPISODE_STEPS) / 2  # ant 0 ends at once, ant 1 at the time limit


def test_label_count_benchmark_counts_both_rules(antmaze):
    """benchmarks/antmaze_labels.py, whose figure the README quotes, on the test dataset: the old
    rule has one terminal per episode that reached its own goal, the new one the formula's."""
    from benchmarks import antmaze_labels

    counts = antmaze_labels.count(antmaze)
    raw = raw_columns(antmaze)
    assert counts["terminals_before"] == len(EPISODES)  # every episode dwells at its own goal
    assert counts["terminals_before_within_0.5_of_goal"] == 0
    assert counts["rows_before"] == sum(int(np.argmax(e.rewards > 0)) + 1 for e in raw["episodes"])
    assert counts["terminals_after"] == int((np.linalg.norm(raw["next_xy"] - EVAL_GOAL, axis=1) <= 0.5).sum())
    assert counts["rows_after"] == counts["steps"] == len(EPISODES) * EPISODE_STEPS
    assert counts["visits_after"] == 3 * len(EPISODES) and counts["episodes_with_terminals_after"] == len(EPISODES)
