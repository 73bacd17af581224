"""Shared fixtures: a tiny real PointMaze dataset and a helper to run training scripts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Small settings that keep an end-to-end run to seconds on a 2-core CPU.
TINY_RUN = ["--utd", "2", "--batch-size", "64", "--hidden-dims", "64", "64", "--start-training", "100",
            "--eval-every", "100", "--eval-episodes", "2", "--no-progress"]


@pytest.fixture(scope="session")
def minari_session_root(tmp_path_factory):
    """A Minari dataset root for the whole session, also seen by subprocesses."""
    root = tmp_path_factory.mktemp("minari")
    previous = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(root)
    yield root
    if previous is None:
        os.environ.pop("MINARI_DATASETS_PATH", None)
    else:
        os.environ["MINARI_DATASETS_PATH"] = previous


@pytest.fixture(scope="session")
def tiny_pointmaze(minari_session_root) -> str:
    """A real (simulated) 3000-step PointMaze UMaze dataset; returns its id."""
    from benchmarks.build_dataset import build_pointmaze

    dataset_id = "local/pointmaze/umaze-dense-v0"
    build_pointmaze("umaze", dense=True, num_steps=3000, seed=0, dataset_id=dataset_id, ref_episodes=5)
    return dataset_id


@pytest.fixture(scope="session")
def learning_pointmaze(minari_session_root) -> str:
    """A real 50k-step PointMaze UMaze dataset for the offline learning checks; returns its id."""
    from benchmarks.build_dataset import build_pointmaze

    dataset_id = "local/pointmaze/umaze-dense-learning-v0"
    build_pointmaze("umaze", dense=True, num_steps=50_000, seed=1, dataset_id=dataset_id, ref_episodes=5)
    return dataset_id


def random_policy_return(env_name: str, episodes: int, seed: int = 0) -> float:
    """Mean evaluation return of the uniform random policy, measured on the same evaluation envs
    (and the same reset seeds) as a training script's evaluations of `env_name`."""
    import numpy as np

    from common import datasets
    from common.evaluation import Evaluator

    task = datasets.resolve(env_name)
    dataset = datasets.load_dataset(task)
    evaluator = Evaluator(datasets.env_factory(task, dataset), episodes, datasets.Scoring())
    rng = np.random.default_rng(seed)
    action_dim = evaluator.envs[0].action_space.shape[0]
    metrics = evaluator(lambda observations: rng.uniform(-1, 1, (len(observations), action_dim)), seed)
    evaluator.close()
    return metrics["return"]


def teleport_ant_to_goal(env) -> None:
    """Put an AntMaze ant on the maze's goal: a state change inside the simulator, after which
    the env steps as usual (so the success, reward and termination are the env's own)."""
    maze, ant = env.unwrapped, env.unwrapped.ant_env
    qpos, qvel = ant.data.qpos.copy(), ant.data.qvel.copy()
    qpos[:2] = maze.goal
    ant.set_state(qpos, qvel)


def run_script(script: str, *args: str, timeout: float = 120, **popen) -> subprocess.CompletedProcess:
    """Run `python algorithms/<script> args...` from the repository root."""
    return subprocess.run([sys.executable, str(REPO / "algorithms" / script), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, **popen)
