"""How many terminals an AntMaze dataset holds under the old and the new labels.

Old rule (this repository before D4RL's labels): each episode was cut at its first step with
Minari's stored reward > 0 (within 0.45 of the episode's OWN commanded goal), which became the
only terminal. New rule (`common.datasets.dataset_transitions`, D4RL's): every step whose next xy
position is within 0.5 of the evaluation goal cell's centre is a terminal; nothing is cut.

With `--dataset ID` it counts a Minari dataset you have (e.g. D4RL/antmaze/medium-diverse-v1).
Without it, it first builds one in Minari's AntMaze format in a temporary folder, by Minari's
recipe (scripts/antmaze/create_antmaze_dataset.py of minari-dataset-generation-scripts):
AntMaze_Medium_Diverse_GR-v4 with `continuing_task=True, reset_target=False` (a goal drawn from the
`c` cells at every reset, kept for the whole 1000-step episode), recorded by minari.DataCollector,
and an eval env spec with Minari's medium evaluation map (reset cell (1, 1), goal cell (6, 6)).
Minari's waypoint controller drives a trained SAC goal-reaching ant, which is not available here,
so the ant is MOVED BY STATE CHANGES: before every step its xy is shifted by up to `--speed`
towards its current waypoint, set as Minari's WaypointController sets them (the cells of a
shortest path, each at its centre minus U(0, 0.2) per axis, the next once within 0.45, the goal
itself last, where the ant then dwells), and the simulator steps with small random actions (std
0.2, Minari's action noise). The path, not the gait, decides the labels. Results: one JSON line.

    python benchmarks/antmaze_labels.py                      # build 20 episodes (20k steps) and count
    python benchmarks/antmaze_labels.py --dataset D4RL/antmaze/medium-diverse-v1
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import json
import os
import sys
import tempfile

import numpy as np
import tyro

if __package__ in (None, ""):  # run as `python benchmarks/antmaze_labels.py`: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import datasets  # noqa: E402

R, G = "r", "g"
MEDIUM_EVAL_MAP = [[1, 1, 1, 1, 1, 1, 1, 1],  # Minari's EVAL_ENV_MAPS["medium"]
                   [1, R, 0, 1, 1, 0, 0, 1],
                   [1, 0, 0, 1, 0, 0, 0, 1],
                   [1, 1, 0, 0, 0, 1, 1, 1],
                   [1, 0, 0, 1, 0, 0, 0, 1],
                   [1, 0, 1, 0, 0, 1, 0, 1],
                   [1, 0, 0, 0, 1, 0, G, 1],
                   [1, 1, 1, 1, 1, 1, 1, 1]]


@dataclasses.dataclass
class LabelArgs:
    dataset: str | None = None
    """A Minari AntMaze dataset id to count; none: build one (see the module docstring)."""
    episodes: int = 20
    """Episodes to build (1000 steps each)."""
    speed: float = 0.15
    """Largest xy shift per step when building, in maze units (a cell is 4 wide)."""
    seed: int = 0
    """Seed of the resets and the action noise when building."""


def shortest_path(maze, start: tuple[int, int], goal: tuple[int, int]) -> list[tuple[int, int]]:
    """The cells after `start` on a shortest path of free cells to `goal` (empty if equal)."""
    parents, queue = {start: None}, collections.deque([start])
    while queue:
        cell = queue.popleft()
        for step in ((0, 1), (1, 0), (0, -1), (-1, 0)):
            nxt = (cell[0] + step[0], cell[1] + step[1])
            if nxt not in parents and maze.maze_map[nxt[0]][nxt[1]] != 1:
                parents[nxt] = cell
                queue.append(nxt)
    path, cell = [], goal
    while cell != start:
        path.append(cell)
        cell = parents[cell]
    return path[::-1]


def build(dataset_id: str, episodes: int, speed: float, seed: int):
    """Minari's AntMaze recipe with waypoints as Minari's WaypointController sets them (the next
    cell's centre minus U(0, 0.2) per axis, the goal itself last; the next one once within 0.45);
    the ant is moved towards the current waypoint by state changes (module docstring)."""
    import gymnasium as gym
    import minari

    datasets.register_robotics_envs()
    env = gym.make("AntMaze_Medium_Diverse_GR-v4", continuing_task=True, reset_target=False)
    collector = minari.DataCollector(env)
    maze, ant = env.unwrapped.maze, env.unwrapped.ant_env
    rng = np.random.default_rng(seed)
    for episode in range(episodes):
        collector.reset(seed=seed + episode)
        goal_xy = env.unwrapped.goal.copy()
        start = tuple(int(i) for i in maze.cell_xy_to_rowcol(ant.data.qpos[:2]))
        path = shortest_path(maze, start, tuple(int(i) for i in maze.cell_xy_to_rowcol(goal_xy)))
        waypoints = [maze.cell_rowcol_to_xy(np.array(cell)) - rng.uniform(size=2) * 0.2 for cell in path[:-1]]
        waypoints.append(goal_xy)
        current, truncated = 0, False
        while not truncated:
            xy = ant.data.qpos[:2].copy()
            if current < len(waypoints) - 1 and np.linalg.norm(waypoints[current] - xy) <= 0.45:
                current += 1
            offset = waypoints[current] - xy
            qpos = ant.data.qpos.copy()
            qpos[:2] = xy + offset * min(1.0, speed / max(np.linalg.norm(offset), 1e-9))
            ant.set_state(qpos, ant.data.qvel)
            action = np.clip(0.2 * rng.standard_normal(8), -1.0, 1.0)
            _, _, _, truncated, _ = collector.step(action)
    eval_spec = copy.deepcopy(env.spec)
    eval_spec.kwargs["maze_map"] = MEDIUM_EVAL_MAP
    return collector.create_dataset(dataset_id, eval_env=eval_spec, algorithm_name="state-change waypoints")


def count(dataset) -> dict:
    episodes = list(dataset.iterate_episodes())
    rewards = [np.asarray(e.rewards) for e in episodes]
    first_success = [np.flatnonzero(r > 0) for r in rewards]
    data = datasets.dataset_transitions(dataset, "antmaze")
    goal = datasets.antmaze_goal(dataset)
    old_terminal_xy = [e.observations["achieved_goal"][s[0] + 1] for e, s in zip(episodes, first_success) if len(s)]
    lengths = np.array([len(r) for r in rewards])
    per_episode = np.split(data["terminated"], np.cumsum(lengths)[:-1])
    return {
        "dataset": dataset.spec.dataset_id,
        "episodes": len(episodes),
        "steps": int(lengths.sum()),
        "labelling_goal": goal.tolist(),
        "minari_reward_steps": int(sum((r > 0).sum() for r in rewards)),
        "terminals_before": int(sum(len(s) > 0 for s in first_success)),
        "terminals_before_within_0.5_of_goal": int(sum(np.linalg.norm(xy - goal) <= 0.5 for xy in old_terminal_xy)),
        "rows_before": int(sum(s[0] + 1 if len(s) else len(r) for s, r in zip(first_success, rewards))),
        "terminals_after": int(data["terminated"].sum()),
        "rows_after": int(len(data["terminated"])),
        "episodes_with_terminals_after": int(sum(t.any() for t in per_episode)),
        "visits_after": int(sum(np.sum(np.diff(np.concatenate([[0], t.astype(int)])) == 1) for t in per_episode)),
    }


def main(args: LabelArgs) -> dict:
    if args.dataset is not None:
        return count(datasets.load_dataset(datasets.resolve(args.dataset)))
    with tempfile.TemporaryDirectory() as root:
        previous = os.environ.get("MINARI_DATASETS_PATH")
        os.environ["MINARI_DATASETS_PATH"] = root
        try:
            with contextlib.redirect_stdout(sys.stderr):
                dataset = build("local/antmaze/labels-measure-v0", args.episodes, args.speed, args.seed)
            return {**count(dataset), "built": dataclasses.asdict(args)}
        finally:
            if previous is None:
                os.environ.pop("MINARI_DATASETS_PATH")
            else:
                os.environ["MINARI_DATASETS_PATH"] = previous


if __name__ == "__main__":
    print(json.dumps(main(tyro.cli(LabelArgs))))
