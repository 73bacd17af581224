"""From an `--env` name to flat transitions, the right environments and a scoring rule.

Names (`resolve`):
  * D4RL-style names, e.g. `antmaze-large-diverse`, `hopper-medium`, `pen-human`, `kitchen-mixed`,
    `pointmaze-umaze-dense`; a trailing D4RL version (`-v0`, `-v2`) is ignored. Short forms:
    `antmaze-medium` = `antmaze-medium-diverse`, `antmaze-large` = `antmaze-large-diverse`.
    `ALIASES` holds every name and its Minari id.
  * Minari ids, e.g. `D4RL/antmaze/large-diverse-v1`, `mujoco/hopper/medium-v0`.
  * Local datasets: any id in Minari's local folder (`minari list local`), including the
    `local/...` ids that `common/builders.py` (`benchmarks/build_dataset.py`) makes; a buildable `local/...` id that is
    missing is built on first use.
  * A registered Gymnasium env id (`Hopper-v5`) for online-only runs, with no dataset.

Missing datasets are downloaded by Minari. Without a network the download is not attempted
(Minari would retry for ~25 s): `load_dataset` raises one UserError naming the dataset, where it
was looked for and the command that fetches it.

Observations: dict observations are flattened by `flatten_observation` in the order of
`OBSERVATION_KEYS[domain]` (nested dicts, e.g. Kitchen's goals, in sorted key order):
  * antmaze: achieved_goal (x, y) then observation -> D4RL's 29-dim AntMaze observation
    (the goal cell is fixed per maze, as in D4RL, so the goal is not appended);
  * pointmaze: observation then desired_goal (the goal is re-drawn during data collection, so
    the policy must see it; achieved_goal repeats observation[:2] and is left out);
  * kitchen: observation only (robot and object state; the task set is fixed per dataset);
  * anything else: every key in sorted order.

AntMaze labels, as D4RL made them (scripts/generation/relabel_antmaze_rewards.py): D4RL's data
was collected by a waypoint controller commanded to changing goals, then EVERY transition was
relabelled against the maze's evaluation goal: reward = terminal = 1 exactly when the NEXT xy
position is within 0.5 of it, else 0. Minari's D4RL/antmaze sets were collected the same way,
but their stored rewards are 1 within 0.45 of each episode's OWN commanded goal (`desired_goal`,
usually elsewhere in the maze; the 29-dim observation holds no goal), so they are ignored:
`dataset_transitions` (via `antmaze_goal` and `relabel_antmaze`) recomputes
reward = terminal = [||next achieved_goal - g|| <= 0.5] on every transition, nothing is cut or
dropped, a trajectory may hold several terminals, and time limits stay truncations. The
labelling goal g is the centre of the `g` cell of the dataset's EVALUATION-env maze map (Minari's
`eval_env_spec`), converted by that maze's own `cell_rowcol_to_xy`. D4RL labelled against one
random draw of its noisy goal (the goal cell's centre plus an offset of 0 to 1.5 in each of x and
y, U(0, 1) + U(0, 0.5): locomotion/maze_env.py `goal_sampler`); no such draw belongs to Minari's
data, and the cell centre is the neutral choice.

AntMaze evaluation, as D4RL v2's eval env (ant.py `v2_resets`, goal_reaching_env.py eval=True):
the env keeps Gymnasium-Robotics' own goal draw at every reset (uniform +-1.0 around the goal
cell's centre: position_noise_range 0.25 x maze_size_scaling 4), made as a continuing task that
keeps its goal, and `AntMazeSuccess` judges success at 0.5 (Gymnasium-Robotics' own rule is 0.45):
reward 1 and the episode ends at success, reward 0 otherwise. Online training episodes use the
same env. AntMaze is scored by success (`Scoring.by_success`), D4RL's normalized score.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import difflib
import io
import os
import re
import socket
from typing import Any, Mapping

import gymnasium as gym
import numpy as np

from common.cli import UserError

DOMAINS = ("antmaze", "pointmaze", "adroit", "kitchen", "locomotion")

OBSERVATION_KEYS: dict[str, tuple[str, ...]] = {
    "antmaze": ("achieved_goal", "observation"),
    "pointmaze": ("observation", "desired_goal"),
    "kitchen": ("observation",),
}

_ANTMAZE = ["umaze", "umaze-diverse", "medium-play", "medium-diverse", "large-play", "large-diverse"]
_ADROIT = [f"{task}-{kind}" for task in ("pen", "door", "hammer", "relocate") for kind in ("human", "cloned", "expert")]
_POINTMAZE = [f"{maze}{dense}" for maze in ("open", "umaze", "medium", "large") for dense in ("", "-dense")]
_MUJOCO = ["halfcheetah", "hopper", "walker2d", "ant", "humanoid", "humanoidstandup", "invertedpendulum",
           "inverteddoublependulum", "pusher", "reacher", "swimmer"]

ALIASES: dict[str, str] = {
    **{f"antmaze-{name}": f"D4RL/antmaze/{name}-v1" for name in _ANTMAZE},
    "antmaze-medium": "D4RL/antmaze/medium-diverse-v1",
    "antmaze-large": "D4RL/antmaze/large-diverse-v1",
    **{name: f"D4RL/{name.replace('-', '/')}-v2" for name in _ADROIT},
    **{f"kitchen-{kind}": f"D4RL/kitchen/{kind}-v2" for kind in ("complete", "partial", "mixed")},
    **{f"pointmaze-{name}": f"D4RL/pointmaze/{name}-v2" for name in _POINTMAZE},
    **{f"{env}-{kind}": f"mujoco/{env}/{kind}-v0" for env in _MUJOCO for kind in ("simple", "medium", "expert")},
}

_NOT_IN_MINARI = ("random", "medium-replay", "medium-expert", "full-replay", "binary")
_MINARI_ID = re.compile(r"^[\w.-]+(/[\w.-]+)*-v\d+$")


@dataclasses.dataclass(frozen=True)
class Task:
    """What an `--env` name stands for."""

    name: str  # as the user typed it
    dataset_id: str | None  # Minari id, or None for an online-only Gymnasium env
    env_id: str | None  # Gymnasium id for online-only runs; datasets carry their own env spec
    domain: str

    @property
    def sparse_reward(self) -> bool:
        """Reward 1 at the goal and 0 elsewhere: AntMaze and the sparse PointMaze sets."""
        dense = "dense" in str(self.dataset_id or self.env_id).lower()
        return self.domain == "antmaze" or (self.domain == "pointmaze" and not dense)


def detect_domain(identifier: str) -> str:
    """The domain of a dataset or env id; it selects presets and reward transforms."""
    lowered = identifier.lower()
    if "antmaze" in lowered:
        return "antmaze"
    if "pointmaze" in lowered:
        return "pointmaze"
    if "kitchen" in lowered:
        return "kitchen"
    if "adroit" in lowered or re.search(r"(^|/)(pen|door|hammer|relocate)\b", lowered):
        return "adroit"
    return "locomotion"


def resolve(name: str) -> Task:
    """Resolve an `--env` name; raise UserError listing the closest names when it is unknown."""
    register_robotics_envs()
    if _is_local(name) or _buildable(name) or (_MINARI_ID.match(name) and "/" in name):
        return Task(name, name, None, detect_domain(name))
    short = re.sub(r"-v\d+$", "", name)
    if short in ALIASES:
        return Task(name, ALIASES[short], None, detect_domain(ALIASES[short]))
    if name in gym.registry and _runs_here(name):
        return Task(name, None, name, detect_domain(name))
    raise UserError(_unknown_name_message(name, short))


def _runs_here(env_id: str) -> bool:
    """False for registered ids this stack cannot make: the MuJoCo v2/v3 envs (they need the
    retired mujoco_py) and the shims for old Gym."""
    entry_point = gym.registry[env_id].entry_point
    return isinstance(entry_point, str) and not entry_point.startswith(
        ("gymnasium_robotics.envs.mujoco.", "shimmy.")) and "MujocoPy" not in entry_point


def _unknown_name_message(name: str, short: str) -> str:
    message = f"unknown --env {name!r}."
    if name in gym.registry:
        message = f"--env {name} needs mujoco_py (MuJoCo envs before v4), which does not run on MuJoCo 3."
    if any(short.endswith(kind) for kind in _NOT_IN_MINARI):
        message += " Minari has no D4RL random / medium-replay / medium-expert / binary datasets."
    candidates = [*ALIASES, *_local_ids(), *(env_id for env_id in gym.registry if _runs_here(env_id))]
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.5)
    if close:
        message += " Closest names: " + ", ".join(close) + "."
    return message + " See docs/datasets.md, or `minari list local`."


def _local_ids() -> list[str]:
    import minari

    return list(minari.list_local_datasets())


def _dataset_path(dataset_id: str) -> str:
    from minari.storage import get_dataset_path

    return str(get_dataset_path(dataset_id))


def _is_local(dataset_id: str) -> bool:
    return "/" in dataset_id and os.path.isdir(os.path.join(_dataset_path(dataset_id), "data"))


def _buildable(dataset_id: str) -> bool:
    return dataset_id.startswith("local/") and _builder().is_buildable(dataset_id)


def _builder():
    """common.builders: the simulators that build `local/...` datasets."""
    from common import builders

    return builders


def _remote_host() -> str:
    remote = os.environ.get("MINARI_REMOTE", "hf://farama-minari")
    return "storage.googleapis.com" if remote.startswith("gcp://") else "huggingface.co"


_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def _can_reach(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    """Whether a download could start: a TCP connection to `host` within `timeout` seconds.

    Behind a proxy a direct connection proves nothing, so Minari is left to try.
    """
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "false", ""):
        return False
    if any(os.environ.get(name) for name in _PROXY_VARIABLES):
        return True

    def connect():
        socket.create_connection((host, port), timeout=timeout).close()

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)  # bounds the DNS look-up too
    try:
        pool.submit(connect).result(timeout=timeout)
        return True
    except (OSError, concurrent.futures.TimeoutError):
        return False
    finally:
        pool.shutdown(wait=False)


def load_dataset(task: Task):
    """The Minari dataset of `task`: local, built on first use (local/ ids) or downloaded."""
    import minari

    dataset_id = task.dataset_id
    assert dataset_id is not None, "online-only tasks have no dataset"
    path = _dataset_path(dataset_id)
    if _is_local(dataset_id):
        return minari.load_dataset(dataset_id)
    if dataset_id.startswith("local/"):
        if not _buildable(dataset_id):
            known = "it builds: " + ", ".join(_builder().BUILDABLE_PATTERNS)
            raise UserError(f"local dataset {dataset_id!r} was not found at {path}, and "
                            f"common/builders.py cannot build it ({known}).")
        print(f"Building local dataset {dataset_id} at {path} by simulation (first use; cached afterwards).")
        return _builder().build(dataset_id)
    host = _remote_host()
    if not _can_reach(host):
        raise UserError(
            f"dataset {dataset_id!r} (from --env {task.name}) is not on this machine and cannot be "
            f"downloaded: no connection to {host}.\n  Looked for it in: {path}\n"
            f"  On a connected machine run:  minari download {dataset_id}\n"
            f"  then copy ~/.minari/datasets/{dataset_id} to {path} "
            f"(or set MINARI_DATASETS_PATH to a folder that holds it).{_closest_known_ids(dataset_id)}")
    print(f"Downloading {dataset_id} with Minari into {path} ...")
    try:
        return minari.load_dataset(dataset_id, download=True)
    except ValueError as error:  # Minari's answer for ids it does not host
        raise UserError(f"Minari could not download {dataset_id!r}: {error}") from None


def _closest_known_ids(dataset_id: str) -> str:
    """A hint for a Minari id that is not one of the known D4RL successors (a typo, say)."""
    known = sorted(set(ALIASES.values()))
    if dataset_id in known:
        return ""
    close = difflib.get_close_matches(dataset_id, known, n=3, cutoff=0.6)
    return ("\n  Is the id right? Closest known ids: " + ", ".join(close)) if close else ""


# --------------------------------------------------------------------------------------------
# Observations and transitions


def flatten_observation(observation: Any, domain: str) -> np.ndarray:
    """A flat float32 array (or a batch of them) from a Box or dict observation; see module doc."""
    if not isinstance(observation, Mapping):
        return np.asarray(observation, dtype=np.float32)
    keys = OBSERVATION_KEYS.get(domain, tuple(sorted(observation)))
    parts = [_flatten_nested(observation[key]) for key in keys]
    return np.concatenate(parts, axis=-1).astype(np.float32)


def _flatten_nested(value: Any) -> np.ndarray:
    if isinstance(value, Mapping):
        return np.concatenate([_flatten_nested(value[key]) for key in sorted(value)], axis=-1)
    return np.asarray(value, dtype=np.float32)


ANTMAZE_GOAL_RADIUS = 0.5  # D4RL's AntMaze success distance, for labels and evaluation alike


def antmaze_goal(dataset) -> np.ndarray:
    """The AntMaze labelling goal: the centre of the `g` cell of the dataset's evaluation-env maze
    map, converted by that maze's own `cell_rowcol_to_xy` (see the module docstring)."""
    register_robotics_envs()
    env = dataset.recover_environment(eval_env=True)
    try:
        maze = getattr(env.unwrapped, "maze", None)
        if maze is None:
            raise UserError(f"dataset {dataset.spec.dataset_id!r}: its evaluation env has no maze, so the "
                            "AntMaze labelling goal cannot be read from it.")
        cells = [(row, col) for row, line in enumerate(maze.maze_map) for col, cell in enumerate(line)
                 if cell == "g"]
        if len(cells) != 1:
            raise UserError(f"dataset {dataset.spec.dataset_id!r}: the maze map of its evaluation env has "
                            f"{len(cells)} goal cells ('g'), so there is no single AntMaze labelling goal; "
                            "it needs exactly one, as the D4RL/antmaze evaluation maps have.")
        return np.asarray(maze.cell_rowcol_to_xy(np.array(cells[0])), dtype=np.float64)
    finally:
        env.close()


def relabel_antmaze(next_achieved_goals: np.ndarray, goal: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """D4RL's AntMaze labels for one episode: (rewards, terminated), both 1 exactly where the NEXT
    xy position (`achieved_goal` after the step) is within `ANTMAZE_GOAL_RADIUS` of `goal`."""
    distance = np.linalg.norm(np.asarray(next_achieved_goals, np.float64) - np.asarray(goal, np.float64), axis=-1)
    reached = distance <= ANTMAZE_GOAL_RADIUS
    return reached.astype(np.float32), reached


def dataset_transitions(dataset, domain: str) -> dict[str, np.ndarray]:
    """Flat transitions of a Minari dataset (`episodes_to_transitions`); AntMaze episodes are
    relabelled against the dataset's own labelling goal (`antmaze_goal`)."""
    goal = antmaze_goal(dataset) if domain == "antmaze" else None
    return episodes_to_transitions(dataset.iterate_episodes(), domain, goal)


def episodes_to_transitions(episodes, domain: str, goal: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Flat transitions from Minari episodes.

    Keys: observations, actions, rewards, next_observations, terminated, truncated (bool),
    episode_ends (bool: the last step of each episode; also true where an episode stops without
    terminating or truncating, e.g. a cut recording). Every step of every episode is kept.
    AntMaze (`domain == "antmaze"`) needs `goal`, the labelling goal (`antmaze_goal`): its rewards
    and terminals are `relabel_antmaze`'s, Minari's own reward column is ignored.
    """
    if domain == "antmaze" and goal is None:
        raise ValueError("AntMaze transitions are relabelled against the dataset's goal: call "
                         "dataset_transitions(dataset, domain), or pass goal=antmaze_goal(dataset).")
    columns: dict[str, list[np.ndarray]] = {key: [] for key in (
        "observations", "actions", "rewards", "next_observations", "terminated", "truncated", "episode_ends")}
    for episode in episodes:
        rewards = np.asarray(episode.rewards, dtype=np.float32)
        terminations = np.asarray(episode.terminations, dtype=bool)
        truncations = np.asarray(episode.truncations, dtype=bool)
        length = len(rewards)
        if length == 0:
            continue
        if domain == "antmaze":
            rewards, terminations = relabel_antmaze(np.asarray(episode.observations["achieved_goal"])[1:], goal)
        observations = flatten_observation(episode.observations, domain)
        ends = np.zeros(length, dtype=bool)
        ends[-1] = True
        columns["observations"].append(observations[:length])
        columns["next_observations"].append(observations[1:length + 1])
        columns["actions"].append(np.asarray(episode.actions, dtype=np.float32)[:length])
        columns["rewards"].append(rewards[:length])
        columns["terminated"].append(terminations[:length])
        columns["truncated"].append(truncations[:length])
        columns["episode_ends"].append(ends)
    if not columns["rewards"]:
        raise UserError("the dataset holds no transitions.")
    return {key: np.concatenate(value) for key, value in columns.items()}


def trajectory_ends(terminated: np.ndarray, episode_ends: np.ndarray, observations: np.ndarray | None = None,
                    next_observations: np.ndarray | None = None, tolerance: float = 1e-6) -> np.ndarray:
    """Where a trajectory stops: a terminal, an episode end (timeouts included), or a step whose
    next observation is not the following step's observation (datasets without end markers)."""
    ends = np.asarray(terminated, bool) | np.asarray(episode_ends, bool)
    if observations is not None and next_observations is not None and len(ends) > 1:
        jump = np.linalg.norm(next_observations[:-1] - observations[1:], axis=-1) > tolerance
        ends[:-1] |= jump
    ends[-1] = True
    return ends


def returns_to_go(rewards: np.ndarray, ends: np.ndarray, discount: float, failure_reward: float | None = None,
                  terminated: np.ndarray | None = None, infinite_horizon: bool = False) -> np.ndarray:
    """Monte-Carlo discounted return from every step to the end of its trajectory (Cal-QL).

    Trajectories stop where `ends` is true (see `trajectory_ends`); by default nothing is
    bootstrapped past a trajectory's last step, whether it terminated or timed out. With
    `failure_reward` set (sparse-reward tasks), a trajectory whose every reward equals it never
    succeeded and every step gets failure_reward / (1 - discount), the value of failing forever,
    instead of a return that would shrink towards 0 near its (arbitrary) time limit. With
    `infinite_horizon` (Cal-QL's Kitchen rule), a trajectory that did not terminate is taken to
    keep its last reward forever after its end.
    """
    rewards = np.asarray(rewards, np.float64)
    ends = np.asarray(ends, bool)
    returns = np.zeros(len(rewards), np.float64)
    starts = np.concatenate([[0], np.flatnonzero(ends[:-1]) + 1])
    stops = np.flatnonzero(ends) + 1
    for start, stop in zip(starts, stops):
        segment = rewards[start:stop]
        if failure_reward is not None and np.all(segment == failure_reward):
            returns[start:stop] = failure_reward / (1.0 - discount)
            continue
        following = 0.0
        if infinite_horizon and not (terminated is not None and terminated[stop - 1]):
            following = rewards[stop - 1] / (1.0 - discount)
        for i in range(stop - 1, start - 1, -1):
            following = rewards[i] + discount * following
            returns[i] = following
    return returns.astype(np.float32)


# --------------------------------------------------------------------------------------------
# Environments and scoring


@dataclasses.dataclass(frozen=True)
class Scoring:
    """Turns episode returns / successes into D4RL's normalized score (x100)."""

    ref_min: float | None = None
    ref_max: float | None = None
    by_success: bool = False  # AntMaze: D4RL's score is the success rate

    def normalized(self, returns: np.ndarray, successes: np.ndarray) -> float | None:
        if self.by_success:
            return 100.0 * float(np.mean(successes))
        if self.ref_min is None or self.ref_max is None:
            return None
        return 100.0 * float(np.mean((returns - self.ref_min) / (self.ref_max - self.ref_min)))


def scoring_for(dataset, domain: str) -> Scoring:
    """Reference scores from the dataset's metadata; none are invented when absent."""
    if domain == "antmaze":
        return Scoring(by_success=True)
    if dataset is None:
        return Scoring()
    metadata = dataset.storage.metadata
    ref_min, ref_max = metadata.get("ref_min_score"), metadata.get("ref_max_score")
    if ref_min is None or ref_max is None:
        return Scoring()
    return Scoring(float(ref_min), float(ref_max))


def env_factory(task: Task, dataset=None):
    """A function that makes one fresh, flat-observation, [-1, 1]-action env for `task`
    (`make(render_mode="rgb_array")` for the env an evaluation records).

    Datasets supply their evaluation env (Minari's `eval_env`, else the collection env); it is
    used for online training too, since it defines the task being scored. AntMaze envs are made
    as continuing tasks that keep their goal (so Gymnasium-Robotics neither ends the episode nor
    moves the goal at its own 0.45) and wrapped in `AntMazeSuccess`, which judges at 0.5.
    """
    antmaze = task.domain == "antmaze"
    overrides = {"continuing_task": True, "reset_target": False} if antmaze else {}

    def make(render_mode: str | None = None):
        register_robotics_envs()
        kwargs = {**overrides, **({} if render_mode is None else {"render_mode": render_mode})}
        try:
            if dataset is not None:
                env = dataset.recover_environment(eval_env=True, **kwargs)
            else:
                env = gym.make(task.env_id, **kwargs)
        except gym.error.DependencyNotInstalled as error:
            raise UserError(f"the environment of --env {task.name} cannot be made here: {error.args[0]}") from None
        return FlatEnv(AntMazeSuccess(env) if antmaze else env, task.domain)

    return make


class AntMazeSuccess(gym.Wrapper):
    """D4RL's AntMaze evaluation rule on a Gymnasium-Robotics AntMaze (dict observations).

    Success is `||achieved_goal - desired_goal|| <= ANTMAZE_GOAL_RADIUS` (0.5, D4RL's
    goal_reaching_env.py with eval=True; Gymnasium-Robotics uses 0.45): it sets info["success"],
    the reward (1.0 at success, else 0.0, as the relabelled data) and ends the episode. The goal is
    the env's own, drawn at every reset near the goal cell. Time limits stay truncations.
    """

    def _success(self, observation) -> bool:
        distance = np.linalg.norm(np.asarray(observation["achieved_goal"]) - np.asarray(observation["desired_goal"]))
        return bool(distance <= ANTMAZE_GOAL_RADIUS)

    def reset(self, **kwargs):
        observation, info = self.env.reset(**kwargs)
        info["success"] = self._success(observation)
        return observation, info

    def step(self, action):
        observation, _, terminated, truncated, info = self.env.step(action)
        success = self._success(observation)
        info["success"] = success
        return observation, float(success), bool(terminated or success), truncated, info


def register_robotics_envs() -> None:
    """Register Gymnasium-Robotics' envs (mazes, Adroit, Kitchen), quietly.

    Its first import prints a release notice about Adroit v1 rewards to stderr on every run,
    which would read like a problem with the user's run; it is kept out of the output.
    """
    with contextlib.redirect_stderr(io.StringIO()):
        import gymnasium_robotics

    gym.register_envs(gymnasium_robotics)


class FlatEnv(gym.Wrapper):
    """Flattens dict observations (see `flatten_observation`) and rescales actions from [-1, 1]."""

    def __init__(self, env: gym.Env, domain: str):
        super().__init__(env)
        self.domain = domain
        low, high = env.action_space.low, env.action_space.high
        self._low, self._scale = low, (high - low) / 2.0
        self.action_space = gym.spaces.Box(-1.0, 1.0, low.shape, np.float32)
        example = flatten_observation(env.observation_space.sample(), domain)
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, example.shape, np.float32)

    def reset(self, **kwargs):
        observation, info = self.env.reset(**kwargs)
        return flatten_observation(observation, self.domain), info

    def step(self, action):
        action = self._low + (np.clip(action, -1.0, 1.0) + 1.0) * self._scale
        observation, reward, terminated, truncated, info = self.env.step(action)
        return flatten_observation(observation, self.domain), float(reward), terminated, truncated, info


def clip_actions(actions: np.ndarray, env_space: gym.spaces.Box) -> np.ndarray:
    """Dataset actions mapped to [-1, 1] like FlatEnv's, then clipped to +-(1 - 1e-5) for log-probs."""
    low, high = env_space.low, env_space.high
    scaled = 2.0 * (actions - low) / (high - low) - 1.0
    return np.clip(scaled, -1.0 + 1e-5, 1.0 - 1e-5).astype(np.float32)
