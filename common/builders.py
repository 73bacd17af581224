"""Build real Minari datasets locally, by simulation (the command line is benchmarks/build_dataset.py).

Two kinds of dataset, both written into Minari's local dataset directory
(``minari.storage.get_dataset_path``, which respects ``MINARI_DATASETS_PATH``) so that
``minari.load_dataset(dataset_id)`` finds them. Nothing is downloaded and nothing is faked:
every transition comes from stepping the environment.

PointMaze (``local/pointmaze/{open,umaze,medium,large}[-dense]-v0``)
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
``FileExistsError`` unless ``overwrite=True``. One seed drives everything (env reset seeds,
action noise, waypoint jitter, the random policy, the reference episodes): the same seed gives
the same dataset.

Usage::

    python benchmarks/build_dataset.py pointmaze --maze umaze --dense --num-steps 100000
    python benchmarks/build_dataset.py policy --env Hopper-v5 --policy random --num-steps 50000
    python benchmarks/build_dataset.py policy --env Hopper-v5 --policy runs/rlpd__... --name rlpd
"""

from __future__ import annotations

import collections
import contextlib
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
    "local/{envname}/random-v0  (envname: a Gymnasium MuJoCo v5 env lower-cased, e.g. hopper,"
    " halfcheetah, walker2d, ant, invertedpendulum)",
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

    return _staged_build(dataset_id, overwrite, create)


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
    ref_max_score: float | None = None,
    ref_episodes: int = REF_EPISODES,
) -> minari.MinariDataset:
    """Build a dataset of a Gymnasium MuJoCo env stepped by a uniform random policy (`policy`
    None) or by `policy`, a batch policy (n, obs_dim) -> (n, act_dim) in [-1, 1] (e.g. a
    training script's `load_policy(run_dir)`); `name` names its dataset and its source."""
    spec = gym.spec(env_id)  # raises a clear error for an unknown env id
    kind = "random" if policy is None else name
    dataset_id = dataset_id or f"local/{spec.name.lower()}/{kind}-v0"
    data_rng, ref_rng = np.random.default_rng(seed).spawn(2)
    unit = policy

    def create() -> None:
        env, eval_env = gym.make(env_id), gym.make(env_id)
        if not isinstance(env.observation_space, gym.spaces.Box) or not isinstance(
                env.action_space, gym.spaces.Box):
            raise ValueError(f"{env_id} needs Box observation and action spaces.")
        act = (uniform_policy(env, data_rng) if unit is None
               else box_policy(env, unit, data_rng, noise))
        collector = collect(env, act, num_steps, data_rng)
        ref_min = None
        if ref_max_score is not None:
            ref_min = mean_return(eval_env, uniform_policy(eval_env, ref_rng), ref_episodes,
                                  ref_rng)
        eval_env.close()
        source = "uniform random policy" if unit is None else f"policy {name}"
        if unit is not None and noise > 0:
            source += f", action noise std {noise}"
        save(collector, dataset_id, eval_env, ref_min, ref_max_score, ref_episodes,
             algorithm_name=source, description=f"{env_id} stepped by a {source}; seed {seed}.",
             requirements=_requirements("gymnasium", "mujoco"))

    return _staged_build(dataset_id, overwrite, create)


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
         ref_max: float | None, ref_episodes: int, **metadata) -> None:
    """Write the collected data as dataset_id; reference scores only when both are known."""
    refs = {}
    if ref_min is not None and ref_max is not None:
        refs = dict(ref_min_score=ref_min, ref_max_score=ref_max,
                    num_episodes_average_score=ref_episodes)
    eval_spec = eval_env.spec if isinstance(eval_env, gym.Env) else eval_env
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*author_email.*")
            collector.create_dataset(dataset_id, eval_env=eval_spec, author=AUTHOR,
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


def _staged_build(dataset_id: str, overwrite: bool,
                  create: Callable[[], None]) -> minari.MinariDataset:
    """Run create() with a hidden staging root, then move the finished dataset into place."""
    parse_dataset_id(dataset_id)  # raises on a malformed id
    root, final = get_dataset_path(), get_dataset_path(dataset_id)
    if final.exists() and not overwrite:
        raise FileExistsError(
            f"Dataset {dataset_id} already exists at {final}; pass overwrite=True (--overwrite) "
            "to rebuild it, or choose another --dataset-id.")
    staging = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
    try:
        with _datasets_root(staging):
            create()
        _install(staging, root, dataset_id, overwrite)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return minari.load_dataset(dataset_id)


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


_POINTMAZE_ID = re.compile(r"local/pointmaze/(open|umaze|medium|large)(-dense)?-v0")
_RANDOM_ID = re.compile(r"local/([a-z0-9_]+)/random-v0")


def _builder(dataset_id: str) -> Callable[..., minari.MinariDataset] | None:
    """The zero-argument build for a buildable local id, else None."""
    if match := _POINTMAZE_ID.fullmatch(dataset_id):
        maze, dense = match.group(1), match.group(2) is not None
        return lambda **kw: build_pointmaze(maze, dense, dataset_id=dataset_id, **kw)
    if (match := _RANDOM_ID.fullmatch(dataset_id)) and match.group(1) in mujoco_v5_envs():
        env_id = mujoco_v5_envs()[match.group(1)]
        return lambda **kw: build_from_policy(env_id, None, dataset_id=dataset_id, **kw)
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
    return builder(overwrite=overwrite)
