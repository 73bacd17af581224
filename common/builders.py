"""Build real Minari datasets locally, by simulation (the command line is benchmarks/build_dataset.py).

Two kinds of dataset, both written into Minari's local dataset directory
(``minari.storage.get_dataset_path``, which respects ``MINARI_DATASETS_PATH``) so that
``minari.load_dataset(dataset_id)`` finds them. Nothing is downloaded and nothing is faked:
every transition comes from stepping the environment.

PointMaze (``local/pointmaze/{open,umaze,medium,large}[-dense][-{N}k]-v0``; ``-{N}k``: N thousand steps)
    Minari's own recipe for its ``D4RL/pointmaze/*`` data (Farama-Foundation/
    minari-dataset-generation-scripts, ``scripts/pointmaze``), which follows D4RL's maze2d:

    - environment ``PointMaze_{Maze}[Dense]-v3`` as a continuing task whose goal is re-drawn each
      time it is reached (``continuing_task=True, reset_target=True``);
    - a shortest-path planner over the maze cells gives waypoints (Minari uses Q-iteration on
      the cell grid; we use breadth-first search, which gives the same shortest paths), and a PD
      controller (P gain 10, D gain -1, waypoint radius 0.1) follows them to the goal;
      intermediate waypoints are jittered a little so paths differ;
    - Gaussian noise of std 0.5 is added to every action, which is then clipped to [-1, 1];
    - evaluation environment (stored as ``eval_env``): the same maze with one fixed goal cell,
      the cell Minari's scripts use (D4RL maze2d semantics), ``continuing_task=True,
      reset_target=False``, the registered time limit (300 / 300 / 600 / 800 steps);
    - ``ref_max_score``: mean return of the noiseless planner + PD controller on the evaluation
      environment; ``ref_min_score``: mean return of a uniform random policy there; each over
      ``ref_episodes`` (default 100, Minari's default) episodes.

    Deliberate difference: Minari runs one 1M-step episode and cuts it at every success. Here
    episodes end where the environment's time limit truncates them (300 / 600 / 800 steps),
    and terminations / truncations are recorded exactly as the environment returns them (a
    continuing task never terminates). Per-step ``infos`` (the ``success`` flag) are stored.

Gymnasium MuJoCo (``local/{envname}/random-v0``, ``local/{envname}/{name}-v0``)
    Any Gymnasium MuJoCo environment with a flat Box observation (e.g. ``Hopper-v5``), stepped by
    a uniform random policy or by a saved policy of ours. A checkpoint is a run directory holding
    ``config.json`` with key ``"algorithm"``; ``algorithms.{algorithm}.load_policy(run_dir)``
    returns a callable from a float32 batch of observations (n, obs_dim) to actions in [-1, 1]
    (n, act_dim). Actions are rescaled to the environment's bounds, optionally after adding
    Gaussian noise of std ``noise`` (in [-1, 1] units, then clipped). ``envname`` is the env id
    lower-cased without its version (``Hopper-v5`` -> ``hopper``). The evaluation environment is
    the data environment.

    Reference scores are stored only when both are known: Minari drops ``ref_min_score`` when no
    ``ref_max_score`` is given, and if only ``ref_max_score`` were given it would estimate the
    minimum itself with its own random policy. So with ``ref_max_score`` (the user's number,
    ``--ref-max-score``) we compute ``ref_min_score`` as the mean return of a uniform random policy
    and pass both explicitly; without it the dataset has no reference scores, and normalized
    scores are omitted downstream, never invented. Minari is never asked to estimate anything.

Successors of D4RL's locomotion ``random`` / ``medium-replay`` / ``medium-expert``
(``local/{envname}/ours-{random,medium-replay,medium-expert}-v0``)
    Ours, not D4RL's (v5 envs, MuJoCo 3, Minari's and our policies): scores on them are not
    directly comparable with D4RL's. ``build_random_successor``: 1M uniform-random steps
    (``build_from_policy``). ``build_medium_expert``: Minari's ``mujoco/{env}/medium-v0`` then
    ``expert-v0`` episodes (``minari.combine_datasets``). ``build_medium_replay``: every transition
    of a small SAC run (``sac_until``) stopped at the first evaluation reaching the mean episode
    return of Minari's medium set. Reference scores are copied from Minari's medium set. The
    Minari sources are downloaded when missing (``minari_source``). See the section below.

Defaults and cost (measured on a 2-core CPU): the default PointMaze size is
``DEFAULT_POINTMAZE_STEPS`` = 200k steps (Minari's sets have 1M). ``build()`` of the default
training set ``local/pointmaze/umaze-dense-v0`` takes about 23 s (collection plus 2 x 100
reference episodes): 667 episodes, 34 MB, ref_min_score 58.3, ref_max_score 227.7 (seed 0);
``local/pointmaze/large-dense-v0`` about 26 s. The default random MuJoCo size is
``DEFAULT_POLICY_STEPS`` = 100k steps: ``local/hopper/random-v0`` about 38 s (4.5k short
episodes; Minari's HDF5 storage costs per episode, 86 MB).

Safety: a dataset is built under a hidden staging directory inside the dataset root (same
filesystem; Minari ignores hidden directories) and renamed to its final id only when complete,
so a failure or Ctrl-C never leaves a partial dataset under the final id (a killed process may
leave a hidden ``.build-*`` directory, safe to delete). Building an id that exists raises
``FileExistsError`` unless ``overwrite=True``. Concurrent builds of one id are safe: each build
holds a per-id file lock (``fcntl.flock`` under the hidden ``.locks`` directory of the dataset
root), and a process that waited for it uses the dataset the other one finished. One seed drives everything (env reset seeds,
action noise, waypoint jitter, the random policy, the reference episodes): the same seed gives
the same dataset.

Usage::

    python benchmarks/build_dataset.py pointmaze --maze umaze --dense --num-steps 100000
    python benchmarks/build_dataset.py policy --env Hopper-v5 --policy random --num-steps 50000
    python benchmarks/build_dataset.py policy --env Hopper-v5 --policy runs/rlpd__... --name rlpd
    python benchmarks/build_dataset.py random --env Hopper-v5
    python benchmarks/build_dataset.py medium-expert --env Hopper-v5
    python benchmarks/build_dataset.py medium-replay --env Hopper-v5
"""

from __future__ import annotations

import collections
import contextlib
import functools
import importlib.metadata
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Iterator

import gymnasium as gym
import minari
import numpy as np
from minari.dataset.minari_dataset import parse_dataset_id
from minari.storage import get_dataset_path

MAZES = {"open": "Open", "umaze": "UMaze", "medium": "Medium", "large": "Large"}
# Goal cell (row, col) of each evaluation maze: the single goal of Minari's evaluation maps.
EVAL_GOAL_CELLS = {"open": (2, 3), "umaze": (1, 1), "medium": (6, 6), "large": (7, 9)}
ACTION_NOISE = 0.5  # std of the Gaussian noise on the PD controller's actions (Minari)
P_GAIN, D_GAIN = 10.0, -1.0  # PD controller gains (Minari / D4RL waypoint controller)
WAYPOINT_RADIUS = 0.1  # a waypoint counts as reached within this distance (Minari)
WAYPOINT_JITTER = 0.1  # uniform jitter of intermediate waypoints, per coordinate
REF_EPISODES = 100  # episodes averaged for each reference score (Minari's default)
DEFAULT_POINTMAZE_STEPS = 200_000
DEFAULT_POLICY_STEPS = 100_000
AUTHOR = "o2o common/builders.py"
CODE = "common/builders.py (command line: benchmarks/build_dataset.py)"

BUILDABLE_PATTERNS: list[str] = [
    "local/pointmaze/{open,umaze,medium,large}-v0",
    "local/pointmaze/{open,umaze,medium,large}-dense-v0",
    "local/pointmaze/{open,umaze,medium,large}[-dense]-{N}k-v0  (N thousand steps instead of the"
    " default 200k, e.g. local/pointmaze/medium-30k-v0)",
    "local/{envname}/random-v0  (envname: a Gymnasium MuJoCo v5 env lower-cased, e.g. hopper,"
    " halfcheetah, walker2d, ant, invertedpendulum)",
    "local/{envname}/ours-random-v0, ours-medium-replay-v0, ours-medium-expert-v0  (our successors"
    " of D4RL's locomotion random / medium-replay / medium-expert in {Env}-v5, NOT D4RL's data;"
    " they read Minari's mujoco/{envname}/medium-v0 (and expert-v0), downloading them if needed)",
]

Policy = Callable[[object], np.ndarray]


# --------------------------------------------------------------------------- PointMaze


def pointmaze_env_id(maze: str, dense: bool = False) -> str:
    """Gymnasium-Robotics env id of a maze, e.g. ("umaze", True) -> PointMaze_UMazeDense-v3."""
    if maze not in MAZES:
        raise ValueError(f"Unknown maze {maze!r}; choose one of {sorted(MAZES)}.")
    return f"PointMaze_{MAZES[maze]}{'Dense' if dense else ''}-v3"


class MazePlanner:
    """Shortest paths between the free cells of a maze map (breadth-first search)."""

    def __init__(self, maze_map: list[list]):
        self.free = {
            (i, j) for i, row in enumerate(maze_map) for j, cell in enumerate(row) if cell != 1
        }
        self._toward: dict[tuple, dict[tuple, tuple]] = {}

    def path(self, start: tuple, goal: tuple) -> list[tuple]:
        """Cells from start to goal, both included; [start] if the goal cannot be reached."""
        toward = self._next_cells(goal)
        cells = [start]
        while cells[-1] != goal and cells[-1] in toward:
            cells.append(toward[cells[-1]])
        return cells

    def _next_cells(self, goal: tuple) -> dict[tuple, tuple]:
        """For every cell that can reach the goal, its neighbour one step closer (cached)."""
        if goal not in self._toward:
            toward, frontier = {}, collections.deque([goal])
            while frontier:
                cell = frontier.popleft()
                for di, dj in ((-1, 0), (1, 0), (0, -1), (0, 1)):
                    nxt = (cell[0] + di, cell[1] + dj)
                    if nxt in self.free and nxt != goal and nxt not in toward:
                        toward[nxt] = cell
                        frontier.append(nxt)
            self._toward[goal] = toward
        return self._toward[goal]


class WaypointController:
    """PD controller following the planner's waypoints to the desired goal (no action noise).

    The waypoints are the centres of the cells on a shortest path (jittered when ``rng`` is
    given), then the goal itself. It replans when the goal changes or when the ball leaves the
    planned cells.
    """

    def __init__(self, maze, rng: np.random.Generator | None = None):
        self.maze, self.rng = maze, rng
        self.planner = MazePlanner(maze.maze_map)
        self.goal: np.ndarray | None = None
        self.route: set[tuple] = set()
        self.waypoints: list[np.ndarray] = []

    def __call__(self, obs: dict) -> np.ndarray:
        pos, vel, goal = obs["achieved_goal"], obs["observation"][2:], obs["desired_goal"]
        cell = self._cell(pos)
        if self.goal is None or not np.array_equal(goal, self.goal) or cell not in self.route:
            self._plan(cell, goal)
        while len(self.waypoints) > 1 and np.linalg.norm(self.waypoints[0] - pos) < WAYPOINT_RADIUS:
            self.waypoints.pop(0)  # reached: go on to the next one
        return P_GAIN * (self.waypoints[0] - pos) + D_GAIN * vel

    def _cell(self, xy: np.ndarray) -> tuple:
        return tuple(int(v) for v in self.maze.cell_xy_to_rowcol(xy))

    def _plan(self, cell: tuple, goal: np.ndarray) -> None:
        cells = self.planner.path(cell, self._cell(goal))
        points = [self.maze.cell_rowcol_to_xy(np.array(c)) for c in cells[1:-1]]
        if self.rng is not None:
            points = [p + self.rng.uniform(-WAYPOINT_JITTER, WAYPOINT_JITTER, 2) for p in points]
        self.goal, self.route = goal.copy(), set(cells)
        self.waypoints = points + [goal.copy()]


def pd_policy(controller: WaypointController, rng: np.random.Generator | None = None,
              noise: float = 0.0) -> Policy:
    """The controller's action plus Gaussian noise of std noise, clipped to [-1, 1], as float32."""

    def act(obs):
        action = controller(obs)
        if noise > 0:
            action = action + rng.normal(0.0, noise, action.shape)
        return np.clip(action, -1.0, 1.0).astype(np.float32)

    return act


def make_pointmaze_envs(maze: str, dense: bool) -> tuple[gym.Env, gym.Env]:
    """(data env, eval env): goal re-drawn on success vs one fixed goal cell (D4RL maze2d)."""
    from common.datasets import register_robotics_envs

    register_robotics_envs()  # quietly: no Gymnasium-Robotics release notice
    env_id = pointmaze_env_id(maze, dense)
    eval_map = [list(row) for row in gym.spec(env_id).kwargs["maze_map"]]
    row, col = EVAL_GOAL_CELLS[maze]
    eval_map[row][col] = "g"
    env = gym.make(env_id, continuing_task=True, reset_target=True)
    eval_env = gym.make(env_id, maze_map=eval_map, continuing_task=True, reset_target=False)
    return env, eval_env


def build_pointmaze(
    maze: str,
    dense: bool = False,
    num_steps: int = DEFAULT_POINTMAZE_STEPS,
    seed: int = 0,
    dataset_id: str | None = None,
    *,
    overwrite: bool = False,
    exist_ok: bool = False,
    ref_episodes: int = REF_EPISODES,
) -> minari.MinariDataset:
    """Build a PointMaze dataset with Minari's planner + noisy PD controller recipe."""
    pointmaze_env_id(maze, dense)  # validates the maze name
    dataset_id = dataset_id or f"local/pointmaze/{maze}{'-dense' if dense else ''}-v0"
    data_rng, ref_rng = np.random.default_rng(seed).spawn(2)

    def create() -> None:
        env, eval_env = make_pointmaze_envs(maze, dense)
        controller = WaypointController(env.unwrapped.maze, data_rng)
        collector = collect(env, pd_policy(controller, data_rng, ACTION_NOISE), num_steps,
                            data_rng, record_infos=True)
        expert = pd_policy(WaypointController(eval_env.unwrapped.maze))
        ref_max = mean_return(eval_env, expert, ref_episodes, ref_rng)
        ref_min = mean_return(eval_env, uniform_policy(eval_env, ref_rng), ref_episodes, ref_rng)
        eval_env.close()
        save(collector, dataset_id, eval_env, ref_min, ref_max, ref_episodes,
             algorithm_name=f"BFS planner + PD controller, action noise std {ACTION_NOISE}",
             description=f"{pointmaze_env_id(maze, dense)} as a continuing task (goal re-drawn "
             "on success); waypoints from a BFS shortest path over the maze cells followed by a "
             f"PD controller with Gaussian action noise; seed {seed}.",
             requirements=_requirements("gymnasium-robotics", "mujoco"))

    return _staged_build(dataset_id, overwrite, create, exist_ok)


# --------------------------------------------------------------------------- MuJoCo policies


def mujoco_v5_envs() -> dict[str, str]:
    """Lower-cased name -> id of every Gymnasium MuJoCo v5 environment (hopper -> Hopper-v5)."""
    return {
        spec.name.lower(): spec.id
        for spec in gym.registry.values()
        if spec.version == 5
        and isinstance(spec.entry_point, str)
        and spec.entry_point.startswith("gymnasium.envs.mujoco")
    }


def box_policy(env: gym.Env, unit_policy: Callable[[np.ndarray], np.ndarray],
               rng: np.random.Generator, noise: float = 0.0) -> Policy:
    """Wrap a [-1, 1] batch policy: add Gaussian noise, clip, rescale to the env's Box bounds."""
    low, high = env.action_space.low, env.action_space.high
    shape = env.action_space.shape

    def act(obs):
        action = np.asarray(unit_policy(np.asarray(obs, np.float32)[None]))
        if action.shape != (1, *shape):
            raise ValueError(f"Policy gave action shape {action.shape}, expected {(1, *shape)}.")
        action = action[0] + (rng.normal(0.0, noise, shape) if noise > 0 else 0.0)
        action = np.clip(action, -1.0, 1.0)
        return (low + (action + 1.0) * 0.5 * (high - low)).astype(env.action_space.dtype)

    return act


def uniform_policy(env: gym.Env, rng: np.random.Generator) -> Policy:
    """Uniform random actions over the env's Box action space, drawn from rng."""
    space = env.action_space
    return lambda obs: rng.uniform(space.low, space.high).astype(space.dtype)


def build_from_policy(
    env_id: str,
    policy: Callable[[np.ndarray], np.ndarray] | None = None,
    num_steps: int = DEFAULT_POLICY_STEPS,
    seed: int = 0,
    dataset_id: str | None = None,
    name: str = "policy",
    noise: float = 0.0,
    *,
    overwrite: bool = False,
    exist_ok: bool = False,
    ref_max_score: float | None = None,
    ref_episodes: int = REF_EPISODES,
    ref_scores_from: str | None = None,
    note: str = "",
) -> minari.MinariDataset:
    """Build a dataset of a Gymnasium MuJoCo env stepped by a uniform random policy (`policy`
    None) or by `policy`, a batch policy (n, obs_dim) -> (n, act_dim) in [-1, 1] (e.g. a
    training script's `load_policy(run_dir)`); `name` names its dataset and its source.

    Reference scores: with `ref_scores_from` (a Minari dataset id, e.g. ``mujoco/hopper/medium-v0``,
    loaded or downloaded by `minari_source`) its ``ref_min_score`` / ``ref_max_score`` are copied
    (none if it has none); else with `ref_max_score` the minimum is a uniform random policy's mean
    return; else none. `note` is appended to the stored description."""
    spec = gym.spec(env_id)  # raises a clear error for an unknown env id
    if ref_scores_from is not None and ref_max_score is not None:
        raise ValueError("Pass either ref_max_score or ref_scores_from, not both.")
    kind = "random" if policy is None else name
    dataset_id = dataset_id or f"local/{spec.name.lower()}/{kind}-v0"
    data_rng, ref_rng = np.random.default_rng(seed).spawn(2)
    unit = policy
    root = get_dataset_path()

    def create() -> None:
        env, eval_env = gym.make(env_id), gym.make(env_id)
        if not isinstance(env.observation_space, gym.spaces.Box) or not isinstance(
                env.action_space, gym.spaces.Box):
            raise ValueError(f"{env_id} needs Box observation and action spaces.")
        ref_min, ref_max, episodes = None, ref_max_score, ref_episodes
        if ref_scores_from is not None:
            with _datasets_root(root):
                ref_min, ref_max, episodes = reference_scores(minari_source(
                    ref_scores_from, env_id, f"{dataset_id} copies its reference scores from {ref_scores_from}: "))
        act = (uniform_policy(env, data_rng) if unit is None
               else box_policy(env, unit, data_rng, noise))
        collector = collect(env, act, num_steps, data_rng)
        if ref_max_score is not None:
            ref_min = mean_return(eval_env, uniform_policy(eval_env, ref_rng), ref_episodes,
                                  ref_rng)
        eval_env.close()
        source = "uniform random policy" if unit is None else f"policy {name}"
        if unit is not None and noise > 0:
            source += f", action noise std {noise}"
        refs = ""
        if ref_scores_from is not None:
            refs = (f" Reference scores copied from {ref_scores_from}." if ref_min is not None
                    else f" {ref_scores_from} has no reference scores, so none are stored.")
        save(collector, dataset_id, eval_env, ref_min, ref_max, episodes,
             algorithm_name=source,
             description=f"{env_id} stepped by a {source}; seed {seed}.{refs}{note}",
             requirements=_requirements("gymnasium", "mujoco"))

    return _staged_build(dataset_id, overwrite, create, exist_ok)


# --------------------------------------------------------------------------- D4RL successors
#
# D4RL's locomotion `random`, `medium-replay` and `medium-expert` sets have no Minari
# counterpart. These builders make the closest honest equivalents for the Gymnasium v5 envs,
# under ids that say they are ours (`local/{envname}/ours-{kind}-v0`), never D4RL's: other
# simulator (MuJoCo 3, v5 envs), other policies (Minari's, and our SAC), other reference
# scores. Scores on them are NOT directly comparable with D4RL's published numbers.

SUCCESSOR_KINDS = ("random", "medium-replay", "medium-expert")
SUCCESSOR_RANDOM_STEPS = 1_000_000  # D4RL's random sets hold 1M steps
SAC_START_STEPS = 5_000  # uniform random actions before the first update (RLPD's locomotion value)
SAC_EVAL_EVERY = 5_000  # environment steps between evaluations
SAC_EVAL_EPISODES = 10  # deterministic episodes per evaluation
SAC_MAX_STEPS = 1_000_000  # give up (and write nothing) if the target is not reached by then
SAC_HIDDEN = (256, 256)
SAC_BATCH = 256
SAC_LR, SAC_GAMMA, SAC_TAU = 3e-4, 0.99, 0.005


def successor_id(envname: str, kind: str) -> str:
    """The local id of our successor of D4RL's {envname}-{kind}: local/{envname}/ours-{kind}-v0."""
    if kind not in SUCCESSOR_KINDS:
        raise ValueError(f"Unknown successor kind {kind!r}; choose one of {SUCCESSOR_KINDS}.")
    return f"local/{envname}/ours-{kind}-v0"


def minari_source(dataset_id: str, env_id: str | None = None, purpose: str = "") -> minari.MinariDataset:
    """A Minari dataset a successor is made from (e.g. ``mujoco/hopper/medium-v0``): the local
    copy, else Minari's download (`common.datasets.load_dataset`; with no network it ends with
    one message saying how to fetch the dataset, prefixed with `purpose`). With env_id, its env
    must be that env."""
    from common import datasets

    try:
        dataset = datasets.load_dataset(datasets.resolve(dataset_id))
    except datasets.UserError as error:
        raise datasets.UserError(f"{purpose}{error}" if purpose else str(error)) from None
    spec = dataset.spec.env_spec
    if env_id is not None and (spec is None or spec.id != env_id):
        raise ValueError(f"{dataset_id} was recorded in {spec.id if spec else 'no env'}, not {env_id}.")
    return dataset


def reference_scores(dataset: minari.MinariDataset) -> tuple[float | None, float | None, int | None]:
    """(ref_min_score, ref_max_score, num_episodes_average_score) of a dataset, Nones if absent."""
    meta = dataset.storage.metadata
    if meta.get("ref_min_score") is None or meta.get("ref_max_score") is None:
        return None, None, None
    episodes = meta.get("num_episodes_average_score")
    return float(meta["ref_min_score"]), float(meta["ref_max_score"]), (
        int(episodes) if episodes is not None else None)


def mean_episode_return(dataset: minari.MinariDataset) -> float:
    """Mean undiscounted return of a dataset's episodes (its policy's level)."""
    return float(np.mean([np.sum(episode.rewards) for episode in dataset.iterate_episodes()]))


def _not_d4rl(kind: str, env_id: str) -> str:
    return (f" Successor of D4RL's {gym.spec(env_id).name.lower()}-{kind}, built by this project "
            f"(common/builders.py) in {env_id}: not D4RL's data; scores on it are not directly "
            "comparable with D4RL's.")


def build_random_successor(
    env_id: str,
    num_steps: int = SUCCESSOR_RANDOM_STEPS,
    seed: int = 0,
    dataset_id: str | None = None,
    *,
    ref_scores_from: str | None = None,
    overwrite: bool = False,
    exist_ok: bool = False,
) -> minari.MinariDataset:
    """Our successor of D4RL's `{env}-random`: `num_steps` (1M, as D4RL's) steps of a uniform
    random policy in `env_id` (a v5 env), by `build_from_policy` (same episode, termination and
    truncation handling). Reference scores are copied from Minari's ``mujoco/{env}/medium-v0``
    (`ref_scores_from`), so all successors of an env share Minari's scale for it."""
    envname = gym.spec(env_id).name.lower()
    return build_from_policy(
        env_id, None, num_steps, seed, dataset_id or successor_id(envname, "random"),
        overwrite=overwrite, exist_ok=exist_ok,
        ref_scores_from=ref_scores_from or f"mujoco/{envname}/medium-v0",
        note=_not_d4rl("random", env_id))


def build_medium_expert(
    env_id: str,
    dataset_id: str | None = None,
    *,
    medium_id: str | None = None,
    expert_id: str | None = None,
    overwrite: bool = False,
    exist_ok: bool = False,
) -> minari.MinariDataset:
    """Our successor of D4RL's `{env}-medium-expert`: every episode of Minari's
    ``mujoco/{env}/medium-v0`` then every episode of ``mujoco/{env}/expert-v0`` (as D4RL
    concatenated its medium and expert sets), written by ``minari.combine_datasets``.

    ``combine_datasets`` (Minari 0.5.4) copies the episodes in order (observations, actions,
    rewards, terminations, truncations, infos; new episode ids from 0; the per-episode metadata,
    reset seeds included, is not carried over), the env spec
    (max_episode_steps the largest of the sources') and the authors, and records the source ids
    as ``combined_datasets``; it keeps no evaluation env and no reference scores. Those are
    copied here when every source has the same ones, else left out (never invented)."""
    envname = gym.spec(env_id).name.lower()
    medium_id = medium_id or f"mujoco/{envname}/medium-v0"
    expert_id = expert_id or f"mujoco/{envname}/expert-v0"
    dataset_id = dataset_id or successor_id(envname, "medium-expert")
    root = get_dataset_path()

    def create() -> None:
        with _datasets_root(root):
            needs = f"{dataset_id} is made of {medium_id} and {expert_id}: "
            sources = [minari_source(medium_id, env_id, needs), minari_source(expert_id, env_id, needs)]
        get_dataset_path(dataset_id).parent.mkdir(parents=True, exist_ok=True)  # Minari mkdirs only the last level
        combined = minari.combine_datasets(sources, dataset_id)
        metas = [source.storage.metadata for source in sources]
        extra: dict = {}
        if len({meta.get("eval_env_spec") for meta in metas}) == 1 and metas[0].get("eval_env_spec"):
            extra["eval_env_spec"] = metas[0]["eval_env_spec"]
        refs = {reference_scores(source) for source in sources}
        ref_note = " Reference scores: none (the sources' differ or are absent)."
        if len(refs) == 1 and None not in (ref := refs.pop())[:2]:
            extra.update(ref_min_score=ref[0], ref_max_score=ref[1])
            if ref[2] is not None:
                extra["num_episodes_average_score"] = ref[2]
            ref_note = " Reference scores copied from the sources (the same in both)."
        combined.storage.update_metadata({
            **extra,
            "author": set(combined.storage.metadata.get("author", set())) | {AUTHOR},
            "code_permalink": CODE,
            "algorithm_name": f"concatenation of {medium_id} and {expert_id}",
            "description": (f"Every episode of {medium_id} ({sources[0].total_episodes} episodes) "
                            f"then every episode of {expert_id} ({sources[1].total_episodes}), "
                            f"in order.{ref_note}{_not_d4rl('medium-expert', env_id)}"),
        })

    return _staged_build(dataset_id, overwrite, create, exist_ok)


# ---- a small SAC whose every environment transition is recorded (medium-replay)
#
# Kept here, not borrowed from algorithms/rlpd.py, because common/ may not import algorithms/
# and the training scripts build `local/...` ids on first use through common/. It is plain SAC
# (Haarnoja et al. 2018, arXiv 1812.05905): twin Q with target networks, min of the two in the
# target, entropy backup, tanh-Gaussian actor, learned temperature with target entropy -|A|,
# Adam 3e-4, gamma 0.99, tau 0.005, batch 256, one update per env step after SAC_START_STEPS
# uniform random steps; time-limit truncations bootstrap, terminations do not.


def _mlp_params(rng: np.random.Generator, sizes: list[int], copies: int) -> list[dict]:
    """`copies` independent MLPs stacked on a leading axis: weights N(0, 1/fan_in) (LeCun normal,
    Flax's default kernel init), zero biases."""
    return [{"w": rng.normal(0.0, 1.0 / np.sqrt(n_in), (copies, n_in, n_out)).astype(np.float32),
             "b": np.zeros((copies, 1, n_out), np.float32)} for n_in, n_out in zip(sizes[:-1], sizes[1:])]


def _mlp(params: list[dict], x):
    """Apply stacked MLPs (ReLU hidden layers) to x of shape (batch, in) or (copies, batch, in)."""
    import jax
    import jax.numpy as jnp

    x = jnp.broadcast_to(x, (params[0]["w"].shape[0], *x.shape[-2:]))
    for i, layer in enumerate(params):
        x = jnp.einsum("kbi,kio->kbo", x, layer["w"]) + layer["b"]
        if i < len(params) - 1:
            x = jax.nn.relu(x)
    return x


def _actor(params, obs):
    """(mean, log_std) of the pre-tanh Gaussian."""
    import jax.numpy as jnp

    mean, log_std = jnp.split(_mlp(params, obs)[0], 2, axis=-1)
    return mean, jnp.clip(log_std, -10.0, 2.0)


def _twin_q(params, obs, act):
    """Both critics' Q-values, shape (2, batch)."""
    import jax.numpy as jnp

    return _mlp(params, jnp.concatenate([obs, act], axis=-1))[..., 0]


def _tanh_gaussian(mean, log_std, key):
    """A tanh-squashed Gaussian sample and its log-probability."""
    import jax
    import jax.numpy as jnp

    noise = jax.random.normal(key, mean.shape)
    pre = mean + jnp.exp(log_std) * noise
    log_prob = (-0.5 * noise**2 - log_std - 0.5 * jnp.log(2 * jnp.pi)).sum(-1)
    log_prob -= (2.0 * (jnp.log(2.0) - pre - jax.nn.softplus(-2.0 * pre))).sum(-1)
    return jnp.tanh(pre), log_prob


def _make_sac(obs_dim: int, act_dim: int, hidden: tuple[int, ...], rng: np.random.Generator):
    """(params, optimizer states, jitted update, jitted sample action, jitted mean action)."""
    opt, update, sample, mean_action = _sac_functions()
    critic = _mlp_params(rng, [obs_dim + act_dim, *hidden, 1], copies=2)
    params = {"actor": _mlp_params(rng, [obs_dim, *hidden, 2 * act_dim], copies=1), "critic": critic,
              "target": [dict(layer) for layer in critic], "log_alpha": np.zeros((), np.float32)}
    opt_states = {name: opt.init(params[name]) for name in ("actor", "critic", "log_alpha")}
    return params, opt_states, update, sample, mean_action


@functools.lru_cache(maxsize=1)
def _sac_functions():
    """The jitted SAC functions, made once per process (jit caches the compilation per shape)."""
    import jax
    import jax.numpy as jnp
    import optax

    opt = optax.adam(SAC_LR)

    def step(params, opt_states, batch, key):
        k_next, k_pi = jax.random.split(key)
        alpha = jnp.exp(params["log_alpha"])
        target_entropy = -batch["action"].shape[-1]
        next_action, next_log_prob = _tanh_gaussian(*_actor(params["actor"], batch["next_obs"]), k_next)
        next_q = _twin_q(params["target"], batch["next_obs"], next_action).min(0)
        target = batch["reward"] + SAC_GAMMA * (1.0 - batch["terminated"]) * (next_q - alpha * next_log_prob)
        target = jax.lax.stop_gradient(target)

        def critic_loss(p):
            return ((_twin_q(p, batch["obs"], batch["action"]) - target) ** 2).mean(1).sum()

        def actor_loss(p):
            action, log_prob = _tanh_gaussian(*_actor(p, batch["obs"]), k_pi)
            q = _twin_q(params["critic"], batch["obs"], action).min(0)
            return (alpha * log_prob - q).mean(), log_prob

        def alpha_loss(log_alpha, log_prob):
            return -(log_alpha * jax.lax.stop_gradient(log_prob + target_entropy)).mean()

        new, opt_states = dict(params), dict(opt_states)
        grads = jax.grad(critic_loss)(params["critic"])
        updates, opt_states["critic"] = opt.update(grads, opt_states["critic"])
        new["critic"] = optax.apply_updates(params["critic"], updates)
        grads, log_prob = jax.grad(actor_loss, has_aux=True)(params["actor"])
        updates, opt_states["actor"] = opt.update(grads, opt_states["actor"])
        new["actor"] = optax.apply_updates(params["actor"], updates)
        grads = jax.grad(alpha_loss)(params["log_alpha"], log_prob)
        updates, opt_states["log_alpha"] = opt.update(grads, opt_states["log_alpha"])
        new["log_alpha"] = optax.apply_updates(params["log_alpha"], updates)
        new["target"] = optax.incremental_update(new["critic"], params["target"], SAC_TAU)
        return new, opt_states

    def sample(actor_params, obs, key):
        return _tanh_gaussian(*_actor(actor_params, obs), key)[0]

    def mean_action(actor_params, obs):
        return jnp.tanh(_actor(actor_params, obs)[0])

    return opt, jax.jit(step), jax.jit(sample), jax.jit(mean_action)


class _Replay:
    """Host-side replay buffer of float32 transitions that grows as needed."""

    def __init__(self, obs_dim: int, act_dim: int, capacity: int = 65_536):
        self.size = 0
        self.data = {"obs": np.zeros((capacity, obs_dim), np.float32),
                     "action": np.zeros((capacity, act_dim), np.float32),
                     "reward": np.zeros(capacity, np.float32),
                     "next_obs": np.zeros((capacity, obs_dim), np.float32),
                     "terminated": np.zeros(capacity, np.float32)}

    def add(self, **row) -> None:
        if self.size == len(self.data["reward"]):
            self.data = {k: np.concatenate([v, np.zeros_like(v)]) for k, v in self.data.items()}
        for key, value in row.items():
            self.data[key][self.size] = value
        self.size += 1

    def sample(self, rng: np.random.Generator, batch_size: int) -> dict[str, np.ndarray]:
        index = rng.integers(self.size, size=batch_size)
        return {key: value[index] for key, value in self.data.items()}


def sac_until(
    env: gym.Env,
    eval_env: gym.Env,
    target_return: float,
    seed: int = 0,
    *,
    max_steps: int = SAC_MAX_STEPS,
    start_steps: int = SAC_START_STEPS,
    eval_every: int = SAC_EVAL_EVERY,
    eval_episodes: int = SAC_EVAL_EPISODES,
    hidden: tuple[int, ...] = SAC_HIDDEN,
    batch_size: int = SAC_BATCH,
) -> tuple[minari.DataCollector, list[tuple[int, float]]]:
    """Train SAC online in env, recording EVERY environment transition (the random warm-up too)
    with a Minari DataCollector, and stop at the first evaluation (every `eval_every` env steps,
    `eval_episodes` deterministic episodes of eval_env) whose mean return reaches
    `target_return`. Returns the collector (its last episode may be cut where training stopped;
    Minari marks that step truncated) and the evaluations [(env step, mean return), ...].
    Raises RuntimeError if no evaluation reaches the target within max_steps."""
    import jax

    if not isinstance(env.action_space, gym.spaces.Box) or not isinstance(env.observation_space, gym.spaces.Box):
        raise ValueError(f"{env.spec.id if env.spec else env} needs Box observation and action spaces.")
    if min(max_steps, eval_every, eval_episodes, batch_size) < 1 or start_steps < 0:
        raise ValueError("max_steps, eval_every, eval_episodes and batch_size must be positive.")
    data_rng, batch_rng, eval_rng = np.random.default_rng(seed).spawn(3)
    key = jax.random.PRNGKey(seed)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    params, opt_states, update, sample, mean_action = _make_sac(obs_dim, act_dim, tuple(hidden), batch_rng)
    low, high = env.action_space.low, env.action_space.high
    replay = _Replay(obs_dim, act_dim)
    collector = minari.DataCollector(env)
    evaluations: list[tuple[int, float]] = []
    try:
        obs, _ = collector.reset(seed=_draw_seed(data_rng))
        for step in range(1, max_steps + 1):
            if step <= start_steps:
                action = data_rng.uniform(-1.0, 1.0, act_dim).astype(np.float32)
            else:
                key, act_key = jax.random.split(key)
                action = np.asarray(sample(params["actor"], np.asarray(obs, np.float32)[None], act_key))[0]
            env_action = (low + (action + 1.0) * 0.5 * (high - low)).astype(env.action_space.dtype)
            next_obs, reward, terminated, truncated, _ = collector.step(env_action)
            replay.add(obs=obs, action=action, reward=reward, next_obs=next_obs, terminated=float(terminated))
            obs = next_obs
            if terminated or truncated:
                obs, _ = collector.reset(seed=_draw_seed(data_rng))
            if step >= start_steps:
                key, update_key = jax.random.split(key)
                params, opt_states = update(params, opt_states, replay.sample(batch_rng, batch_size), update_key)
            if step % eval_every == 0:
                actor_params = params["actor"]
                policy = box_policy(eval_env, lambda o: np.asarray(mean_action(actor_params, o)), eval_rng)
                evaluations.append((step, mean_return(eval_env, policy, eval_episodes, eval_rng)))
                if evaluations[-1][1] >= target_return:
                    return collector, evaluations
    except BaseException:
        collector.close()
        raise
    collector.close()
    best = max((ret for _, ret in evaluations), default=float("nan"))
    raise RuntimeError(f"SAC did not reach the target return {target_return:.1f} within {max_steps} "
                       f"steps (best evaluation {best:.1f}); no dataset written. Raise max_steps.")


def build_medium_replay(
    env_id: str,
    seed: int = 0,
    dataset_id: str | None = None,
    *,
    target_return: float | None = None,
    medium_id: str | None = None,
    ref_scores_from: str | None = None,
    overwrite: bool = False,
    exist_ok: bool = False,
    **sac_kwargs,
) -> minari.MinariDataset:
    """Our successor of D4RL's `{env}-medium-replay`: the whole replay buffer (every environment
    transition, in order) of an online SAC run (`sac_until`) stopped at its first evaluation whose
    mean return reaches the medium level.

    The medium level is `target_return` if given, else the mean episode return of Minari's
    ``mujoco/{env}/medium-v0`` (`medium_id`). Reference scores are copied from `ref_scores_from`,
    by default that same medium set when the target comes from it (none when `target_return` is
    given and `ref_scores_from` is not). The stop threshold and every evaluation are stored in
    the metadata (``stop_target_return``, ``evaluations``)."""
    envname = gym.spec(env_id).name.lower()
    dataset_id = dataset_id or successor_id(envname, "medium-replay")
    medium_id = medium_id or f"mujoco/{envname}/medium-v0"
    if target_return is None and ref_scores_from is None:
        ref_scores_from = medium_id
    root = get_dataset_path()

    def create() -> None:
        target, target_note = target_return, f"a given target return {target_return}"
        ref_min = ref_max = episodes = None
        with _datasets_root(root):
            if target is None:
                target = mean_episode_return(minari_source(
                    medium_id, env_id, f"{dataset_id} stops at the mean episode return of {medium_id} "
                    "(or pass target_return / --target-return): "))
                target_note = f"the mean episode return of {medium_id}, {target:.1f}"
            if ref_scores_from is not None:
                ref_min, ref_max, episodes = reference_scores(minari_source(
                    ref_scores_from, env_id, f"{dataset_id} copies its reference scores from {ref_scores_from}: "))
        env, eval_env = gym.make(env_id), gym.make(env_id)
        collector, evaluations = sac_until(env, eval_env, target, seed, **sac_kwargs)
        eval_env.close()
        step, reached = evaluations[-1]
        dataset = save(collector, dataset_id, eval_env, ref_min, ref_max, episodes,
                       algorithm_name="SAC (common/builders.py sac_until), every transition recorded",
                       description=(f"Replay buffer of an online SAC run in {env_id} (seed {seed}), "
                                    f"stopped at env step {step}, the first evaluation whose mean return "
                                    f"({reached:.1f}) reached {target_note}.{_not_d4rl('medium-replay', env_id)}"),
                       requirements=_requirements("gymnasium", "mujoco", "jax", "flax", "optax"))
        dataset.storage.update_metadata({"stop_target_return": float(target),
                                         "evaluations": [[int(s), float(r)] for s, r in evaluations]})

    return _staged_build(dataset_id, overwrite, create, exist_ok)


# --------------------------------------------------------------------------- shared pieces


def collect(env: gym.Env, act: Policy, num_steps: int, rng: np.random.Generator,
            record_infos: bool = False) -> minari.DataCollector:
    """Step env with act for num_steps, resetting (seeds drawn from rng) when episodes end."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be positive, got {num_steps}.")
    collector = minari.DataCollector(env, record_infos=record_infos)
    obs, _ = collector.reset(seed=_draw_seed(rng))
    for _ in range(num_steps):
        obs, _, terminated, truncated, _ = collector.step(act(obs))
        if terminated or truncated:
            obs, _ = collector.reset(seed=_draw_seed(rng))
    return collector


def mean_return(env: gym.Env, act: Policy, episodes: int, rng: np.random.Generator) -> float:
    """Mean undiscounted return of act over full episodes of env (seeds drawn from rng)."""
    returns = []
    for _ in range(episodes):
        obs, _ = env.reset(seed=_draw_seed(rng))
        total, done = 0.0, False
        while not done:
            obs, reward, terminated, truncated, _ = env.step(act(obs))
            total, done = total + float(reward), terminated or truncated
        returns.append(total)
    return float(np.mean(returns))


def save(collector: minari.DataCollector, dataset_id: str, eval_env, ref_min: float | None,
         ref_max: float | None, ref_episodes: int | None, **metadata) -> minari.MinariDataset:
    """Write the collected data as dataset_id; reference scores only when both are known."""
    refs = {}
    if ref_min is not None and ref_max is not None:
        refs = dict(ref_min_score=ref_min, ref_max_score=ref_max)
        if ref_episodes is not None:
            refs["num_episodes_average_score"] = ref_episodes
    eval_spec = eval_env.spec if isinstance(eval_env, gym.Env) else eval_env
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*author_email.*")
            return collector.create_dataset(dataset_id, eval_env=eval_spec, author=AUTHOR,
                                            code_permalink=CODE, **refs, **metadata)
    finally:
        collector.close()


def _draw_seed(rng: np.random.Generator) -> int:
    return int(rng.integers(2**31 - 1))


def _requirements(*packages: str) -> list[str]:
    return [f"{p}=={importlib.metadata.version(p)}" for p in packages]


@contextlib.contextmanager
def _datasets_root(path: Path) -> Iterator[None]:
    """Temporarily point MINARI_DATASETS_PATH at path."""
    old = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(path)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MINARI_DATASETS_PATH", None)
        else:
            os.environ["MINARI_DATASETS_PATH"] = old


def _staged_build(dataset_id: str, overwrite: bool, create: Callable[[], None],
                  exist_ok: bool = False) -> minari.MinariDataset:
    """Run create() with a hidden staging root, then move the finished dataset into place.

    An existing dataset_id raises FileExistsError, or with exist_ok is loaded instead (what a
    first-use build wants: another process may have finished the same id a moment ago)."""
    parse_dataset_id(dataset_id)  # raises on a malformed id
    root, final = get_dataset_path(), get_dataset_path(dataset_id)
    if final.exists() and not overwrite and exist_ok:
        return minari.load_dataset(dataset_id)
    if final.exists() and not overwrite:
        raise FileExistsError(
            f"Dataset {dataset_id} already exists at {final}; pass overwrite=True (--overwrite) "
            "to rebuild it, or choose another --dataset-id.")
    with _build_lock(root, dataset_id):
        if final.exists() and not overwrite:  # another process built it while we waited
            return minari.load_dataset(dataset_id)
        staging = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
        try:
            with _datasets_root(staging):
                create()
            _install(staging, root, dataset_id, overwrite)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return minari.load_dataset(dataset_id)


LOCK_DIR = ".locks"  # hidden, so Minari's listing skips it


@contextlib.contextmanager
def _build_lock(root: Path, dataset_id: str) -> Iterator[None]:
    """Hold an exclusive lock on dataset_id in this dataset root for the whole build.

    Two processes building the same id (two training runs started together, each building its
    dataset on first use) take turns: the second waits, then finds the first's finished dataset
    and uses it instead of building again. An ``fcntl.flock`` on a per-id file under
    ``root/.locks``; the OS releases it if the holder dies. The lock files are left in place
    (deleting a lock file another process may be waiting on would let a third one in).
    """
    import fcntl

    lock_dir = root / LOCK_DIR
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / (dataset_id.replace("/", "--") + ".lock"), "a") as file:
        fcntl.flock(file.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(file.fileno(), fcntl.LOCK_UN)


def _install(staging: Path, root: Path, dataset_id: str, overwrite: bool) -> None:
    """Move staging/dataset_id to root/dataset_id (replacing an old one) plus namespace files."""
    built, final, old = staging / dataset_id, root / dataset_id, staging / ".replaced"
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        if not overwrite:  # another process finished the same id meanwhile
            raise FileExistsError(f"Dataset {dataset_id} appeared at {final} during the build.")
        final.rename(old)
    try:
        built.rename(final)
    except BaseException:
        if old.exists() and not final.exists():
            old.rename(final)
        raise
    parts = dataset_id.split("/")[:-1]
    for depth in range(1, len(parts) + 1):
        namespace_file = Path(*parts[:depth], "namespace_metadata.json")
        if (staging / namespace_file).exists() and not (root / namespace_file).exists():
            shutil.copyfile(staging / namespace_file, root / namespace_file)


# --------------------------------------------------------------------------- ids


_POINTMAZE_ID = re.compile(r"local/pointmaze/(open|umaze|medium|large)(-dense)?(?:-([1-9][0-9]*)k)?-v0")
_RANDOM_ID = re.compile(r"local/([a-z0-9_]+)/random-v0")
_SUCCESSOR_ID = re.compile(r"local/([a-z0-9_]+)/ours-(random|medium-replay|medium-expert)-v0")
_SUCCESSOR_BUILDERS = {"random": lambda: build_random_successor,
                       "medium-replay": lambda: build_medium_replay,
                       "medium-expert": lambda: build_medium_expert}


def _builder(dataset_id: str) -> Callable[..., minari.MinariDataset] | None:
    """The zero-argument build for a buildable local id, else None."""
    if match := _POINTMAZE_ID.fullmatch(dataset_id):
        maze, dense = match.group(1), match.group(2) is not None
        num_steps = int(match.group(3)) * 1000 if match.group(3) else DEFAULT_POINTMAZE_STEPS
        return lambda **kw: build_pointmaze(maze, dense, num_steps, dataset_id=dataset_id, **kw)
    if (match := _RANDOM_ID.fullmatch(dataset_id)) and match.group(1) in mujoco_v5_envs():
        env_id = mujoco_v5_envs()[match.group(1)]
        return lambda **kw: build_from_policy(env_id, None, dataset_id=dataset_id, **kw)
    if (match := _SUCCESSOR_ID.fullmatch(dataset_id)) and match.group(1) in mujoco_v5_envs():
        env_id, builder = mujoco_v5_envs()[match.group(1)], _SUCCESSOR_BUILDERS[match.group(2)]()
        return lambda **kw: builder(env_id, dataset_id=dataset_id, **kw)
    return None


def is_buildable(dataset_id: str) -> bool:
    """Whether build() knows how to make this local dataset id."""
    return _builder(dataset_id) is not None


def build(dataset_id: str, *, overwrite: bool = False) -> minari.MinariDataset:
    """Build a buildable local id (see BUILDABLE_PATTERNS) with the default size and seed 0."""
    builder = _builder(dataset_id)
    if builder is None:
        patterns = "\n  ".join(BUILDABLE_PATTERNS)
        raise ValueError(f"Cannot build dataset {dataset_id!r}. Buildable ids:\n  {patterns}\n"
                         "Other data: python benchmarks/build_dataset.py policy --help")
    return builder(overwrite=overwrite, exist_ok=not overwrite)
