"""WSRL: Warm-Start RL, pre-training then online fine-tuning that keeps no offline data, in one file.

Zhou, Peng, Li, Levine, Kumar. "Efficient Online Reinforcement Learning Fine-Tuning Need Not
Retain Offline Data", ICLR 2025, https://arxiv.org/abs/2412.07762. Follows the official code,
zhouzypaul/wsrl (commit 891ee35): `finetune.py` (both phases, warmup rule, batch split, 20
evaluation episodes), `wsrl/agents/sac.py` (fine-tuning), `wsrl/agents/cql.py` and `calql.py`
(pre-training), `wsrl/networks/{actor_critic_nets,mlp,lagrange}.py` and `wsrl/common/common.py`
`ensemblize` (networks), `wsrl/envs/{d4rl_dataset,env_common}.py` and `wrappers/kitchen.py`
(returns-to-go, terminals), `experiments/configs/*.py` and `experiments/scripts/*/launch_*.sh`
(presets). docs/algorithms/wsrl.md gives every preset's source and the measurements.

One run, one folder. The offline phase pre-trains (`--offline-steps` updates, checkpointed and
resumable) with WSRL's own Cal-QL (AntMaze, Adroit, Kitchen) or CQL (locomotion) agent on the
network it then fine-tunes (launch_{calql,cql}_finetune.sh `--use_redq`), and saves that agent
as `checkpoints/pretrained.msgpack`; the online phase drops the offline data and fine-tunes the
whole state (actor, critics, targets, Adam states, temperature). `--pretrained RUN_DIR` skips
the offline phase and fine-tunes another wsrl.py run's pre-trained agent (several seeds, one
pre-training).

  * Network: the critic's MLP trunk (Dense -> LayerNorm -> ReLU) vmapped over 10 members, then
    ONE Dense(1) head shared by all (`Critic` over `ensemblize(MLP)`); the actor's mean head and
    a separate log-std head (AntMaze: one learned log-std per action dimension), std clipped to
    [1e-5, 10], tanh-squashed; orthogonal init, gain sqrt 2, 1e-2 on every trunk's last hidden
    layer (not on Kitchen); temperature and Lagrange multiplier softplus(x), starting at 1.
  * Pre-training step (cql.py; every loss from the same parameters, then all applied, then the
    targets' Polyak update): TD target with n = 10 next actions, min over 2 target critics drawn
    WITH replacement, max over the n; TD loss averaged over the 10 critics. CQL penalty on 2
    critics drawn with replacement: T logsumexp over n uniform, n policy and n next-policy
    actions minus Q(s, a_data); Cal-QL floors the policy samples' Q at the return-to-go;
    importance-sampled, or (Kitchen) plain with Q(s, a_data) in the set and -T log(3n + 1).
    Weight alpha, or (AntMaze) the Lagrange multiplier alone times (gap - target gap). Actor:
    alpha log pi - min over all critics of Q; temperature: alpha (entropy - target), the entropy
    of fresh samples at the NEXT observations.
  * Returns-to-go (calc_return_to_go, infinite_horizon False): finite-horizon sums in every
    domain; on sparse-reward tasks a trajectory of only failure rewards gets r_fail / (1 - gamma).
    Kitchen terminals where the raw reward is 4, in the data (d4rl_dataset.py) and online
    (wrappers/kitchen.py): Minari's Kitchen data, made with `terminate_on_tasks_completed=False`
    (minari-dataset-generation-scripts, kitchen/create_franka_dataset.py), never terminate.
  * Fine-tuning step (sac.py update_high_utd): batch of 1024 online rows -> 4 minibatches of 256
    -> lax.scan of 4 critic steps (subset-min target, no entropy term; AntMaze: max over 10 next
    actions), each followed by the Polyak update -> one actor and one temperature step on all
    1024. Optimizers not trained by a step still step with zero gradients (sac.py `update`);
    `--idle-optimizer-steps False` turns that off. No update while online step <= max(warmup,
    batch x (1 - offline ratio)): the pre-trained policy fills the empty buffer.

Deviations: Minari's Adroit data are dense, so the raw reward replaces the binary tasks' 10 r + 5
and the sparse-failure rule is off; the pre-training batch (256, finetune.py's default kept by the
pre-training scripts) is its own flag, `--offline-batch-size`; with UTD 1 the critic step comes
before the actor's (the official code takes both from the same parameters); sparse PointMaze
(ours) counts as a sparse-reward task.

Usage:
  python algorithms/wsrl.py                                 # local PointMaze: pre-train 2k updates, fine-tune 6k steps
  python algorithms/wsrl.py --env antmaze-large             # pre-train (1M updates), then fine-tune (500k steps)
  python algorithms/wsrl.py --pretrained runs/wsrl__... --seed 1  # fine-tune that run's pre-trained agent
  python algorithms/wsrl.py --resume runs/wsrl__...         # continue a stopped run, in either phase
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
from flax import serialization, struct
from flax.training.train_state import TrainState

if __package__ in (None, ""):  # run as `python algorithms/wsrl.py`: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import buffers, checkpoint, datasets  # noqa: E402
from common import run as harness  # noqa: E402
from common.cli import UserError, check, run_cli  # noqa: E402

ALGORITHM = "wsrl"
# Pre-training updates per jitted call between looks for a stop signal: about 2 to 4 s at the
# AntMaze and Kitchen presets (10 critics of 4x256 or 3x512, batch 256) on a 2-core CPU, so a stop
# reaches its checkpoint within seconds. Not 1: each call costs about one extra update's time, which
# halves the speed of the small presets. (Online, a stop is looked for after every environment step.)
STOP_CHECK_UPDATES = 2
SQRT2 = float(np.sqrt(2.0))
LOG_STD_RANGE = (float(np.log(1e-5)), float(np.log(10.0)))  # actor_critic_nets.py std_min, std_max
PRETRAINED_FILE = os.path.join("checkpoints", "pretrained.msgpack")  # the agent at the end of pre-training


@tyro.conf.configure(tyro.conf.FlagConversionOff)  # every boolean flag takes a value: --progress False
@dataclasses.dataclass
class Args:
    """WSRL (Zhou et al. 2025): pre-training (Cal-QL or CQL, 10 critics) then online fine-tuning
    without the offline data, in one run. Flags marked [preset] take the domain's preset unless
    given (antmaze 1M updates + 500k steps; adroit 20k; kitchen and locomotion 250k; pointmaze,
    ours: 2k updates + 6k steps)."""

    # --- run ---
    env: str = "local/pointmaze/medium-30k-v0"
    """D4RL-style name (antmaze-large), Minari id or local dataset id."""
    seed: int = 0
    """One seed for network init, sampling, exploration and environment resets."""
    pretrained: str | None = None
    """A wsrl.py run folder whose pre-training finished: fine-tune its pre-trained agent (no pre-training here)."""
    log_dir: str = "runs"
    """Root folder of run folders."""
    resume: str | None = None
    """Run folder to continue from its last checkpoint (its saved configuration is used)."""
    checkpoint_every: int = 50_000
    """Checkpoint every this many steps (online: at the next episode end) and at the end."""
    checkpoint_minutes: float = 10.0
    """Also checkpoint once this many minutes have passed since the last checkpoint."""
    progress: bool = True
    """Show a progress bar."""
    capture_video: bool = False
    """Record episode 0 of every evaluation as run_dir/videos/{phase}_{step}.mp4 (MUJOCO_GL=egl unless set; osmesa on CPUs)."""

    # --- schedule ---
    offline_steps: int | None = None
    """Pre-training updates [preset]."""
    online_steps: int | None = None
    """Environment steps of fine-tuning, the warmup included [preset]."""
    warmup_steps: int | None = None
    """First online steps that only collect data, with the pre-trained policy [preset]."""
    offline_batch_size: int = 256
    """Minibatch size of one pre-training update."""
    utd: int = 4
    """Critic steps per environment step; the online batch is split into this many minibatches."""
    batch_size: int = 1024
    """Rows sampled per environment step (split into --utd critic minibatches; the actor uses all)."""
    offline_ratio: float = 0.0
    """Share of every online batch drawn from the offline data (WSRL: 0, the data are not kept)."""
    shuffle_split: bool = False
    """Mix online and offline rows before the split (official: no, minibatches are all-online or all-offline)."""
    eval_every: int | None = None
    """Evaluate every this many steps of each phase, and at the phase ends [preset]."""
    eval_episodes: int = 20
    """Episodes per evaluation (deterministic policy; finetune.py n_eval_trajs)."""
    log_every: int = 1000
    """Write training scalars every this many steps."""

    # --- network ---
    actor_hidden_dims: tuple[int, ...] | None = None
    """Hidden layer widths of the actor [preset]."""
    critic_hidden_dims: tuple[int, ...] | None = None
    """Hidden layer widths of each critic trunk [preset]."""
    ensemble_size: int = 10
    """Critic trunks; one output head is shared by all of them."""
    layer_norm: bool = True
    """LayerNorm after every hidden layer of actor and critics."""
    state_independent_std: bool | None = None
    """One learned log-std per action dimension instead of a log-std head (AntMaze) [preset]."""
    last_hidden_gain: float | None = None
    """Orthogonal init gain of every trunk's last hidden layer (1e-2; Kitchen sqrt 2) [preset]."""

    # --- pre-training ---
    pretraining: Literal["calql", "cql"] | None = None
    """Pre-training agent: Cal-QL (CQL with the return-to-go floor) or CQL [preset]."""
    reward_scale: float | None = None
    """Rewards become reward_scale * r + reward_bias, in both phases [preset]."""
    reward_bias: float | None = None
    """See --reward-scale [preset]."""
    cql_alpha: float | None = None
    """Weight of the CQL penalty [preset]."""
    cql_lagrange: bool | None = None
    """Weight the penalty by a Lagrange multiplier that holds the gap at --cql-target-action-gap [preset]."""
    cql_target_action_gap: float | None = None
    """Target of the gap (log-sum-exp minus data Q) under --cql-lagrange [preset]."""
    cql_importance_sample: bool | None = None
    """Importance-sampled log-sum-exp; off: plain, with Q(s, a_data) in the set [preset]."""
    cql_n_actions: int = 10
    """n: uniform, policy and next-policy actions per state in the log-sum-exp; next actions of the max backup."""
    cql_temperature: float = 1.0
    """Temperature T of the log-sum-exp."""
    alpha_prime_lr: float = 3e-4
    """Learning rate of the Lagrange multiplier (Adam)."""

    # --- algorithm ---
    num_min_qs: int = 2
    """Critics drawn with replacement for the subset-min of the TD target and for the penalty."""
    max_target_backup: bool | None = None
    """Fine-tuning TD target: max over --n-actions next actions of the subset-min (AntMaze) [preset]."""
    n_actions: int = 10
    """Next actions sampled per row for the fine-tuning max-target backup."""
    discount: float = 0.99
    """Discount factor gamma."""
    tau: float = 0.005
    """Target network update rate."""
    actor_lr: float = 1e-4
    """Actor learning rate (Adam), both phases."""
    critic_lr: float = 3e-4
    """Critic learning rate (Adam), both phases."""
    temp_lr: float = 1e-4
    """Entropy temperature learning rate (Adam), both phases."""
    idle_optimizer_steps: bool = True
    """Fine-tuning: step every optimizer at every update, with zero gradients where the update trains nothing (official)."""


# experiments/configs/cql_config.py defaults: alpha 5, importance sampling, no Lagrange, target gap 1;
# train_config.py *_cql: kernel_scale_final 1e-2. launch_wsrl_finetune.sh / finetune.py: 500k steps,
# warmup 5000, eval_interval 20k.
_BASE = dict(pretraining="calql", cql_alpha=5.0, cql_lagrange=False, cql_target_action_gap=1.0,
             cql_importance_sample=True, state_independent_std=False, last_hidden_gain=1e-2, reward_scale=1.0,
             reward_bias=0.0, online_steps=500_000, warmup_steps=5000, max_target_backup=False, eval_every=20_000)
PRESETS: dict[str, dict[str, Any]] = {
    # launch_calql_finetune.sh (1M, 10 r - 5), antmaze_cql (4x256 / 2x256, "uniform" std, autotune, gap 0.8),
    # antmaze_wsrl (max_target_backup)
    "antmaze": dict(_BASE, offline_steps=1_000_000, critic_hidden_dims=(256,) * 4, actor_hidden_dims=(256, 256),
                    state_independent_std=True, reward_scale=10.0, reward_bias=-5.0, cql_lagrange=True,
                    cql_target_action_gap=0.8, max_target_backup=True),
    # launch_calql_finetune.sh (20k), adroit_cql (3x512 / 2x512, alpha 1); reward: see Deviations
    "adroit": dict(_BASE, offline_steps=20_000, critic_hidden_dims=(512,) * 3, actor_hidden_dims=(512, 512),
                   cql_alpha=1.0),
    # launch_calql_finetune.sh (250k, r - 4), kitchen_cql (3x512 both, no kernel_scale_final, plain logsumexp)
    "kitchen": dict(_BASE, offline_steps=250_000, critic_hidden_dims=(512,) * 3, actor_hidden_dims=(512,) * 3,
                    last_hidden_gain=SQRT2, cql_importance_sample=False, reward_bias=-4.0),
    # launch_cql_finetune.sh (CQL, 250k), locomotion_cql (2x256 both, alpha 5)
    "locomotion": dict(_BASE, pretraining="cql", offline_steps=250_000, critic_hidden_dims=(256, 256),
                       actor_hidden_dims=(256, 256)),
    # ours: the no-argument run on a sparse maze, AntMaze's reward 10 r - 5 and max-target backup
    # (PRESET_NOTES)
    "pointmaze": dict(_BASE, offline_steps=2000, critic_hidden_dims=(64, 64), actor_hidden_dims=(64, 64),
                      online_steps=6000, warmup_steps=1000, eval_every=2000, reward_scale=10.0, reward_bias=-5.0,
                      max_target_backup=True),
}
PRESETS["default"] = PRESETS["locomotion"]
PRESET_NOTES: dict[str, str] = {
    "pointmaze": "ours, not a paper's: Cal-QL pre-training with 10 LayerNorm critics on 2x64 networks for 2k "
                 "updates, then 6k online steps (1000 of warmup), rewards 10 r - 5 and max backup as on AntMaze, "
                 "sized for minutes on a CPU (too few to learn this sparse maze: docs/algorithms/wsrl.md); the "
                 "paper presets (up to 1M updates, 500k steps) apply to the paper datasets.",
}
# What a fine-tuning run takes from the pre-trained run it starts from (besides --env, its data):
# the network and everything the pre-training did; a flag given with another value is refused.
PRETRAINING_FIELDS = ("offline_steps", "offline_batch_size", "actor_hidden_dims", "critic_hidden_dims",
                      "ensemble_size", "layer_norm", "state_independent_std", "last_hidden_gain", "pretraining",
                      "reward_scale", "reward_bias", "cql_alpha", "cql_lagrange", "cql_target_action_gap",
                      "cql_importance_sample", "cql_n_actions", "cql_temperature", "alpha_prime_lr")
# Run folders of the wsrl.py that fine-tuned calql.py / cql.py runs (their config.json names the
# pre-training script) cannot be resumed or fine-tuned by this one.
RETIRED = {"pretrained_algorithm": None}
RETIRED_HINT = "pre-training now runs inside wsrl.py; start a new run: python algorithms/wsrl.py --env ENV"
ONLINE_KEYS = ("observations", "actions", "rewards", "next_observations", "masks")


def apply_preset(args: Args, domain: str) -> Args:
    """Fill every unset (None) field from the domain's preset."""
    preset = PRESETS.get(domain, PRESETS["default"])
    return dataclasses.replace(args, **{name: value for name, value in preset.items() if getattr(args, name) is None})


def transform_rewards(rewards, args: Args):
    """The preset's affine reward transform, the same in both phases."""
    return args.reward_scale * rewards + args.reward_bias


def kitchen_terminals(raw_rewards, terminated, domain: str):
    """WSRL's Kitchen rule (d4rl_dataset.py, wrappers/kitchen.py): terminal where the raw reward
    is 4, all four tasks done; other domains keep their terminations."""
    if domain != "kitchen":
        return terminated
    return np.logical_or(terminated, np.asarray(raw_rewards) == 4.0)


# ---------------------------------------------------------------------------------------------
# Networks


def orthogonal(gain: float = SQRT2):
    return nn.initializers.orthogonal(gain)


class MLP(nn.Module):
    """Dense -> [LayerNorm] -> ReLU per layer, the last layer activated too (mlp.py activate_final);
    the last layer's kernel initialised with its own gain (kernel_scale_final)."""

    hidden_dims: tuple[int, ...]
    layer_norm: bool = True
    last_hidden_gain: float = 1e-2

    @nn.compact
    def __call__(self, x):
        for i, width in enumerate(self.hidden_dims):
            last = i == len(self.hidden_dims) - 1
            x = nn.Dense(width, kernel_init=orthogonal(self.last_hidden_gain if last else SQRT2))(x)
            if self.layer_norm:
                x = nn.LayerNorm()(x)
            x = nn.relu(x)
        return x


class Critic(nn.Module):
    """`ensemble_size` MLP trunks in one vmapped call (ensemblize), then ONE Dense(1) head shared
    by every member (actor_critic_nets.py Critic). Output (ensemble_size, ...batch)."""

    hidden_dims: tuple[int, ...]
    ensemble_size: int
    layer_norm: bool = True
    last_hidden_gain: float = 1e-2

    @nn.compact
    def __call__(self, observations, actions):
        observations = jnp.broadcast_to(observations, (*actions.shape[:-1], observations.shape[-1]))
        trunks = nn.vmap(MLP, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=None, out_axes=0,
                         axis_size=self.ensemble_size)(self.hidden_dims, self.layer_norm, self.last_hidden_gain,
                                                       name="trunks")
        features = trunks(jnp.concatenate([observations, actions], -1))
        return nn.Dense(1, kernel_init=orthogonal(), name="head")(features).squeeze(-1)


class Actor(nn.Module):
    """Tanh-Gaussian policy: the mean and the log-std before the tanh, log-std from its own head
    ("exp") or one learned value per action dimension ("uniform"), clipped to [log 1e-5, log 10]."""

    hidden_dims: tuple[int, ...]
    action_dim: int
    layer_norm: bool = True
    last_hidden_gain: float = 1e-2
    state_independent_std: bool = False

    @nn.compact
    def __call__(self, observations):
        x = MLP(self.hidden_dims, self.layer_norm, self.last_hidden_gain)(observations)
        mean = nn.Dense(self.action_dim, kernel_init=orthogonal())(x)
        if self.state_independent_std:
            log_std = jnp.broadcast_to(self.param("log_std", nn.initializers.zeros, (self.action_dim,)), mean.shape)
        else:
            log_std = nn.Dense(self.action_dim, kernel_init=orthogonal())(x)
        return mean, jnp.clip(log_std, *LOG_STD_RANGE)


class Softplus(nn.Module):
    """A learned positive scalar softplus(x), x starting where the value is 1 (lagrange.py)."""

    @nn.compact
    def __call__(self):
        return nn.softplus(self.param("x", lambda _: jnp.full((), np.log(np.expm1(1.0)), jnp.float32)))


def sample_tanh_normal(key, mean, log_std, num: int | None = None):
    """Tanh-squashed Gaussian samples and their log-probabilities (summed over action dims);
    with `num`, `num` samples per row stacked on a new leading axis."""
    shape = mean.shape if num is None else (num, *mean.shape)
    noise = jax.random.normal(key, shape)
    pre_tanh = mean + jnp.exp(log_std) * noise
    gaussian = -0.5 * noise**2 - log_std - 0.5 * jnp.log(2.0 * jnp.pi)
    log_det = 2.0 * (jnp.log(2.0) - pre_tanh - jax.nn.softplus(-2.0 * pre_tanh))  # log(1 - tanh^2), stably
    return jnp.tanh(pre_tanh), (gaussian - log_det).sum(-1)


# ---------------------------------------------------------------------------------------------
# Agent state


@struct.dataclass
class Config:
    """Static settings the jitted functions close over."""

    actor: Actor = struct.field(pytree_node=False)
    critic: Critic = struct.field(pytree_node=False)
    ensemble_size: int = struct.field(pytree_node=False)
    num_min_qs: int = struct.field(pytree_node=False)
    discount: float = struct.field(pytree_node=False)
    tau: float = struct.field(pytree_node=False)
    target_entropy: float = struct.field(pytree_node=False)
    calibration: bool = struct.field(pytree_node=False)  # Cal-QL's floor (pretraining "calql")
    cql_alpha: float = struct.field(pytree_node=False)
    cql_lagrange: bool = struct.field(pytree_node=False)
    cql_target_action_gap: float = struct.field(pytree_node=False)
    cql_importance_sample: bool = struct.field(pytree_node=False)
    cql_n_actions: int = struct.field(pytree_node=False)
    cql_temperature: float = struct.field(pytree_node=False)
    max_target_backup: bool = struct.field(pytree_node=False)
    n_actions: int = struct.field(pytree_node=False)
    idle_optimizer_steps: bool = struct.field(pytree_node=False)


class Agent(struct.PyTreeNode):
    actor: TrainState
    critic: TrainState
    target_critic_params: Any
    temperature: TrainState
    alpha_prime: TrainState  # the Lagrange multiplier (pre-training with --cql-lagrange)
    key: jax.Array


def make_config(args: Args, action_dim: int) -> Config:
    shared = dict(layer_norm=args.layer_norm, last_hidden_gain=args.last_hidden_gain)
    return Config(Actor(tuple(args.actor_hidden_dims), action_dim, state_independent_std=args.state_independent_std,
                        **shared),
                  Critic(tuple(args.critic_hidden_dims), args.ensemble_size, **shared), args.ensemble_size,
                  args.num_min_qs, args.discount, args.tau, -float(action_dim), args.pretraining == "calql",
                  args.cql_alpha, args.cql_lagrange, args.cql_target_action_gap, args.cql_importance_sample,
                  args.cql_n_actions, args.cql_temperature, args.max_target_backup, args.n_actions,
                  args.idle_optimizer_steps)


def create_agent(args: Args, config: Config, observation_dim: int, action_dim: int) -> Agent:
    key, actor_key, critic_key = jax.random.split(jax.random.PRNGKey(args.seed), 3)
    observations, actions = jnp.zeros((1, observation_dim)), jnp.zeros((1, action_dim))

    def state(module, lr, *inputs, key=key):
        return TrainState.create(apply_fn=module.apply, params=module.init(key, *inputs)["params"], tx=optax.adam(lr))

    critic = state(config.critic, args.critic_lr, observations, actions, key=critic_key)
    agent = Agent(state(config.actor, args.actor_lr, observations, key=actor_key), critic,
                  jax.tree_util.tree_map(jnp.copy, critic.params),  # own buffers: the state is donated
                  state(Softplus(), args.temp_lr), state(Softplus(), args.alpha_prime_lr), key)
    return harness.strongly_typed(agent)  # no recompilation when the first update fixes the dtypes


def fine_tuning_agent(agent: Agent, args: Args) -> Agent:
    """The pre-trained state with the fine-tuning learning rates and a fresh key of this run's
    seed: parameters, targets, Adam moments and step counts carry over (Adam's state does not
    depend on the learning rate)."""
    def with_lr(state: TrainState, lr: float) -> TrainState:
        return state.replace(tx=optax.adam(lr))
    return agent.replace(actor=with_lr(agent.actor, args.actor_lr), critic=with_lr(agent.critic, args.critic_lr),
                         temperature=with_lr(agent.temperature, args.temp_lr),
                         key=jax.random.fold_in(jax.random.PRNGKey(args.seed), 1))


def scalar_value(state: TrainState):
    return state.apply_fn({"params": state.params})


def sample_actions(key, actor_params, observations, config: Config, num: int | None = None):
    return sample_tanh_normal(key, *config.actor.apply({"params": actor_params}, observations), num)


def draw_critics(key, config: Config):
    """The members of a subset-min or of the penalty: drawn WITH replacement (jax.random.randint)."""
    return jax.random.randint(key, (config.num_min_qs,), 0, config.ensemble_size)


# ---------------------------------------------------------------------------------------------
# Losses shared by both phases


def td_target(key, batch, actor_params, target_params, config: Config, num: int | None):
    """r + gamma * mask * min over critics drawn with replacement of Q_target(s', a'); with `num`
    next actions per row, the max of that min over them. No entropy term."""
    action_key, subset_key = jax.random.split(key)
    next_actions, _ = sample_actions(action_key, actor_params, batch["next_observations"], config, num)
    next_q = config.critic.apply({"params": target_params}, batch["next_observations"], next_actions)
    next_q = next_q[draw_critics(subset_key, config)].min(0)
    if num is not None:  # (num, B): the best sampled action of each row
        next_q = next_q.max(0)
    return batch["rewards"] + config.discount * batch["masks"] * next_q


def actor_loss(actor_params, key, batch, critic_params, temperature, config: Config):
    """alpha * log pi(a|s) - MIN over all critics of Q(s, a), a ~ pi(s)."""
    actions, log_probs = sample_actions(key, actor_params, batch["observations"], config)
    q = config.critic.apply({"params": critic_params}, batch["observations"], actions).min(0)
    return (temperature * log_probs - q).mean(), -log_probs.mean()


def next_entropy(key, batch, actor_params, config: Config, num: int | None):
    """The temperature's entropy: -mean log pi of fresh samples at the NEXT observations
    (sac.py temperature_loss_fn), `num` per row under max-target backup."""
    _, log_probs = sample_actions(key, actor_params, batch["next_observations"], config, num)
    return -log_probs.mean()


def temperature_loss(temperature_params, apply_fn, entropy, target_entropy):
    """alpha * (entropy - target entropy): alpha falls while the policy's entropy is above target."""
    return apply_fn({"params": temperature_params}) * (entropy - target_entropy)


# ---------------------------------------------------------------------------------------------
# Pre-training (wsrl/agents/cql.py)


def cql_gap(key, batch, actor_params, critic_params, config: Config):
    """Per drawn critic and row: T logsumexp(Q_ood / T) - Q(s, a_data), on num_min_qs critics
    drawn with replacement (`_get_cql_q_diff`). Returns (gap (num_min_qs, B), info)."""
    random_key, policy_key, next_key, subset_key = jax.random.split(key, 4)
    n, observations = config.cql_n_actions, batch["observations"]
    random_actions = jax.random.uniform(random_key, (n, *batch["actions"].shape), minval=-1.0, maxval=1.0)
    policy_actions, policy_log_probs = sample_actions(policy_key, actor_params, observations, config, n)
    next_actions, next_log_probs = sample_actions(next_key, actor_params, batch["next_observations"], config, n)
    members = draw_critics(subset_key, config)
    data_q = config.critic.apply({"params": critic_params}, observations, batch["actions"])[members]
    q = config.critic.apply({"params": critic_params}, observations,
                            jnp.concatenate([random_actions, policy_actions, next_actions]))[members]  # (S, 3n, B)
    info = {}
    if config.calibration:  # policy and next-policy samples floored at the return-to-go; uniform ones not
        floor = jnp.concatenate([jnp.full((n, q.shape[-1]), -jnp.inf), jnp.tile(batch["mc_returns"], (2 * n, 1))])
        info["calql_bound_rate"] = (q < floor).mean()
        q = jnp.maximum(q, floor)
    temperature = config.cql_temperature
    if config.cql_importance_sample:
        uniform_density = jnp.full((n, q.shape[-1]), config.actor.action_dim * jnp.log(0.5))
        q = q - jnp.concatenate([uniform_density, policy_log_probs, next_log_probs])
    else:
        q = jnp.concatenate([q, data_q[:, None]], axis=1)
        q = q - jnp.log(q.shape[1]) * temperature
    ood = jax.nn.logsumexp(q / temperature, axis=1) * temperature
    return ood - data_q, {**info, "cql_ood_values": ood.mean()}


def pretraining_critic_loss(critic_params, key, batch, target_q, actor_params, alpha_prime, config: Config):
    """TD loss averaged over the critics plus the penalty: alpha * mean gap, or with Lagrange
    alpha' * (mean gap - target gap)."""
    data_q = config.critic.apply({"params": critic_params}, batch["observations"], batch["actions"])
    td_loss = ((data_q - target_q) ** 2).mean()
    gap, info = cql_gap(key, batch, actor_params, critic_params, config)
    if config.cql_lagrange:
        weight, penalty = alpha_prime, gap.mean() - config.cql_target_action_gap
    else:
        weight, penalty = config.cql_alpha, gap.mean()
    info = {**info, "td_loss": td_loss, "cql_gap": gap.mean(), "cql_alpha": weight, "q": data_q.mean()}
    return td_loss + weight * penalty, info


def alpha_prime_loss(alpha_prime_params, apply_fn, gap, target_gap):
    """-alpha' * (gap - target): alpha' rises while the gap exceeds its target (LeqLagrangeMultiplier)."""
    return -apply_fn({"params": alpha_prime_params}) * (gap - target_gap)


def pretraining_update(agent: Agent, batch, config: Config):
    """One pre-training step: critic, Lagrange multiplier, actor and temperature losses all from
    the same parameters, then every step applied, then the targets' Polyak update."""
    key, target_key, cql_key, prime_key, actor_key, entropy_key = jax.random.split(agent.key, 6)
    n, temperature, alpha_prime = config.cql_n_actions, scalar_value(agent.temperature), scalar_value(agent.alpha_prime)
    target_q = td_target(target_key, batch, agent.actor.params, agent.target_critic_params, config, n)
    (loss, info), grads = jax.value_and_grad(pretraining_critic_loss, has_aux=True)(
        agent.critic.params, cql_key, batch, target_q, agent.actor.params, alpha_prime, config)
    critic = agent.critic.apply_gradients(grads=grads)
    alpha_prime_state = agent.alpha_prime
    if config.cql_lagrange:  # its own draw of the gap, as the official loss recomputes it
        gap = cql_gap(prime_key, batch, agent.actor.params, agent.critic.params, config)[0].mean()
        prime_grads = jax.grad(alpha_prime_loss)(agent.alpha_prime.params, agent.alpha_prime.apply_fn, gap,
                                                 config.cql_target_action_gap)
        alpha_prime_state = agent.alpha_prime.apply_gradients(grads=prime_grads)
    (actor_value, entropy), actor_grads = jax.value_and_grad(actor_loss, has_aux=True)(
        agent.actor.params, actor_key, batch, agent.critic.params, temperature, config)
    next_ent = next_entropy(entropy_key, batch, agent.actor.params, config, n)
    temp_loss, temp_grads = jax.value_and_grad(temperature_loss)(agent.temperature.params, agent.temperature.apply_fn,
                                                                  next_ent, config.target_entropy)
    agent = agent.replace(actor=agent.actor.apply_gradients(grads=actor_grads), critic=critic,
                          target_critic_params=optax.incremental_update(critic.params, agent.target_critic_params,
                                                                        config.tau),
                          temperature=agent.temperature.apply_gradients(grads=temp_grads),
                          alpha_prime=alpha_prime_state, key=key)
    return agent, {**info, "critic_loss": loss, "actor_loss": actor_value, "entropy": entropy,
                   "temperature": temperature, "temperature_loss": temp_loss, "alpha_prime": alpha_prime}


def pretrain(agent: Agent, offline: buffers.Buffer, num_updates, config: Config, batch_size: int):
    """`num_updates` (traced: one compilation for any) pre-training updates in a jitted loop, each
    on a minibatch sampled on the device; returns the last update's metrics."""

    def step(agent):
        key, sample_key = jax.random.split(agent.key)
        return pretraining_update(agent.replace(key=key), buffers.sample(offline, sample_key, (batch_size,)), config)

    info = jax.tree_util.tree_map(lambda shape: jnp.zeros(shape.shape, shape.dtype), jax.eval_shape(step, agent)[1])
    return jax.lax.fori_loop(0, num_updates, lambda _, carry: step(carry[0]), (agent, info))


# ---------------------------------------------------------------------------------------------
# Fine-tuning (wsrl/agents/sac.py)


def critic_loss(critic_params, batch, target_q, config: Config):
    """Squared TD error, mean over every critic and row."""
    qs = config.critic.apply({"params": critic_params}, batch["observations"], batch["actions"])
    return ((qs - target_q) ** 2).mean(), qs.mean()


def idle_step(state: TrainState, active: bool) -> TrainState:
    """The official zero-gradient optimizer step of a network an update does not train."""
    if not active:
        return state
    return state.apply_gradients(grads=jax.tree_util.tree_map(jnp.zeros_like, state.params))


def fine_tuning_backup(config: Config) -> int | None:
    return config.n_actions if config.max_target_backup else None


def update_critic(agent: Agent, batch, config: Config):
    """One critic step on a minibatch, then the target's Polyak update."""
    key, target_key = jax.random.split(agent.key)
    target_q = td_target(target_key, batch, agent.actor.params, agent.target_critic_params, config,
                         fine_tuning_backup(config))
    (loss, q), grads = jax.value_and_grad(critic_loss, has_aux=True)(agent.critic.params, batch, target_q, config)
    critic = agent.critic.apply_gradients(grads=grads)
    target = optax.incremental_update(critic.params, agent.target_critic_params, config.tau)
    agent = agent.replace(critic=critic, target_critic_params=target, key=key,
                          actor=idle_step(agent.actor, config.idle_optimizer_steps),
                          temperature=idle_step(agent.temperature, config.idle_optimizer_steps))
    return agent, {"critic_loss": loss, "q": q, "target_q": target_q.mean()}


def update_actor_and_temperature(agent: Agent, batch, config: Config):
    """One actor step and one temperature step on the whole batch, from the same parameters."""
    key, actor_key, entropy_key = jax.random.split(agent.key, 3)
    temperature = scalar_value(agent.temperature)
    (loss, entropy), grads = jax.value_and_grad(actor_loss, has_aux=True)(
        agent.actor.params, actor_key, batch, agent.critic.params, temperature, config)
    next_ent = next_entropy(entropy_key, batch, agent.actor.params, config, fine_tuning_backup(config))
    temp_loss, temp_grads = jax.value_and_grad(temperature_loss)(agent.temperature.params, agent.temperature.apply_fn,
                                                                  next_ent, config.target_entropy)
    agent = agent.replace(actor=agent.actor.apply_gradients(grads=grads),
                          temperature=agent.temperature.apply_gradients(grads=temp_grads),
                          critic=idle_step(agent.critic, config.idle_optimizer_steps), key=key)
    return agent, {"actor_loss": loss, "entropy": entropy, "temperature_loss": temp_loss, "temperature": temperature}


def split_minibatches(batch, utd: int):
    """(utd * m, ...) rows -> (utd, m, ...) consecutive minibatches (finetune.py's reshape)."""
    return jax.tree_util.tree_map(lambda leaf: leaf.reshape(utd, -1, *leaf.shape[1:]), batch)


def update(agent: Agent, batch, config: Config, utd: int):
    """WSRL's high-UTD update (sac.py update_high_utd): `utd` critic steps on consecutive slices
    of the batch in a lax.scan, then one actor and one temperature step on the whole batch."""
    agent, critic_info = jax.lax.scan(functools.partial(update_critic, config=config), agent,
                                      split_minibatches(batch, utd))
    agent, actor_info = update_actor_and_temperature(agent, batch, config)
    return agent, {**jax.tree_util.tree_map(jnp.mean, critic_info), **actor_info}


def offline_rows_per_batch(args: Args) -> int:
    """finetune.py's `int(batch_size * offline_data_ratio)`: rounded down, any ratio (100 x 0.29 gives 28)."""
    return int(args.batch_size * args.offline_ratio)


def sample_batch(key, online, offline, args: Args):
    """`batch_size` rows: the online share first, then the offline share ([online, offline] as
    finetune.py concatenates them), optionally shuffled before the split."""
    n_offline = offline_rows_per_batch(args)
    online_key, offline_key, shuffle_key = jax.random.split(key, 3)
    batch = buffers.sample(online, online_key, (args.batch_size - n_offline,))
    if n_offline:
        rows = buffers.sample(offline, offline_key, (n_offline,))
        batch = jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a, b]), batch, rows)
        if args.shuffle_split:
            order = jax.random.permutation(shuffle_key, args.batch_size)
            batch = jax.tree_util.tree_map(lambda leaf: leaf[order], batch)
    return batch


def act(agent: Agent, observation, config: Config):
    key, action_key = jax.random.split(agent.key)
    action, _ = sample_actions(action_key, agent.actor.params, observation, config)
    return agent.replace(key=key), action


def make_online_step(args: Args, config: Config) -> Callable:
    """THE one jitted call per environment step: insert the transition, update (after the
    warmup), and sample the next action."""

    def online_step(agent, online, offline, transition, observation, train: bool):
        online = buffers.insert(online, transition)
        info = {}
        if train:
            key, batch_key = jax.random.split(agent.key)
            batch = sample_batch(batch_key, online, offline, args)
            agent, info = update(agent.replace(key=key), batch, config, args.utd)
        agent, action = act(agent, observation, config)
        return agent, online, action, info

    return jax.jit(online_step, static_argnames="train", donate_argnums=(0, 1))


def deterministic_policy(config: Config) -> Callable:
    """The evaluation policy: tanh of the Gaussian mean."""
    @jax.jit
    def policy(actor_params, observations):
        return jnp.tanh(config.actor.apply({"params": actor_params}, observations)[0])
    return policy


def warmup_length(args: Args) -> int:
    """Online steps without update: finetune.py updates only once online step > max(warmup,
    batch x (1 - offline ratio)) (so there are enough online rows for a batch)."""
    return int(max(args.warmup_steps, args.batch_size * (1 - args.offline_ratio))) + 1


# ---------------------------------------------------------------------------------------------
# Flags, data and the pre-trained agent


RULES: list[harness.Rule] = [
    ("offline_steps", harness.at_least(1), "must be >= 1 (wsrl.py pre-trains; --pretrained skips it)"),
    ("offline_ratio", harness.fraction, "must lie in [0, 1]"),
    ("warmup_steps", harness.at_least(0), "must be >= 0"),
    ("offline_batch_size", harness.at_least(1), "must be at least 1"),
    ("ensemble_size", harness.at_least(1), "must be >= 1"),
    ("num_min_qs", harness.at_least(1), "must be >= 1"),
    ("n_actions", harness.at_least(1), "must be >= 1"),
    ("cql_n_actions", harness.at_least(1), "must be >= 1"),
    ("cql_alpha", harness.at_least(0), "must be >= 0"),
    *[(name, harness.positive, "must be positive") for name in (
        "actor_lr", "critic_lr", "temp_lr", "alpha_prime_lr", "cql_temperature", "last_hidden_gain")],
    ("actor_hidden_dims", harness.widths, "must be positive widths"),
    ("critic_hidden_dims", harness.widths, "must be positive widths"),
    ("discount", lambda value: 0.0 < value < 1.0, "must lie in (0, 1)"),  # returns-to-go divide by 1 - gamma
]


def validate(args: Args) -> None:
    """Every flag check that needs no data; runs before anything is loaded or compiled."""
    harness.check_flags(args, RULES + harness.RUN_RULES)
    check(args.batch_size % args.utd == 0,
          f"--batch-size {args.batch_size} must split into --utd {args.utd} equal minibatches.")


def failure_reward(args: Args, task: datasets.Task) -> float | None:
    """The (transformed) reward of every step of a failed episode on sparse-reward tasks."""
    return float(transform_rewards(0.0, args)) if task.sparse_reward else None


def load_offline_data(task: datasets.Task, dataset, action_space, args: Args) -> dict[str, np.ndarray]:
    """The dataset as training rows: rewards transformed, terminals (Kitchen: raw reward 4),
    masks = 1 - terminal, and each transition's finite-horizon return-to-go."""
    transitions = datasets.dataset_transitions(dataset, task.domain)
    terminated = kitchen_terminals(transitions["rewards"], transitions["terminated"], task.domain)
    rewards = transform_rewards(transitions["rewards"], args).astype(np.float32)
    ends = datasets.trajectory_ends(terminated, transitions["episode_ends"], transitions["observations"],
                                    transitions["next_observations"])
    return {
        "observations": transitions["observations"],
        "actions": datasets.clip_actions(transitions["actions"], action_space),
        "rewards": rewards,
        "next_observations": transitions["next_observations"],
        "masks": 1.0 - terminated.astype(np.float32),
        "mc_returns": monte_carlo_returns(rewards, ends, terminated, args, task),
    }


def monte_carlo_returns(rewards, ends, terminated, args: Args, task: datasets.Task) -> np.ndarray:
    """Finite-horizon returns-to-go (calc_return_to_go, infinite_horizon False): no tail after a
    trajectory's last step, on every domain, Kitchen included."""
    return datasets.returns_to_go(rewards, ends, args.discount, failure_reward(args, task), terminated)


def read_pretrained(run_dir: str, args: Args) -> Args:
    """`args` with the data, network and pre-training settings of the wsrl.py run `run_dir`,
    whose pre-training must have finished; an explicit flag that contradicts them is refused."""
    check(os.path.isdir(run_dir), f"--pretrained {run_dir}: no such folder.")
    try:
        pre_args, record = harness.read_run_config(run_dir, Args, ALGORITHM, retired=RETIRED, hint=RETIRED_HINT)
    except UserError as error:
        raise UserError(f"--pretrained takes a wsrl.py run folder whose pre-training finished: {error} "
                        "(calql.py and cql.py runs are not WSRL's pre-training; wsrl.py pre-trains itself.)") from None
    check(record.get("pretrained") is None and os.path.isfile(os.path.join(run_dir, PRETRAINED_FILE)),
          f"--pretrained {run_dir}: its pre-training has not finished (no {PRETRAINED_FILE}); finish it first: "
          f"{harness.resume_command(ALGORITHM, run_dir)}")
    given = datasets.resolve(args.env).dataset_id if args.env != Args.env else None
    check(given in (None, record["dataset_id"]),
          f"--env {args.env} is {given}, but the pre-trained run trained on {record['dataset_id']}.")
    return dataclasses.replace(harness.take_pretrained(args, pre_args, PRETRAINING_FIELDS), env=pre_args.env)


def load_pretrained_agent(run_dir: str, template: Agent) -> Agent:
    """The agent a run saved at the end of its pre-training."""
    payload = checkpoint.load(os.path.join(run_dir, PRETRAINED_FILE))
    return serialization.from_state_dict(template, payload["agent"])


def save_pretrained_agent(run_dir: str, agent: Agent) -> None:
    checkpoint.save(os.path.join(run_dir, PRETRAINED_FILE),
                    {"agent": serialization.to_state_dict(jax.device_get(agent))})


# ---------------------------------------------------------------------------------------------
# Training


CHECKPOINT_EXTRAS = ("pending_action",)


@dataclasses.dataclass
class Run:
    """One run: its session (folder, counters, logs, evaluation, stops), the agent, the buffers
    and the jitted calls; the phase loops below advance it."""

    args: Args
    task: datasets.Task
    session: harness.Session
    env: Any
    offline: buffers.Buffer | None  # the dataset, for pre-training
    mixing: buffers.Buffer | None  # its rows an online batch mixes in (--offline-ratio > 0)
    online: buffers.Buffer
    agent: Agent
    action: np.ndarray | None
    policy: Callable
    pretrain: Callable
    online_step: Callable
    act: Callable  # the first action of an episode after a (re)start

    def evaluate(self, phase: str, step: int) -> None:
        self.session.evaluate(lambda observations: self.policy(self.agent.actor.params, observations), phase, step)

    def checkpoint(self, step: int) -> None:
        self.session.save(step, self.agent, self.online, pending_action=harness.optional_array(self.action))

    def reset_env(self) -> np.ndarray:
        return self.env.reset(seed=self.session.reset_seed())[0]


def start_run(args: Args) -> Run | None:
    """Check flags, load data, build envs and agent, restore a checkpoint (or the pre-trained
    agent of --pretrained). Returns None when the run to resume has already finished."""
    args, run_dir, saved = harness.start(args, ALGORITHM, validate, extra_keys=CHECKPOINT_EXTRAS,
                                         retired=RETIRED, hint=RETIRED_HINT)
    if run_dir is None and args.pretrained is not None:
        args = read_pretrained(args.pretrained, args)
    task = datasets.resolve(args.env)
    check(task.dataset_id is not None,
          f"--env {args.env} is an environment without a dataset; {ALGORITHM}.py pre-trains offline: name a dataset.")
    if run_dir is None and args.pretrained is None and task.domain in PRESET_NOTES and args.offline_steps is None:
        print(f"Preset {task.domain} ({ALGORITHM}): {PRESET_NOTES[task.domain]}", flush=True)
    args = apply_preset(args, task.domain)
    validate(args)
    dataset = datasets.load_dataset(task)
    make_env = datasets.env_factory(task, dataset)
    env = make_env()
    observation_dim, action_dim = env.observation_space.shape[0], env.action_space.shape[0]
    offline_rows = load_offline_data(task, dataset, dataset.action_space, args)
    check(offline_rows["observations"].shape[1] == observation_dim,
          f"dataset observations have {offline_rows['observations'].shape[1]} dims, the env {observation_dim}.")
    offline = buffers.from_arrays(offline_rows)
    run_dir = run_dir or harness.create_run_dir(args, ALGORITHM)

    config = make_config(args, action_dim)
    agent = create_agent(args, config, observation_dim, action_dim)
    online = buffers.empty_like({key: offline_rows[key][0] for key in ONLINE_KEYS}, max(args.online_steps, 1))
    progress, action, elapsed = harness.Progress(next_checkpoint=args.checkpoint_every), None, None
    if saved is not None:
        if saved["progress"]["offline_step"] >= args.offline_steps:
            agent = fine_tuning_agent(agent, args)  # the same arrays; the fine-tuning learning rates
        agent, online, progress, elapsed = harness.restore_checkpoint(saved, run_dir, agent, online)
        action = harness.array_or_none(saved["pending_action"])
    elif args.pretrained is not None:
        agent = fine_tuning_agent(load_pretrained_agent(args.pretrained, agent), args)
        progress.offline_step = args.offline_steps
    if progress.finished:
        print(f"{run_dir} has already finished.")
        return None
    session = harness.open_session(ALGORITHM, args, task, run_dir, progress, elapsed, (observation_dim, action_dim),
                                   make_env, datasets.scoring_for(dataset, task.domain))
    if saved is None and args.pretrained is not None:
        session.logger.advance(args.offline_steps)  # the step count goes on from the pre-training's
    mixing = offline.replace(data={key: offline.data[key] for key in ONLINE_KEYS}) if args.offline_ratio > 0 else None
    pretrain_jit = jax.jit(functools.partial(pretrain, config=config, batch_size=args.offline_batch_size),
                           donate_argnums=0)
    return Run(args, task, session, env, offline, mixing, online, agent, action, deterministic_policy(config),
               pretrain_jit, make_online_step(args, config), jax.jit(functools.partial(act, config=config)))


def offline_phase(run: Run) -> None:
    """Pre-training updates in jitted chunks, evaluating every `eval_every` updates; at its end
    the pre-trained agent is saved and becomes the fine-tuning agent."""
    args, progress, session = run.args, run.session.progress, run.session
    if progress.offline_step >= args.offline_steps:
        return
    if progress.offline_step == 0 and not session.evaluated_at(0):
        run.evaluate("offline", 0)

    def chunk(num_updates: int):
        run.agent, info = run.pretrain(run.agent, run.offline, num_updates)
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
    save_pretrained_agent(session.run_dir, run.agent)
    run.agent = fine_tuning_agent(run.agent, args)


def online_phase(run: Run) -> None:
    """One environment step and ONE jitted call (insert, [4 critic + 1 actor step], next action)
    per iteration. Checkpoints fall at episode ends; a stop signal mid-episode checkpoints at
    once and the resumed run starts a new episode there (the simulator's state is not saved)."""
    args, progress, session, base = run.args, run.session.progress, run.session, run.args.offline_steps
    if progress.online_step == 0 and run.action is None and not session.evaluated_at(base):  # the pre-trained policy
        run.evaluate("online" if args.pretrained else "offline", base)
    if session.stop_requested and progress.online_step == 0 and run.action is None:
        run.checkpoint(base)  # before the first action moves the agent (an owed evaluation is of this one)
    session.logger.new_phase("online, warmup")
    observation, episode_return, warmup = run.reset_env(), 0.0, warmup_length(args)
    run.offline = None  # WSRL keeps no offline data (with --offline-ratio, `mixing` holds what is used)
    while progress.online_step < args.online_steps:
        if progress.online_step == warmup:
            session.logger.new_phase("online")
        if run.action is None:
            run.agent, action = run.act(run.agent, observation)
            run.action = np.asarray(action)
        next_observation, reward, terminated, truncated, _ = run.env.step(np.asarray(run.action))
        terminated = bool(kitchen_terminals(reward, terminated, run.task.domain))
        episode_return += reward
        transition = {"observations": observation, "actions": np.asarray(run.action, np.float32),
                      "rewards": np.float32(transform_rewards(reward, args)), "next_observations": next_observation,
                      "masks": np.float32(1.0 - terminated)}
        step = base + progress.online_step + 1
        episode_over = terminated or truncated
        if episode_over:
            session.logger.scalars({"train/episode_return": episode_return}, step)
            progress.episode += 1
            next_observation, episode_return = run.reset_env(), 0.0
        train = progress.online_step >= warmup
        run.agent, run.online, run.action, info = run.online_step(
            run.agent, run.online, run.mixing, transition, next_observation, train)
        observation = next_observation
        progress.online_step += 1
        session.logger.advance()
        if train and (progress.online_step % args.log_every == 0 or progress.online_step == warmup + 1):
            session.log_training(info, step)
        if progress.online_step % args.eval_every == 0 or progress.online_step == args.online_steps:
            run.evaluate("online", step)
        if progress.online_step == args.online_steps:
            break  # the final checkpoint follows
        if session.stop_requested and not episode_over:
            progress.episode, run.action = progress.episode + 1, None  # the resumed run starts a new episode
        if (episode_over or session.stop_requested) and session.checkpoint_due(step):
            run.checkpoint(step)


def main(args: Args) -> str | None:
    """Pre-train and fine-tune (or resume) one run; returns its run folder."""
    run = start_run(args)
    return args.resume if run is None else harness.run_phases(run, offline_phase, online_phase)


if __name__ == "__main__":
    run_cli(main, Args)
