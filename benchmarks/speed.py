"""Speed of the online update of RLPD, WSRL or Off2On: compile time, environment steps and
gradient steps per second.

Times `online_step` of algorithms/rlpd.py, the one jitted call per environment step (insert the
transition, sample G x B rows, G critic steps in a lax.scan, actor and temperature steps, next
action), at a domain preset. For comparison it also compiles the same update with the G critic
steps unrolled in Python, as the official code does (`--compare-unrolled`).

The buffers hold random numbers of the preset's shapes: timing does not depend on their values,
and no dataset is needed. Results are printed as one JSON line.

    python benchmarks/speed.py                          # AntMaze preset, E=10, G=20, B=256
    python benchmarks/speed.py --compare-unrolled
    python benchmarks/speed.py --calls 1 --min-seconds 5  # time calls for at least 5 s

`--algorithm wsrl` times algorithms/wsrl.py's `online_step` the same way (insert, a batch of
1024 split into 4 critic steps in a lax.scan, actor and temperature steps, next action) on a
freshly initialised network of WSRL's preset for the domain (10 LayerNorm critic trunks, one head),
with an online buffer and no offline data (ratio 0):

    python benchmarks/speed.py --algorithm wsrl --domain antmaze
    python benchmarks/speed.py --algorithm wsrl --domain locomotion --observation-dim 17 --action-dim 6

`--algorithm off2on` times algorithms/off2on.py's epoch, the unit its online phase works in:
`--epoch-steps` (1000) stochastic actions of the 5-member moment-matched policy (one jitted call
each), the insert of the epoch's rows at the running maximum priority, then as many updates
(sum-tree sampling, density-ratio, critic, actor and temperature steps, new priorities) in one
jitted loop; the buffer holds `--offline-rows` offline rows and a quarter-full 250k online part.
It also times the vmapped CQL pre-training of the 5 members (updates of all 5 per second):

    python benchmarks/speed.py --algorithm off2on --domain locomotion --observation-dim 17 --action-dim 6
    python benchmarks/speed.py --algorithm off2on --domain antmaze

Environment stepping is not included in any of these figures.

benchmarks/compare.py runs it to time this side of the RLPD comparison.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import jax
import numpy as np
import tyro

if __package__ in (None, ""):  # run as `python benchmarks/speed.py`: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from algorithms import off2on, rlpd, wsrl
from benchmarks.reference.timing import time_calls
from common import buffers


@dataclasses.dataclass
class SpeedArgs:
    algorithm: str = "rlpd"
    """rlpd, wsrl or off2on."""
    domain: str = "antmaze"
    """Preset to time (antmaze, locomotion, adroit)."""
    observation_dim: int = 29
    """Observation size (AntMaze: 29)."""
    action_dim: int = 8
    """Action size (AntMaze: 8)."""
    utd: int | None = None
    """G, critic steps per environment step (default: RLPD 20, WSRL 4; Off2On: its preset, not this flag)."""
    batch_size: int | None = None
    """Minibatch size B (default: RLPD 256, WSRL 1024, the batch its G steps split; Off2On: its preset)."""
    offline_rows: int = 1_000_000
    """Rows in the offline buffer (D4RL AntMaze holds 1M)."""
    calls: int = 20
    """Timed calls after the first (warm-up) call (at least this many; see --min-seconds)."""
    min_seconds: float = 0.0
    """Keep timing calls until at least this many seconds have passed (0: exactly --calls)."""
    epoch_steps: int = 1000
    """Off2On only: environment steps (and updates) per timed epoch."""
    epochs: int = 2
    """Off2On only: timed epochs after the first (warm-up) one (at least this many; see --min-seconds)."""
    pretrain_updates: int = 20
    """Off2On only: vmapped CQL pre-training updates per timed call."""
    compare_unrolled: bool = False
    """Also measure compile time with the G critic steps unrolled in Python (official code style)."""


def random_rows(rng: np.random.Generator, n: int, observation_dim: int, action_dim: int) -> dict[str, np.ndarray]:
    return {"observations": rng.normal(size=(n, observation_dim)).astype(np.float32),
            "actions": rng.uniform(-1, 1, (n, action_dim)).astype(np.float32),
            "rewards": rng.normal(size=n).astype(np.float32),
            "next_observations": rng.normal(size=(n, observation_dim)).astype(np.float32),
            "masks": np.ones(n, np.float32)}


def unrolled_update(agent, batches, config, utd):
    """The official structure: a Python loop of G critic steps, traced G times."""
    for g in range(utd):
        agent, _ = rlpd.update_critic(agent, jax.tree_util.tree_map(lambda x: x[g], batches), config)
    return rlpd.update_actor_and_temperature(agent, jax.tree_util.tree_map(lambda x: x[-1], batches), config)


def time_online_step(online_step, agent, online, offline, transition, args: SpeedArgs, utd: int) -> dict:
    """Compile `online_step` (the jitted call per environment step), then time sequential calls,
    each consuming the last one's agent and buffer as the training loop does."""
    start = time.perf_counter()
    compiled = online_step.lower(agent, online, offline, transition, transition["observations"], True).compile()
    compile_seconds = time.perf_counter() - start

    def step(state):
        agent, online, _ = state
        agent, online, action, _ = compiled(agent, online, offline, transition, transition["observations"])
        return agent, online, action

    (agent, online, _), calls, seconds = time_calls(step, (agent, online, None), jax.block_until_ready,
                                                    args.min_seconds, min_calls=args.calls)
    return {"device": jax.devices()[0].device_kind, "compile_seconds": round(compile_seconds, 2),
            "env_steps_per_second": round(calls / seconds, 2),
            "critic_steps_per_second": round(calls * utd / seconds, 1),
            "timed_calls": calls, "timed_seconds": round(seconds, 2)}, agent, online


def measure(args: SpeedArgs) -> dict:
    if args.algorithm == "wsrl":
        return measure_wsrl(args)
    if args.algorithm == "off2on":
        return measure_off2on(args)
    args = dataclasses.replace(args, utd=args.utd or 20, batch_size=args.batch_size or 256)
    train_args = rlpd.apply_preset(rlpd.Args(utd=args.utd, batch_size=args.batch_size), args.domain)
    config = rlpd.make_config(train_args, args.action_dim)
    agent = rlpd.create_agent(train_args, config, args.observation_dim, args.action_dim)
    rng = np.random.default_rng(0)
    offline = buffers.from_arrays(random_rows(rng, args.offline_rows, args.observation_dim, args.action_dim))
    online = buffers.from_arrays(random_rows(rng, 100_000, args.observation_dim, args.action_dim))
    transition = {key: value[0] for key, value in random_rows(rng, 1, args.observation_dim, args.action_dim).items()}
    online_step, _ = rlpd.make_step_functions(train_args, config)
    timing, agent, online = time_online_step(online_step, agent, online, offline, transition, args, args.utd)
    result = {"algorithm": "rlpd", "domain": args.domain, "num_qs": train_args.num_qs,
              "hidden_dims": list(train_args.hidden_dims), "utd": args.utd, "batch_size": args.batch_size, **timing}
    if args.compare_unrolled:
        batches = buffers.sample_mixed(agent.key, offline, online, args.utd, args.batch_size, 0.5)
        start = time.perf_counter()
        jax.jit(unrolled_update, static_argnums=(2, 3)).lower(agent, batches, config, args.utd).compile()
        result["unrolled_compile_seconds"] = round(time.perf_counter() - start, 2)
    return result


def measure_wsrl(args: SpeedArgs) -> dict:
    """WSRL's online step on a fresh network of its preset (timing does not depend
    on the weights), an online buffer of random rows and no offline data."""
    train_args = wsrl.apply_preset(wsrl.Args(utd=args.utd or 4, batch_size=args.batch_size or 1024), args.domain)
    config = wsrl.make_config(train_args, args.action_dim)
    agent = wsrl.fine_tuning_agent(wsrl.create_agent(train_args, config, args.observation_dim, args.action_dim),
                                   train_args)
    rng = np.random.default_rng(0)
    online = buffers.from_arrays(random_rows(rng, 100_000, args.observation_dim, args.action_dim))
    transition = {key: value[0] for key, value in random_rows(rng, 1, args.observation_dim, args.action_dim).items()}
    online_step = wsrl.make_online_step(train_args, config)
    timing, _, _ = time_online_step(online_step, agent, online, None, transition, args, train_args.utd)
    return {"algorithm": "wsrl", "domain": args.domain, "pretraining": train_args.pretraining,
            "ensemble_size": train_args.ensemble_size, "critic_hidden_dims": list(train_args.critic_hidden_dims),
            "actor_hidden_dims": list(train_args.actor_hidden_dims),
            "max_target_backup": train_args.max_target_backup, "utd": train_args.utd,
            "batch_size": train_args.batch_size, **timing}


def off2on_buffers(rng, offline_rows: int, online_capacity: int, online_rows: int, dims):
    """Random offline rows, and Off2On's replay: an online part holding `online_rows` of its
    capacity, offline rows at priority 1 and the online ones at the running maximum."""
    offline = buffers.from_arrays(random_rows(rng, offline_rows, *dims))
    online = buffers.insert_rows(buffers.empty_like({key: value[0] for key, value in offline.data.items()},
                                                    online_capacity), random_rows(rng, online_rows, *dims))
    tree = off2on.priorities.from_priorities(np.ones(offline_rows, np.float32), offline_rows + online_capacity)
    return offline, off2on.Replay(online, off2on.priorities.insert(tree, offline_rows + np.arange(online_rows)))


def measure_off2on(args: SpeedArgs) -> dict:
    """Off2On's epoch (actions, insert, updates) and its vmapped pre-training, on freshly
    initialised members of the domain's preset and buffers of random rows."""
    train_args = off2on.apply_preset(off2on.Args(epoch_steps=args.epoch_steps), args.domain)
    train_args = dataclasses.replace(train_args, target_entropy=-float(args.action_dim))
    config = off2on.make_config(train_args, args.action_dim)
    dims = (args.observation_dim, args.action_dim)
    members = off2on.create_members(train_args, config, *dims)
    online_capacity, online_rows = train_args.online_steps, train_args.online_steps // 4
    offline, replay = off2on_buffers(np.random.default_rng(0), args.offline_rows, online_capacity, online_rows, dims)
    pretrain, train, act, insert = off2on.make_step_functions(train_args, config, args.offline_rows)
    observation = np.asarray(offline.data["observations"][0])
    members, pretrain_calls, pretrain_seconds = time_calls(lambda m: pretrain(m, offline, args.pretrain_updates)[0],
                                                           members, jax.block_until_ready, args.min_seconds)
    agent = off2on.fine_tuning_agent(members.actor.params, members.critic.params, train_args, config, *dims)
    updates = train_args.utd * args.epoch_steps

    def epoch(state):
        agent, replay = state
        for _ in range(args.epoch_steps):
            agent, action = act(agent, observation)
            np.asarray(action)  # the training loop waits for each action to step the environment
        replay = insert(replay, np.int32(online_rows))  # timing only: the same slots each epoch
        agent, replay, _ = train(agent, offline, replay, updates)
        return agent, replay

    start = time.perf_counter()
    (agent, replay), epochs, seconds = time_calls(epoch, (agent, replay), jax.block_until_ready, args.min_seconds,
                                                  min_calls=args.epochs)
    first_epoch_seconds = time.perf_counter() - start - seconds  # includes compiling act, insert and train
    steps = epochs * args.epoch_steps
    return {"algorithm": "off2on", "domain": args.domain, "ensemble_size": train_args.ensemble_size,
            "critic_hidden_dims": list(train_args.critic_hidden_dims), "batch_size": train_args.batch_size,
            "offline_rows": args.offline_rows, "online_capacity": online_capacity,
            "device": jax.devices()[0].device_kind, "first_epoch_seconds_with_compile": round(first_epoch_seconds, 2),
            "env_steps_per_second": round(steps / seconds, 1),
            "updates_per_second": round(epochs * updates / seconds, 1),
            "timed_epochs": epochs, "timed_seconds": round(seconds, 2),
            "pretrain_updates_per_second": round(pretrain_calls * args.pretrain_updates / pretrain_seconds, 1),
            "pretrain_timed_seconds": round(pretrain_seconds, 2)}


if __name__ == "__main__":
    print(json.dumps(measure(tyro.cli(SpeedArgs))))
