"""IQL: Implicit Q-Learning, offline pre-training and online fine-tuning, in one file.

Kostrikov, Nair, Levine. "Offline Reinforcement Learning with Implicit Q-Learning", ICLR 2022,
https://arxiv.org/abs/2110.06169. Follows the official code, ikostrikov/implicit_q_learning
(`learner.py`, `critic.py`, `actor.py`, `policy.py`, `value_net.py`, `common.py`,
`dataset_utils.py`, `train_offline.py`, `train_finetune.py`, `configs/*.py`, README commands).

IQL never queries Q at actions outside the data. Per gradient step, on one minibatch and in
the official order:
  1. value: V(s) by expectile regression on min(Q1, Q2)(s, a) of the TARGET twin critic,
     loss |expectile - 1(u < 0)| * u^2 with u = Q - V (u > 0, V below Q, gets weight expectile);
  2. actor: advantage-weighted regression on dataset actions, loss -mean(w * log pi(a|s)),
     w = min(exp(beta * (Q_target(s, a) - V(s))), 100), with the V just updated;
  3. critic: both twins regress on r + gamma * mask * V(s') (the V just updated), loss
     sum over twins of the mean squared error; mask = 1 - terminated, never 1 - truncated;
  4. target twin critic: Polyak average with rate tau.
All four run in ONE jitted function; the offline phase runs it in `lax.scan` chunks with the
minibatches sampled inside the jit from the on-device dataset.

Networks (official): 2x256 ReLU MLPs, orthogonal init with scale sqrt(2) on every layer, zero
biases; twin critic Q(s, a) as one module vmapped over 2 members; V(s) a separate MLP; the
target twin critic starts as a copy of the critic and has no optimizer state. Policy: Gaussian
with mean tanh(Dense(MLP(s))) and a state-independent learned log-std (zero init, clipped to
[-5, 2]); the distribution itself is NOT tanh-squashed, so log pi of dataset actions is a plain
diagonal Gaussian log-density. Optional dropout after every hidden ReLU of the actor (training
only). Exploration samples the Gaussian and clips to [-1, 1] (the clipped action is stored);
evaluation takes the mean tanh(...). Adam, lr 3e-4 for actor, value and critic.

Actor learning rate: `--actor-lr-schedule cosine` decays it to 0 with `optax.cosine_decay_schedule`
over all of the run's actor updates (offline steps + online steps x utd), as `train_offline.py`
does over its `max_steps`; `constant` keeps it fixed, as `configs/antmaze_finetune_config.py`
(`opt_decay_schedule = None`) does for the whole fine-tuning run, offline pre-training included.
Preset: cosine when the run is offline-only (`--online-steps 0`), constant otherwise; an explicit
cosine with an online phase still decays over the whole run, so online updates never use a
learning rate already decayed to 0.

Rewards (on offline and online transitions alike): locomotion r * 1000 / (max - min) of the
dataset's undiscounted trajectory returns, trajectories split where a step is terminal, an
episode ends, or the next observation is not the following step's observation (the official
`split_into_trajectories` rule, plus Minari's episode ends); AntMaze r - 1; others unchanged.
The resolved `reward_scale` and `reward_bias` are stored in config.json, so a resumed run and
its online rewards use the very same transform.

Online fine-tuning (`train_finetune.py`): the replay buffer starts filled with the whole offline
dataset and every online transition is appended; minibatches are drawn uniformly from all of
it. Here the offline data stays in its own on-device buffer and the online transitions go to a
ring buffer of `online_steps` rows; `common.buffers.sample_union` draws uniformly from the
union, which is the official buffer (its README runs AntMaze with `--replay_buffer_size
2000000`, so no offline row is ever overwritten) without copying the dataset. Updates start at
the first online step (no random-action warm-up, as in the official loop); one environment step
is ONE jitted call: insert the transition, `utd` updates, sample the next action.

Module layout of the checkpoint's "agent" state dict (checkpoints/latest.msgpack, key "agent"),
for scripts that read it: `actor.params` = {MLP_0: {Dense_0, Dense_1}, Dense_0 (mean head),
log_stds (action_dim,)}; `critic.params` = {VmapCritic_0: {MLP_0: {Dense_0, Dense_1}, Dense_0}}
with a leading axis of 2 (the twins) on every leaf, input concat(observation, action);
`value.params` = {MLP_0: {...}, Dense_0};
`target_critic_params` shaped as `critic.params`; each TrainState also holds `step` and
`opt_state`; `key` is the JAX key. `load_policy(run_dir)` gives the deterministic policy.

Presets (explicit flags win), each domain on its paper protocol: the official fine-tuning runs
are AntMaze only; the locomotion, Kitchen and Adroit numbers are offline-only with the cosine
actor schedule.
  * locomotion: `configs/mujoco_config.py` with `train_offline.py` (README's Locomotion command):
    expectile 0.7, beta 3, 1M offline updates only, cosine; 10 episodes every 5000 steps (the
    script's defaults).
  * antmaze: `configs/antmaze_finetune_config.py` with `train_finetune.py` (README's fine-tuning
    command): expectile 0.9, beta 10, 1M offline updates + 1M online steps, constant lr
    (`opt_decay_schedule = None`); 100 episodes every 100k steps (the command's flags).
  * kitchen, adroit: `configs/kitchen_config.py` with `train_offline.py` (README's "Kitchen and
    Adroit" command): expectile 0.7, beta 0.5, actor dropout 0.1, 1M offline updates only,
    cosine; 10 episodes every 5000 steps.
  * pointmaze: ours, locomotion-like 0.7, 3 (raw 0/1 goal reward on the sparse default), 40k
    offline + 40k online steps, constant lr; 20 episodes every 5000 steps. Sized for the
    no-argument run to finish in about 10 minutes on a 2-core CPU, with both phases.
Fine-tuning on any domain is one flag away (`--online-steps 1000000`, which also makes the
schedule constant unless `--actor-lr-schedule` is given); AntMaze offline-only as in the
paper's offline table is `--online-steps 0` (cosine, as `train_offline.py` with
`configs/antmaze_config.py`).

Deviations from the official code:
  * Locomotion fine-tuning: `train_finetune.py` rescales only the dataset rewards and inserts
    raw online rewards; we apply the same transform to both (it only fine-tuned AntMaze, where
    both get r - 1). The rescaling applies to every locomotion dataset, not only
    halfcheetah / hopper / walker2d.
  * The cosine schedule decays over the run's actor updates, not a fixed `max_steps`; it is
    the same thing for offline-only runs.
  * `--utd` > 1 (not in the official code) runs that many full IQL updates per environment step
    in a `lax.scan`, each on its own minibatch; offline, one step is always one update.
  * Our additions: atomic checkpoints at episode boundaries with exact resume, evaluations of
    the deterministic policy on the Minari evaluation env (AntMaze scored by success rate).

Usage:
  python algorithms/iql.py                                      # local PointMaze data, built on first use
  python algorithms/iql.py --env antmaze-large                  # 1M offline + 1M online fine-tuning
  python algorithms/iql.py --env hopper-medium                  # 1M offline only (cosine actor lr)
  python algorithms/iql.py --env hopper-medium --online-steps 1000000   # then 1M online (constant lr)
  python algorithms/iql.py --resume runs/iql__...               # continue a stopped run
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
from typing import Any, Callable, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tyro
from flax import struct
from flax.training.train_state import TrainState

if __package__ in (None, ""):  # run as `python algorithms/iql.py`: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import buffers, datasets  # noqa: E402
from common import run as harness
from common.cli import UserError, check, run_cli

ALGORITHM = "iql"
MAX_WEIGHT = 100.0  # cap on the AWR weights exp(beta * advantage) (official actor.py)
# Offline updates per jitted call between looks for a stop signal: about 0.7 s at the paper's
# networks on a 2-core CPU (144 updates/s), so a stop reaches its checkpoint within seconds.
STOP_CHECK_UPDATES = 100
LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0  # bounds of the policy's log-std (official learner.py / policy.py)


@tyro.conf.configure(tyro.conf.FlagConversionOff)  # every boolean flag takes a value: --progress False
@dataclasses.dataclass
class Args:
    """IQL (Kostrikov et al. 2021). Flags marked [preset] take the domain's preset unless given:
    locomotion expectile 0.7, beta 3, 1M offline only, cosine; antmaze 0.9, 10, 1M + 1M, constant
    lr, 100 eval episodes every 100k steps; kitchen and adroit 0.7, 0.5, actor dropout 0.1, 1M
    offline only, cosine; pointmaze (ours, about 10 minutes on a 2-core CPU) 0.7, 3, 40k + 40k.
    A step is one update offline and one environment step online."""

    # --- run ---
    env: str = "local/pointmaze/medium-30k-v0"
    """D4RL-style name (antmaze-large), Minari id, or local dataset id; IQL needs a dataset."""
    seed: int = 0
    """One seed for network init, sampling, exploration and environment resets."""
    log_dir: str = "runs"
    """Root folder of run folders."""
    resume: str | None = None
    """Run folder to continue from its last checkpoint (its saved configuration is used)."""
    checkpoint_every: int = 50_000
    """Checkpoint every this many steps (online: at the next episode end) and at the end."""
    checkpoint_minutes: float = 10.0
    """Also checkpoint once this many minutes have passed since the last checkpoint (online: at the next episode end)."""
    progress: bool = True
    """Show a progress bar."""
    capture_video: bool = False
    """Record episode 0 of every evaluation as run_dir/videos/{phase}_{step}.mp4 (MUJOCO_GL=egl unless set; osmesa on CPUs)."""

    # --- schedule ---
    offline_steps: int | None = None
    """Offline updates before the online phase [preset; official 1M]."""
    online_steps: int | None = None
    """Environment steps of the online fine-tuning phase (0 = offline only) [preset]."""
    utd: int = 1
    """Full IQL updates per environment step online (official: 1)."""
    batch_size: int = 256
    """Minibatch size of one update."""
    eval_every: int | None = None
    """Evaluate every this many steps of each phase [preset]."""
    eval_episodes: int | None = None
    """Episodes per evaluation (deterministic policy) [preset]."""
    log_every: int = 1000
    """Write training scalars every this many steps."""

    # --- network ---
    hidden_dims: tuple[int, ...] = (256, 256)
    """Hidden layer widths of actor, twin critic and value MLPs."""
    dropout_rate: float | None = None
    """Dropout after each hidden layer of the actor while training (0 = none) [preset]."""

    # --- algorithm ---
    expectile: float | None = None
    """Expectile of the value regression on Q, in (0, 1) [preset]."""
    beta: float | None = None
    """Inverse temperature of the advantage weights exp(beta * A) (official `temperature`) [preset]."""
    discount: float = 0.99
    """Discount factor gamma."""
    tau: float = 0.005
    """Target critic update rate."""
    actor_lr: float = 3e-4
    """Actor learning rate (Adam)."""
    value_lr: float = 3e-4
    """Value learning rate (Adam)."""
    critic_lr: float = 3e-4
    """Critic learning rate (Adam)."""
    actor_lr_schedule: Literal["cosine", "constant"] | None = None
    """Actor lr: cosine decay to 0 over all of the run's updates, or constant [preset: cosine if --online-steps 0]."""
    reward_scale: float | None = None
    """Rewards become r * scale + bias [preset: locomotion 1000 / (max - min dataset trajectory return), else 1]."""
    reward_bias: float | None = None
    """Rewards become r * scale + bias [preset: antmaze -1, else 0]."""


PRESETS: dict[str, dict[str, Any]] = {
    # configs/mujoco_config.py, train_offline.py defaults (max_steps 1M, eval_interval 5000, eval_episodes 10)
    "locomotion": dict(expectile=0.7, beta=3.0, dropout_rate=0.0, offline_steps=1_000_000,
                       online_steps=0, eval_every=5000, eval_episodes=10),
    # configs/antmaze_finetune_config.py, README's train_finetune.py command (100 episodes every 100k)
    "antmaze": dict(expectile=0.9, beta=10.0, dropout_rate=0.0, offline_steps=1_000_000,
                    online_steps=1_000_000, eval_every=100_000, eval_episodes=100),
    # configs/kitchen_config.py, train_offline.py defaults (README: "Kitchen and Adroit")
    "kitchen": dict(expectile=0.7, beta=0.5, dropout_rate=0.1, offline_steps=1_000_000,
                    online_steps=0, eval_every=5000, eval_episodes=10),
    "adroit": dict(expectile=0.7, beta=0.5, dropout_rate=0.1, offline_steps=1_000_000,
                   online_steps=0, eval_every=5000, eval_episodes=10),
    # ours: the no-argument run, sized for about 10 minutes on a 2-core CPU (PRESET_NOTES)
    "pointmaze": dict(expectile=0.7, beta=3.0, dropout_rate=0.0, offline_steps=40_000,
                      online_steps=40_000, eval_every=5000, eval_episodes=20),
}
# What a preset is and why, printed at the start of a new run (domains whose preset is not a paper's).
PRESET_NOTES: dict[str, str] = {
    "pointmaze": "ours, not a paper's: IQL pre-trained offline for 40k updates, then fine-tuned online "
                 "for 40k steps (expectile 0.7, beta 3, 2x256), sized to finish in about 10 minutes on a "
                 "2-core CPU; the paper presets (1M updates) apply to the paper datasets.",
}


def apply_preset(args: Args, domain: str) -> Args:
    """Fill every unset (None) field from the domain's preset; the actor lr schedule follows
    the resolved online steps (cosine offline-only, constant with fine-tuning)."""
    preset = PRESETS.get(domain, PRESETS["locomotion"])
    filled = {name: value for name, value in preset.items() if getattr(args, name) is None}
    args = dataclasses.replace(args, **filled)
    if args.actor_lr_schedule is None:
        args = dataclasses.replace(args, actor_lr_schedule="cosine" if args.online_steps == 0 else "constant")
    return args


def dataset_reward_scale(transitions: dict[str, np.ndarray]) -> float:
    """1000 / (max - min) undiscounted trajectory return (official `normalize`); 1 if all are equal."""
    ends = datasets.trajectory_ends(transitions["terminated"], transitions["episode_ends"],
                                    transitions["observations"], transitions["next_observations"])
    starts = np.concatenate([[0], np.flatnonzero(ends[:-1]) + 1])
    returns = np.add.reduceat(np.asarray(transitions["rewards"], np.float64), starts)
    span = float(returns.max() - returns.min())
    return 1000.0 / span if span > 0 else 1.0


def resolve_reward_transform(args: Args, domain: str, transitions: dict[str, np.ndarray]) -> Args:
    """Fill `reward_scale` / `reward_bias` from the domain rule (explicit flags win)."""
    scale = args.reward_scale
    if scale is None:
        scale = dataset_reward_scale(transitions) if domain == "locomotion" else 1.0
    bias = args.reward_bias if args.reward_bias is not None else (-1.0 if domain == "antmaze" else 0.0)
    return dataclasses.replace(args, reward_scale=float(scale), reward_bias=float(bias))


def transform_rewards(rewards, args: Args):
    return rewards * args.reward_scale + args.reward_bias


# ---------------------------------------------------------------------------------------------
# Networks

def default_init(scale: float = float(np.sqrt(2.0))):
    return nn.initializers.orthogonal(scale)


class MLP(nn.Module):
    """Dense -> ReLU (-> Dropout while training) for every hidden width."""

    hidden_dims: tuple[int, ...]
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, x, training: bool = False):
        for width in self.hidden_dims:
            x = nn.relu(nn.Dense(width, kernel_init=default_init())(x))
            if self.dropout_rate > 0:
                x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=not training)
        return x


class Critic(nn.Module):
    hidden_dims: tuple[int, ...]

    @nn.compact
    def __call__(self, observations, actions):
        x = MLP(self.hidden_dims)(jnp.concatenate([observations, actions], -1))
        return nn.Dense(1, kernel_init=default_init())(x).squeeze(-1)


class TwinCritic(nn.Module):
    """Two independent critics evaluated in one vmapped call; output shape (2, batch)."""

    hidden_dims: tuple[int, ...]
    num: int = 2

    @nn.compact
    def __call__(self, observations, actions):
        ensemble = nn.vmap(Critic, variable_axes={"params": 0}, split_rngs={"params": True},
                           in_axes=None, out_axes=0, axis_size=self.num)
        return ensemble(self.hidden_dims)(observations, actions)


class Value(nn.Module):
    hidden_dims: tuple[int, ...]

    @nn.compact
    def __call__(self, observations):
        x = MLP(self.hidden_dims)(observations)
        return nn.Dense(1, kernel_init=default_init())(x).squeeze(-1)


class Actor(nn.Module):
    """Gaussian policy: mean tanh(Dense(MLP(s))), state-independent log-std; no tanh squashing."""

    hidden_dims: tuple[int, ...]
    action_dim: int
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, observations, training: bool = False):
        x = MLP(self.hidden_dims, self.dropout_rate)(observations, training=training)
        mean = jnp.tanh(nn.Dense(self.action_dim, kernel_init=default_init())(x))
        log_std = self.param("log_stds", nn.initializers.zeros, (self.action_dim,))
        log_std = jnp.clip(log_std, LOG_STD_MIN, LOG_STD_MAX)
        return mean, jnp.broadcast_to(log_std, mean.shape)


def gaussian_log_prob(actions, mean, log_std):
    """Log-density of a diagonal Gaussian, summed over action dimensions."""
    z = (actions - mean) * jnp.exp(-log_std)
    return (-0.5 * z**2 - log_std - 0.5 * jnp.log(2.0 * jnp.pi)).sum(-1)


# ---------------------------------------------------------------------------------------------
# Agent state and losses


@struct.dataclass
class Config:
    """Static settings the jitted functions close over."""

    actor: Actor = struct.field(pytree_node=False)
    critic: TwinCritic = struct.field(pytree_node=False)
    value: Value = struct.field(pytree_node=False)
    expectile: float = struct.field(pytree_node=False)
    beta: float = struct.field(pytree_node=False)
    discount: float = struct.field(pytree_node=False)
    tau: float = struct.field(pytree_node=False)
    actor_lr: Any = struct.field(pytree_node=False)  # a float or an optax schedule of the actor step


class Agent(struct.PyTreeNode):
    actor: TrainState
    critic: TrainState
    value: TrainState
    target_critic_params: Any
    key: jax.Array


def actor_learning_rate(args: Args):
    """The actor's learning rate: a constant, or a cosine decay over all of the run's actor updates."""
    if args.actor_lr_schedule == "cosine":
        return optax.cosine_decay_schedule(args.actor_lr, max(args.offline_steps + args.online_steps * args.utd, 1))
    return args.actor_lr


def make_config(args: Args, action_dim: int) -> Config:
    hidden = tuple(args.hidden_dims)
    return Config(Actor(hidden, action_dim, args.dropout_rate), TwinCritic(hidden), Value(hidden),
                  args.expectile, args.beta, args.discount, args.tau, actor_learning_rate(args))


def create_agent(args: Args, config: Config, observation_dim: int, action_dim: int) -> Agent:
    key, actor_key, critic_key, value_key = jax.random.split(jax.random.PRNGKey(args.seed), 4)
    observations, actions = jnp.zeros((1, observation_dim)), jnp.zeros((1, action_dim))
    actor = TrainState.create(apply_fn=config.actor.apply, tx=optax.adam(config.actor_lr),
                              params=config.actor.init(actor_key, observations)["params"])
    critic_params = config.critic.init(critic_key, observations, actions)["params"]
    critic = TrainState.create(apply_fn=config.critic.apply, params=critic_params, tx=optax.adam(args.critic_lr))
    value = TrainState.create(apply_fn=config.value.apply, tx=optax.adam(args.value_lr),
                              params=config.value.init(value_key, observations)["params"])
    target_params = jax.tree_util.tree_map(jnp.copy, critic_params)  # own buffers: the state is donated
    agent = Agent(actor, critic, value, target_params, key)
    return harness.strongly_typed(agent)  # no recompilation when the first update fixes the dtypes


def expectile_loss(diff, expectile):
    """Asymmetric squared loss of u = Q - V: weight `expectile` where u > 0, 1 - expectile elsewhere.
    Its minimiser over V is the `expectile`-expectile of Q (an upper expectile for expectile > 0.5)."""
    weight = jnp.where(diff > 0, expectile, 1.0 - expectile)
    return weight * diff**2


def value_loss(value_params, batch, target_q, config: Config):
    """Expectile regression of V(s) on min over the target twins of Q(s, a)."""
    v = config.value.apply({"params": value_params}, batch["observations"])
    return expectile_loss(target_q - v, config.expectile).mean(), v.mean()


def awr_weights(advantages, beta):
    """exp(beta * A), capped at MAX_WEIGHT."""
    return jnp.minimum(jnp.exp(beta * advantages), MAX_WEIGHT)


def actor_loss(actor_params, key, batch, advantages, config: Config):
    """Advantage-weighted regression: -mean(min(exp(beta * A), 100) * log pi(a|s)) on dataset actions."""
    mean, log_std = config.actor.apply({"params": actor_params}, batch["observations"], training=True,
                                       rngs={"dropout": key})
    log_probs = gaussian_log_prob(batch["actions"], mean, log_std)
    return -(awr_weights(advantages, config.beta) * log_probs).mean(), log_probs.mean()


def critic_loss(critic_params, batch, target_q, config: Config):
    """Squared TD error summed over the two twins, averaged over rows (official)."""
    qs = config.critic.apply({"params": critic_params}, batch["observations"], batch["actions"])
    return ((qs - target_q) ** 2).sum(0).mean(), qs.mean()


def update(agent: Agent, batch, config: Config):
    """One IQL step on one minibatch, in the official order: value, actor, critic, target."""
    key, dropout_key = jax.random.split(agent.key)
    target_q = config.critic.apply({"params": agent.target_critic_params}, batch["observations"],
                                   batch["actions"]).min(0)

    (v_loss, v_mean), grads = jax.value_and_grad(value_loss, has_aux=True)(agent.value.params, batch, target_q, config)
    value = agent.value.apply_gradients(grads=grads)

    advantages = target_q - config.value.apply({"params": value.params}, batch["observations"])
    (a_loss, log_prob), grads = jax.value_and_grad(actor_loss, has_aux=True)(
        agent.actor.params, dropout_key, batch, advantages, config)
    actor_lr = config.actor_lr(agent.actor.step) if callable(config.actor_lr) else config.actor_lr
    actor = agent.actor.apply_gradients(grads=grads)

    next_v = config.value.apply({"params": value.params}, batch["next_observations"])
    td_target = batch["rewards"] + config.discount * batch["masks"] * next_v
    (c_loss, q), grads = jax.value_and_grad(critic_loss, has_aux=True)(agent.critic.params, batch, td_target, config)
    critic = agent.critic.apply_gradients(grads=grads)
    target = optax.incremental_update(critic.params, agent.target_critic_params, config.tau)

    agent = Agent(actor, critic, value, target, key)
    return agent, {"value_loss": v_loss, "v": v_mean, "actor_loss": a_loss, "log_prob": log_prob,
                   "advantage": advantages.mean(), "awr_weight": awr_weights(advantages, config.beta).mean(),
                   "critic_loss": c_loss, "q": q, "actor_lr": jnp.asarray(actor_lr, jnp.float32)}


def act(agent: Agent, observation, config: Config):
    """An exploration action: a Gaussian sample (no dropout), clipped to [-1, 1]."""
    key, action_key = jax.random.split(agent.key)
    mean, log_std = config.actor.apply({"params": agent.actor.params}, observation)
    action = mean + jnp.exp(log_std) * jax.random.normal(action_key, mean.shape)
    return agent.replace(key=key), jnp.clip(action, -1.0, 1.0)


def deterministic_policy(config: Config) -> Callable:
    """The evaluation policy: the Gaussian mean tanh(...), no dropout."""
    @jax.jit
    def policy(actor_params, observations):
        return config.actor.apply({"params": actor_params}, observations)[0]
    return policy


def make_step_functions(args: Args, config: Config):
    """The jitted calls of the training loop. `online_step` is THE one call per env step."""

    def scanned_updates(agent, batches):
        agent, infos = jax.lax.scan(functools.partial(update, config=config), agent, batches)
        return agent, jax.tree_util.tree_map(lambda leaf: leaf[-1], infos)

    def online_step(agent, online, offline, transition, observation):
        online = buffers.insert(online, transition)
        key, sample_key = jax.random.split(agent.key)
        batches = buffers.sample_union(sample_key, offline, online, (args.utd, args.batch_size))
        agent, info = scanned_updates(agent.replace(key=key), batches)
        agent, action = act(agent, observation, config)
        return agent, online, action, info

    def offline_chunk(agent, offline, num_updates: int):
        def body(agent, _):
            key, sample_key = jax.random.split(agent.key)
            return update(agent.replace(key=key), buffers.sample(offline, sample_key, (args.batch_size,)), config)
        agent, infos = jax.lax.scan(body, agent, None, length=num_updates)
        return agent, jax.tree_util.tree_map(lambda leaf: leaf[-1], infos)

    online_step = jax.jit(online_step, donate_argnums=(0, 1))
    offline_chunk = jax.jit(offline_chunk, static_argnames="num_updates", donate_argnums=0)
    first_action = jax.jit(functools.partial(act, config=config))
    return online_step, offline_chunk, first_action


# ---------------------------------------------------------------------------------------------
# Flags and data

RULES: list[harness.Rule] = [
    ("expectile", lambda value: 0.0 < value < 1.0, "must lie strictly between 0 and 1"),
    ("beta", harness.at_least(0), "must be >= 0 (0 = behaviour cloning)"),
    ("dropout_rate", lambda value: 0.0 <= value < 1.0, "must lie in [0, 1)"),
    ("actor_lr", harness.positive, "must be positive"),
    ("value_lr", harness.positive, "must be positive"),
    ("critic_lr", harness.positive, "must be positive"),
    ("hidden_dims", harness.widths, "must be positive widths"),
    ("reward_scale", harness.positive, "must be positive"),
]


def validate(args: Args) -> None:
    """Every flag check that needs no data; runs before anything is loaded or compiled."""
    harness.check_flags(args, RULES + harness.RUN_RULES)


def load_transitions(task: datasets.Task, dataset) -> dict[str, np.ndarray]:
    """The dataset's flat transitions, before any reward transform."""
    return datasets.dataset_transitions(dataset, task.domain)


def offline_rows(transitions: dict[str, np.ndarray], action_space, args: Args) -> dict[str, np.ndarray]:
    """IQL's training rows: actions in [-1, 1] clipped to +-(1 - 1e-5), rewards transformed,
    masks = 1 - terminated."""
    return {
        "observations": transitions["observations"],
        "actions": datasets.clip_actions(transitions["actions"], action_space),
        "rewards": transform_rewards(transitions["rewards"], args).astype(np.float32),
        "next_observations": transitions["next_observations"],
        "masks": 1.0 - transitions["terminated"].astype(np.float32),
    }


CHECKPOINT_EXTRAS = ("pending_action",)  # besides common/run.py's payload


def load_policy(run_dir: str) -> Callable[[np.ndarray], np.ndarray]:
    """The deterministic policy of a run's last checkpoint: (n, obs_dim) -> (n, act_dim) in [-1, 1]."""
    args, saved = harness.read_run_config(run_dir, Args, ALGORITHM)
    config = make_config(args, saved["action_dim"])
    agent = create_agent(args, config, saved["observation_dim"], saved["action_dim"])
    actor_params = harness.load_agent_state(run_dir, agent).actor.params
    policy = deterministic_policy(config)
    return lambda observations: np.asarray(policy(actor_params, jnp.asarray(observations, jnp.float32)))


# ---------------------------------------------------------------------------------------------
# Training


@dataclasses.dataclass
class Run:
    """One training run: its session (folder, counters, logs, evaluation, stops), the agent, the
    buffers and the jitted calls; the phase loops below advance it."""

    args: Args
    task: datasets.Task
    session: harness.Session
    env: Any
    offline: buffers.Buffer
    online: buffers.Buffer
    agent: Agent
    action: np.ndarray | None  # the next action, computed by the last jitted call
    policy: Callable
    online_step: Callable
    offline_chunk: Callable
    first_action: Callable

    def evaluate(self, phase: str, step: int) -> None:
        self.session.evaluate(lambda observations: self.policy(self.agent.actor.params, observations), phase, step)

    def checkpoint(self, step: int) -> None:
        self.session.save(step, self.agent, self.online, pending_action=harness.optional_array(self.action))

    def reset_env(self) -> np.ndarray:
        return self.env.reset(seed=self.session.reset_seed())[0]


def start_run(args: Args) -> Run | None:
    """Check flags, load data, build envs and agent, restore a checkpoint when resuming.

    Returns None when the run to resume has already finished.
    """
    args, run_dir, saved = harness.start(args, ALGORITHM, validate, extra_keys=CHECKPOINT_EXTRAS)
    task = datasets.resolve(args.env)
    args = apply_preset(args, task.domain)
    if run_dir is None and task.domain in PRESET_NOTES:
        print(f"Preset {task.domain} ({ALGORITHM}): {PRESET_NOTES[task.domain]}", flush=True)
    validate(args)
    if task.dataset_id is None:
        raise UserError(f"--env {args.env} is an environment without a dataset; IQL learns from one "
                        f"(and fine-tunes on top of it): name a D4RL-style name, Minari id or local dataset id.")
    dataset = datasets.load_dataset(task)
    make_env = datasets.env_factory(task, dataset)
    env = make_env()
    observation_dim, action_dim = env.observation_space.shape[0], env.action_space.shape[0]
    transitions = load_transitions(task, dataset)
    args = resolve_reward_transform(args, task.domain, transitions)
    rows = offline_rows(transitions, dataset.action_space, args)
    check(rows["observations"].shape[1] == observation_dim,
          f"dataset observations have {rows['observations'].shape[1]} dims, the env {observation_dim}.")
    offline = buffers.from_arrays(rows)
    del transitions, rows
    run_dir = run_dir or harness.create_run_dir(args, ALGORITHM)

    config = make_config(args, action_dim)
    agent = create_agent(args, config, observation_dim, action_dim)
    example = {key: np.zeros(value.shape[1:], value.dtype) for key, value in offline.data.items()}
    online = buffers.empty_like(example, max(args.online_steps, 1))
    progress, action, elapsed = harness.Progress(next_checkpoint=args.checkpoint_every), None, None
    if saved is not None:
        agent, online, progress, elapsed = harness.restore_checkpoint(saved, run_dir, agent, online)
        action = harness.array_or_none(saved["pending_action"])
    if progress.finished:
        print(f"{run_dir} has already finished.")
        return None
    session = harness.open_session(ALGORITHM, args, task, run_dir, progress, elapsed, (observation_dim, action_dim),
                                   make_env, datasets.scoring_for(dataset, task.domain),
                                   offline_rows=int(offline.size))
    return Run(args, task, session, env, offline, online, agent, action, deterministic_policy(config),
               *make_step_functions(args, config))


def offline_phase(run: Run) -> None:
    """Offline updates in jitted chunks, evaluating every `eval_every` updates.

    Whatever is logged at a step is logged before a checkpoint at that step, so a resumed run
    redoes exactly what came after its checkpoint.
    """
    args, progress, session = run.args, run.session.progress, run.session
    if progress.offline_step == 0 and args.offline_steps > 0 and not session.evaluated_at(0):
        run.evaluate("offline", 0)

    def chunk(num_updates: int):
        run.agent, info = run.offline_chunk(run.agent, run.offline, num_updates)
        return info

    while progress.offline_step < args.offline_steps:
        next_eval = (progress.offline_step // args.eval_every + 1) * args.eval_every
        next_log = (progress.offline_step // args.log_every + 1) * args.log_every
        wanted = min(next_eval, args.offline_steps, next_log) - progress.offline_step
        done, info = session.updates(wanted, chunk, STOP_CHECK_UPDATES)
        progress.offline_step += done
        session.logger.advance(done)
        if done < wanted:  # a stop: checkpoint now, mid-chunk (the resumed run finishes the chunk)
            run.checkpoint(progress.offline_step)
        session.log_training(info, progress.offline_step)
        if progress.offline_step == args.offline_steps:
            break  # the phase-end evaluation opens the online phase
        if progress.offline_step % args.eval_every == 0:
            run.evaluate("offline", progress.offline_step)
        if session.checkpoint_due(progress.offline_step):
            run.checkpoint(progress.offline_step)


def online_phase(run: Run) -> None:
    """One environment step and ONE jitted call (insert, `utd` updates, next action) per iteration.

    Updates start at the first step and every action comes from the policy (official
    `train_finetune.py`: no random-action warm-up). Checkpoints fall at episode ends, where a
    resumed run continues exactly; a stop signal mid-episode checkpoints at once, and the
    resumed run starts a new episode there (the simulator's state is not saved).
    """
    args, progress, session, base = run.args, run.session.progress, run.session, run.args.offline_steps
    if progress.online_step == 0 and run.action is None and not session.evaluated_at(base):  # the phase starts
        run.evaluate("online" if args.offline_steps == 0 else "offline", base)
    if session.stop_requested and progress.online_step == 0 and run.action is None:
        run.checkpoint(base)  # before the first action moves the agent (an owed evaluation is of this one)
    session.logger.new_phase("online")
    observation, episode_return = run.reset_env(), 0.0
    if progress.online_step < args.online_steps and run.action is None:
        run.agent, run.action = run.first_action(run.agent, observation)
    while progress.online_step < args.online_steps:
        next_observation, reward, terminated, truncated, _ = run.env.step(np.asarray(run.action))
        episode_return += reward
        transition = {"observations": observation, "actions": np.asarray(run.action, np.float32),
                      "rewards": np.float32(transform_rewards(reward, args)),
                      "next_observations": next_observation, "masks": np.float32(1.0 - terminated)}
        step = base + progress.online_step + 1
        episode_over = terminated or truncated
        if episode_over:
            session.logger.scalars({"train/episode_return": episode_return}, step)
            progress.episode += 1
            next_observation, episode_return = run.reset_env(), 0.0
        run.agent, run.online, run.action, info = run.online_step(
            run.agent, run.online, run.offline, transition, next_observation)
        observation = next_observation
        progress.online_step += 1
        session.logger.advance()
        if progress.online_step % args.log_every == 0 or progress.online_step == 1:
            session.log_training(info, step)
        if progress.online_step % args.eval_every == 0 or progress.online_step == args.online_steps:
            run.evaluate("online", step)
        if step == base + args.online_steps:
            break  # the final checkpoint follows
        if session.stop_requested and not episode_over:
            progress.episode, run.action = progress.episode + 1, None  # the resumed run starts a new episode
        if (episode_over or session.stop_requested) and session.checkpoint_due(step):
            run.checkpoint(step)


def main(args: Args) -> str | None:
    """Train (or resume) one run; returns its run folder."""
    run = start_run(args)
    return args.resume if run is None else harness.run_phases(run, offline_phase, online_phase)


if __name__ == "__main__":
    run_cli(main, Args)
