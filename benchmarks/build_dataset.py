"""Build real Minari datasets locally, by simulation: the command line of `common/builders.py`
(whose docstring describes each recipe, its reference scores, sizes and costs).

Usage::

    python benchmarks/build_dataset.py pointmaze --maze umaze --dense --num-steps 100000
    python benchmarks/build_dataset.py policy --env Hopper-v5 --policy random --num-steps 50000
    python benchmarks/build_dataset.py policy --env Hopper-v5 --policy runs/rlpd__... --name rlpd
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Callable, Literal, Union

import gymnasium as gym
import numpy as np

if __package__ in (None, ""):  # run as `python benchmarks/build_dataset.py`: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import builders  # noqa: E402
from common.builders import (  # noqa: E402
    BUILDABLE_PATTERNS, DEFAULT_POINTMAZE_STEPS, DEFAULT_POLICY_STEPS, REF_EPISODES, build, build_pointmaze,
    is_buildable)

__all__ = ["BUILDABLE_PATTERNS", "build", "build_from_policy", "build_pointmaze", "is_buildable", "cli"]


def build_from_policy(env_id: str, policy: str = "random", *args, **kwargs):
    """common.builders.build_from_policy with `policy` given as "random" or a run folder."""
    unit = None if policy == "random" else load_checkpoint_policy(policy, env_id)
    return builders.build_from_policy(env_id, unit, *args, **kwargs)


def load_checkpoint_policy(run_dir: str, env_id: str) -> Callable[[np.ndarray], np.ndarray]:
    """The batch policy of a run (algorithms.{config['algorithm']}.load_policy), after checking
    that its observation and action sizes are those of `env_id`."""
    config_path = Path(run_dir) / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"No config.json in {run_dir!r}: pass --policy random or a run directory.")
    config = json.loads(config_path.read_text())
    algorithm = config.get("algorithm")
    if not algorithm:
        raise ValueError(f"{config_path} has no 'algorithm' key; cannot load the policy.")
    env = gym.make(env_id)
    sizes = {"observation": env.observation_space.shape[0], "action": env.action_space.shape[0]}
    env.close()
    for kind, size in sizes.items():
        trained = config.get(f"{kind}_dim")  # written by every training script
        if trained is not None and trained != size:
            raise ValueError(f"the policy in {run_dir} was trained on {config.get('env')} with {kind}s of size "
                             f"{trained}, but {env_id} has {kind}s of size {size}: pass a run of {env_id}.")
    return importlib.import_module(f"algorithms.{algorithm}").load_policy(str(run_dir))


@dataclasses.dataclass
class PointMazeArgs:
    """Build a PointMaze dataset with Minari's planner + noisy PD controller recipe."""

    maze: Literal["open", "umaze", "medium", "large"] = "umaze"
    """maze layout"""
    dense: bool = False
    """dense reward exp(-distance) instead of sparse 1-within-0.45"""
    num_steps: int = DEFAULT_POINTMAZE_STEPS
    """number of environment steps to record"""
    seed: int = 0
    """one seed for env resets, action noise and waypoint jitter"""
    dataset_id: str | None = None
    """dataset id (default local/pointmaze/{maze}[-dense]-v0)"""
    ref_episodes: int = REF_EPISODES
    """episodes averaged for each reference score"""
    overwrite: bool = False
    """replace an existing dataset with the same id"""


@dataclasses.dataclass
class PolicyArgs:
    """Build a Gymnasium MuJoCo dataset from a random policy or a saved policy checkpoint."""

    env: str = "Hopper-v5"
    """Gymnasium MuJoCo environment id"""
    policy: str = "random"
    """'random' or a run directory holding config.json and a checkpoint"""
    num_steps: int = DEFAULT_POLICY_STEPS
    """number of environment steps to record"""
    seed: int = 0
    """one seed for env resets, random actions and action noise"""
    dataset_id: str | None = None
    """dataset id (default local/{envname}/random-v0 or local/{envname}/{name}-v0)"""
    name: str = "policy"
    """dataset name for a checkpoint policy"""
    noise: float = 0.0
    """std of Gaussian noise added to checkpoint actions (in [-1, 1] units)"""
    ref_max_score: float | None = None
    """expert return; when given, ref scores are stored (ref_min from a random policy)"""
    ref_episodes: int = REF_EPISODES
    """episodes averaged for the random-policy reference score"""
    overwrite: bool = False
    """replace an existing dataset with the same id"""


def main(args: PointMazeArgs | PolicyArgs):
    start = time.perf_counter()
    if isinstance(args, PointMazeArgs):
        dataset = build_pointmaze(args.maze, args.dense, args.num_steps, args.seed,
                                  args.dataset_id, overwrite=args.overwrite,
                                  ref_episodes=args.ref_episodes)
    else:
        dataset = build_from_policy(args.env, args.policy, args.num_steps, args.seed,
                                    args.dataset_id, args.name, args.noise,
                                    overwrite=args.overwrite, ref_max_score=args.ref_max_score,
                                    ref_episodes=args.ref_episodes)
    from minari.storage import get_dataset_path

    meta = dataset.storage.metadata
    print(f"Wrote {meta['dataset_id']} to {get_dataset_path(meta['dataset_id'])}")
    print(f"  {dataset.total_steps} steps, {dataset.total_episodes} episodes, "
          f"built in {time.perf_counter() - start:.1f} s")
    if "ref_min_score" in meta:
        print(f"  ref_min_score {meta['ref_min_score']:.3f}, "
              f"ref_max_score {meta['ref_max_score']:.3f}")
    else:
        print("  no reference scores (pass --ref-max-score to store them)")
    return dataset


def cli(argv: list[str] | None = None):
    """Parse the command line (subcommands pointmaze / policy) and build."""
    import tyro

    args = tyro.cli(
        Union[  # noqa: UP007
            Annotated[PointMazeArgs, tyro.conf.subcommand("pointmaze")],
            Annotated[PolicyArgs, tyro.conf.subcommand("policy")],
        ],
        args=argv,
        description=__doc__.split("\n\n")[0].replace("`", ""),
    )
    try:
        return main(args)
    except (FileExistsError, FileNotFoundError, ValueError, gym.error.Error) as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    cli()
