"""Off2On: balanced replay over a pessimistic Q-ensemble, offline pre-training then fine-tuning.

Lee, Seo, Lee, Abbeel, Shin. "Offline-to-Online Reinforcement Learning via Balanced Replay and
Pessimistic Q-Ensemble", CoRL 2021, https://arxiv.org/abs/2107.00591. Follows the official code,
shlee94/Off2OnRL (commit 6f298fa): `rlkit/examples/ours.py` (networks, settings, N CQL agents),
`rlkit/rlkit/torch/sac/ours.py` (the losses, the density ratio, the priorities),
`rlkit/rlkit/core/batch_rl_algorithm.py` (epochs, batches, the first maximum priority),
`rlkit/rlkit/data_management/prioritized_replay_buffer.py` (sum tree) and `README.md` (the
command). docs/algorithms/off2on.md gives every preset's source and the measurements.

1. Pre-training, here: N = 5 CQL agents, member i from seed + 4 i, all N vmapped in one jitted
   update. The repository ships only trained checkpoints, so the recipe is the CQL authors' code
   (aviralkumar2907/CQL `rlkit/torch/sac/cql.py`, README commands): CQL(H), importance-sampled
   log-sum-exp over 10 random, policy and next-policy actions, alpha 5, no entropy in the target,
   40k behaviour-cloning updates, actor lr 1e-4; AntMaze: Lagrange alpha' (alpha gap - 5), rewards
   4 (r - 0.5). The members are saved at the phase switch (`pretrained.msgpack`) for `--pretrained`.
2. Fine-tuning (`ours.py`): SAC on the ensemble, no CQL term. Policy: the members' pre-tanh
   Gaussians moment-matched, std clipped to [e^-20, e^2]; evaluation tanh(mean). Critic i's target
   r + gamma mask (min of its target twins at (s', a') - alpha log pi(a'|s')), one a' for all;
   losses summed over members and twins; actor loss alpha log pi - mean over members of the twin
   min; alpha reset to 1; every loss from the pre-update parameters; lr 3e-4, tau 5e-3, batch 256.
3. Balanced replay: a sum tree over offline (priority 1) and online rows, fresh online rows at the
   running maximum (from M f / ((1 - f) 1000), f 0.75). The density ratio w(s, a) (rlkit ConcatMlp,
   ReLU output, last bias 1) learns on 256 offline and 256 of the newest 250k online rows, loss
   mean[-log(2 / (w_off + 1) + 1e-10)] - mean[log(2 w_on / (w_on + 1) + 1e-10)]; sampled rows get
   clip(w^(1/T) / (mean of w_off^(1/T) + 1e-10), 1e-3, 1e3), T 5.
4. Epochs of 1000 environment steps (new episodes each), then utd x 1000 updates (first epoch x 5).

Deviations (named, not hidden):
  * Members are JaxCQL-style networks (orthogonal init, log-std = learned multiplier x head +
    offset in [-20, 2]), not rlkit's fan-in TanhGaussianPolicy / Mlp.
  * Policy lr 3e-4 on every task (README command, code default); the paper picks it per task
    from a set, the choices unpublished. Set it with --actor-lr.
  * Evaluation: --eval-episodes (5) whole episodes; the official collector averages the complete
    episodes of 5000 steps, more than 5 where episodes end early (hopper, walker2d).
  * halfcheetah-medium-expert: 3x256 CQL agents (Appendix D.1; TASK_PRESETS), density net 2x256.
  * Offline rows keep their own next observations (the official loader pairs obs[i] with
    obs[i + 1], dropping timeouts); the RL buffer never overwrites; the moment-matched variance is
    floored at e^-40 (no NaN gradient).
  * PointMaze (ours, the no-argument run): 2x64, 5k pre-training updates, 10 epochs, rewards 4 (r - 0.5).

Usage:
  python algorithms/off2on.py                                  # local PointMaze: pre-train 5 CQL agents, fine-tune
  python algorithms/off2on.py --env halfcheetah-medium         # 5 x 1M CQL updates, then 250 epochs
  python algorithms/off2on.py --env halfcheetah-medium --pretrained runs/off2on__... --seed 1   # reuse its pre-training
  python algorithms/off2on.py --resume runs/off2on__...        # continue a stopped run
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tyro
from flax import serialization, struct
from flax.training.train_state import TrainState

if __package__ in (None, ""):  # run as `python algorithms/off2on.py`: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import buffers, checkpoint, datasets, priorities  # noqa: E402
from common import run as harness  # noqa: E402
from common.cli import check, run_cli  # noqa: E402

ALGORITHM = "off2on"
MEMBER_SEED_STRIDE = 4  # ours.py loads ./data/cql/{env}_seed{4 i + seed}
LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0
SQRT2 = float(np.sqrt(2.0))
PRETRAINED_FILE = "pretrained.msgpack"  # the members at the end of pre-training, for --pretrained
# Updates per jitted call between looks for a stop signal, so a stop reaches its checkpoint within
# seconds: 2 vmapped pre-training updates of the 5 members (about 0.6 s each at the locomotion
# preset on a 2-core CPU), 20 fine-tuning updates (about 60 ms each there). The random stream is
# the same however the updates are split.
STOP_CHECK_UPDATES = 2
STOP_CHECK_FINE_TUNING_UPDATES = 20


@tyro.conf.configure(tyro.conf.FlagConversionOff)  # every boolean flag takes a value: --progress False
@dataclasses.dataclass
class Args:
    """Off2On (Lee et al. 2021): N CQL agents pre-trained offline (vmapped), then fine-tuned as one
    pessimistic ensemble with balanced replay. Flags marked [preset] take the domain's preset unless
    given (the paper's: 2x256, 1M pre-training updates per agent, 250 epochs of 1000 steps; pointmaze,
    ours: 2x64, 5k updates, 10 epochs). An offline step is one (vmapped) pre-training update; an
    online step is one environment step."""

    # --- run ---
    env: str = "local/pointmaze/medium-30k-v0"
    """D4RL-style name (halfcheetah-medium), Minari id or local dataset id."""
    seed: int = 0
    """One seed for sampling, exploration and environment resets; pre-trained member i uses seed + 4 i."""
    pretrained: str | None = None
    """An off2on.py run folder whose pre-training finished: fine-tune its members instead of pre-training."""
    log_dir: str = "runs"
    """Root folder of run folders."""
    resume: str | None = None
    """Run folder to continue from its last checkpoint (its saved configuration is used)."""
    checkpoint_every: int = 50_000
    """Checkpoint every this many steps (online: at the next epoch end) and at the end."""
    checkpoint_minutes: float = 10.0
    """Also checkpoint once this many minutes have passed since the last checkpoint (online: at the next epoch end)."""
    progress: bool = True
    """Show a progress bar."""
    capture_video: bool = False
    """Record episode 0 of every evaluation as run_dir/videos/{phase}_{step}.mp4 (MUJOCO_GL=egl unless set; osmesa on CPUs)."""

    # --- schedule ---
    offline_steps: int | None = None
    """Pre-training updates of each CQL agent (all N in one vmapped update); 0 with --pretrained [preset]."""
    online_steps: int | None = None
    """Environment steps of fine-tuning, a multiple of --epoch-steps [preset]."""
    epoch_steps: int = 1000
    """Environment steps collected per epoch before its updates (num_expl_steps_per_train_loop)."""
    utd: int = 1
    """Updates per environment step: an epoch is followed by utd x epoch-steps updates (num_trains_per_train_loop)."""
    first_epoch_multiplier: int = 5
    """The first epoch does this many times the updates (README: 5; code default 10)."""
    batch_size: int = 256
    """RL minibatch size (rows drawn by priority), also of the pre-training updates."""
    eval_every: int | None = None
    """Evaluate every this many online steps (a multiple of --epoch-steps), at the start and at the end [preset: every epoch]."""
    offline_eval_every: int = 50_000
    """Evaluate the ensemble policy every this many pre-training updates, and at the end of pre-training."""
    eval_episodes: int | None = None
    """Episodes per evaluation (deterministic policy: tanh of the moment-matched mean) [preset]."""
    log_every: int = 1000
    """Write training scalars every this many offline updates; online, once per epoch (updates run in chunks of this many)."""

    # --- network ---
    ensemble_size: int = 5
    """N: CQL agents in the ensemble, each with twin Q-functions."""
    actor_hidden_dims: tuple[int, ...] | None = None
    """Hidden layer widths of each member's actor [preset]."""
    critic_hidden_dims: tuple[int, ...] | None = None
    """Hidden layer widths of each member's critics [preset]."""
    density_hidden_dims: tuple[int, ...] | None = None
    """Hidden layer widths of the density-ratio network [preset]."""

    # --- algorithm (fine-tuning) ---
    discount: float = 0.99
    """Discount factor gamma."""
    tau: float = 5e-3
    """Target network update rate."""
    actor_lr: float = 3e-4
    """Fine-tuning learning rate of the actors (ours.py --policy_lr; the paper tunes it per task, unpublished)."""
    critic_lr: float = 3e-4
    """Fine-tuning learning rate of the critics (Adam, fresh state)."""
    temp_lr: float = 3e-4
    """Learning rate of log alpha (ours.py: alpha_lr = policy_lr)."""
    density_lr: float = 3e-4
    """Learning rate of the density-ratio network."""
    init_temperature: float = 1.0
    """Entropy temperature alpha at the start of fine-tuning."""
    target_entropy: float | None = None
    """Target entropy of both phases; default -|A|."""
    density_batch_size: int = 256
    """Offline rows and online rows (each) in every density-ratio batch."""
    online_buffer_size: int = 250_000
    """The density ratio's online rows are drawn from the newest this many online rows."""
    priority_temperature: float = 5.0
    """T: priorities are w^(1/T), normalised by the offline batch's mean."""
    init_online_fraction: float = 0.75
    """f: the first maximum priority is M f / ((1 - f) 1000), M offline rows (README: 0.75; code default 0.5)."""

    # --- pre-training (CQL, aviralkumar2907/CQL) ---
    pretrain_actor_lr: float | None = None
    """Learning rate of the actors and the temperature in pre-training (CQL README: policy_lr 1e-4) [preset]."""
    pretrain_critic_lr: float = 3e-4
    """Learning rate of the critics and the Lagrange multiplier in pre-training (qf_lr)."""
    cql_alpha: float | None = None
    """Weight of the CQL penalty (min_q_weight) [preset]."""
    cql_n_actions: int = 10
    """n: random, policy and next-policy actions each, per state, in the CQL log-sum-exp."""
    cql_lagrange: bool | None = None
    """Tune the penalty weight alpha' so that alpha x gap stays at --lagrange-threshold (with_lagrange) [preset]."""
    lagrange_threshold: float = 5.0
    """CQL's lagrange_thresh (cql_antmaze_new.py)."""
    bc_steps: int | None = None
    """First pre-training actor updates trained by behaviour cloning (policy_eval_start) [preset]."""
    reward_scale: float | None = None
    """Rewards become reward_scale * r + reward_bias, in pre-training and fine-tuning [preset]."""
    reward_bias: float | None = None
    """See --reward-scale [preset]."""


# aviralkumar2907/CQL README MuJoCo command (cql_mujoco_new.py): min_q_weight 5, lagrange_thresh -1 (off),
# policy_eval_start 40000, policy_lr 1e-4, raw rewards
_CQL = dict(cql_alpha=5.0, cql_lagrange=False, bc_steps=40_000, pretrain_actor_lr=1e-4, reward_scale=1.0,
            reward_bias=0.0)
# rlkit/examples/ours.py: layer_size 256, num_hidden_layers 2 (members and weight_net), batch 256, 1000 steps
# and 1000 updates per epoch, num_eval_steps_per_epoch 5000 (5 episodes of max_path_length 1000), an
# evaluation each epoch; 250 evaluated epochs; the CQL checkpoints it loads are at 1M steps (actor_1000000.pt)
_PAPER = dict(_CQL, actor_hidden_dims=(256, 256), critic_hidden_dims=(256, 256), density_hidden_dims=(256, 256),
              offline_steps=1_000_000, online_steps=250_000, eval_every=1000, eval_episodes=5)
PRESETS: dict[str, dict[str, Any]] = {
    "locomotion": _PAPER,
    "default": _PAPER,  # the paper has no other domain: the same settings
    # CQL README AntMaze command (cql_antmaze_new.py): with_lagrange, lagrange_thresh 5; the loader's 4 (r - 0.5)
    "antmaze": dict(_PAPER, cql_lagrange=True, reward_scale=4.0, reward_bias=-2.0),
    # ours: the no-argument run (PRESET_NOTES)
    "pointmaze": dict(_PAPER, actor_hidden_dims=(64, 64), critic_hidden_dims=(64, 64), density_hidden_dims=(64, 64),
                      offline_steps=5000, online_steps=10_000, eval_every=2000, eval_episodes=20, bc_steps=1000,
                      reward_scale=4.0, reward_bias=-2.0),
}
# Per-task settings over the domain's (names that a dataset id contains): the paper's Appendix D.1,
# "3-layer MLPs" for the CQL agents of halfcheetah-medium-expert (ParallelMlp's num_hidden_layers == 3 branch)
TASK_PRESETS: dict[tuple[str, ...], dict[str, Any]] = {
    ("halfcheetah", "medium-expert"): dict(actor_hidden_dims=(256, 256, 256), critic_hidden_dims=(256, 256, 256)),
}
PRESET_NOTES: dict[str, str] = {
    "pointmaze": "ours, not a paper's: 5 CQL agents (alpha 5, 1k BC updates, rewards 4 (r - 0.5) as on AntMaze) on "
                 "2x64 networks pre-trained for 5k vmapped updates, then 10 epochs of 1000 steps, small enough for a "
                 "CPU (over 10 minutes on a 2-core CPU); the paper presets (2x256, 1M updates, 250 epochs) apply to "
                 "the paper datasets.",
}


def apply_preset(args: Args, domain: str, dataset_id: str | None = None) -> Args:
    """Fill every unset (None) field from the task's row of TASK_PRESETS, then the domain's preset."""
    task = next((values for names, values in TASK_PRESETS.items()
                 if dataset_id and all(name in dataset_id for name in names)), {})
    preset = {**PRESETS.get(domain, PRESETS["default"]), **task}
    return dataclasses.replace(args, **{name: value for name, value in preset.items() if getattr(args, name) is None})


def transform_rewards(rewards, args: Args):
    return args.reward_scale * rewards + args.reward_bias


# ---------------------------------------------------------------------------------------------
# Networks: each member a tanh-Gaussian actor and twin critics, the members' parameters stacked
# on a leading axis of N; the density-ratio network is rlkit's ConcatMlp.


class MLP(nn.Module):
    hidden_dims: tuple[int, ...]

    @nn.compact
    def __call__(self, x):
        for width in self.hidden_dims:
            x = nn.relu(nn.Dense(width, kernel_init=nn.initializers.orthogonal(SQRT2))(x))
        return x


class Critic(nn.Module):
    hidden_dims: tuple[int, ...]

    @nn.compact
    def __call__(self, observations, actions):
        x = MLP(self.hidden_dims)(jnp.concatenate([observations, actions], -1))
        return nn.Dense(1, kernel_init=nn.initializers.orthogonal(1e-2))(x).squeeze(-1)


class TwinCritic(nn.Module):
    """Two critics, parameters stacked on a leading axis; Q of shape (2, ...batch). Each critic
    runs on the rows flattened to one matrix, a loop over the two slices of the parameters: plain
    matrix products, which a CPU runs faster than the batched ones of a vmapped call (measured on
    the pointmaze preset's pre-training: about 30 % more updates per second)."""

    hidden_dims: tuple[int, ...]

    @nn.compact
    def __call__(self, observations, actions):
        twins = nn.vmap(Critic, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=None, out_axes=0,
                        axis_size=2)(self.hidden_dims)
        if self.is_initializing():
            return twins(observations, actions)
        batch_shape = actions.shape[:-1]
        observations = jnp.broadcast_to(observations, (*batch_shape, observations.shape[-1]))
        rows = observations.reshape(-1, observations.shape[-1]), actions.reshape(-1, actions.shape[-1])
        stacked = self.variables["params"][twins.name]
        return jnp.stack([Critic(self.hidden_dims, parent=None).apply(
            {"params": jax.tree_util.tree_map(lambda leaf: leaf[i], stacked)}, *rows) for i in range(2)]
                         ).reshape(2, *batch_shape)


class Actor(nn.Module):
    """The pre-tanh Gaussian: one Dense gives the mean and a head; log-std = multiplier x head +
    offset (both learned, from 1 and -1), clipped to [-20, 2]."""

    hidden_dims: tuple[int, ...]
    action_dim: int

    @nn.compact
    def __call__(self, observations):
        x = MLP(self.hidden_dims)(observations)
        mean, head = jnp.split(nn.Dense(2 * self.action_dim, kernel_init=nn.initializers.orthogonal(1e-2))(x), 2, -1)
        multiplier = self.param("log_std_multiplier", lambda _: jnp.ones(()))
        offset = self.param("log_std_offset", lambda _: -jnp.ones(()))
        return mean, jnp.clip(multiplier * head + offset, LOG_STD_MIN, LOG_STD_MAX)


class Scalar(nn.Module):
    """A learned positive scalar exp(x) (temperature, Lagrange multiplier), starting at `init_value`."""

    init_value: float = 1.0

    @nn.compact
    def __call__(self):
        return jnp.exp(self.param("log_value", lambda _: jnp.full((), jnp.log(self.init_value))))


class DensityRatio(nn.Module):
    """w(s, a) >= 0: rlkit's ConcatMlp with a ReLU on its output (ours.py `w_activation`). rlkit's
    init: `fanin_init` on hidden weights takes size[0] of a torch (out, in) weight, so the bound
    is 1/sqrt(out_features) (flax kernels are (in, out): "fan_out"); zero hidden biases; last
    kernel uniform(+-3e-3) and its bias filled with 1 (ours.py)."""

    hidden_dims: tuple[int, ...]

    @nn.compact
    def __call__(self, observations, actions):
        x = jnp.concatenate([observations, actions], -1)
        for width in self.hidden_dims:
            x = nn.relu(nn.Dense(width, kernel_init=nn.initializers.variance_scaling(1 / 3, "fan_out", "uniform"),
                                 bias_init=nn.initializers.zeros)(x))
        last = nn.Dense(1, kernel_init=lambda key, shape, dtype=jnp.float32: jax.random.uniform(
            key, shape, dtype, -3e-3, 3e-3), bias_init=nn.initializers.ones)(x)
        return nn.relu(last).squeeze(-1)


def sample_tanh_normal(key, mean, log_std, num: int | None = None):
    """Tanh-squashed Gaussian samples and their log-probabilities (summed over action dims);
    with `num`, `num` samples per row on a new leading axis."""
    noise = jax.random.normal(key, mean.shape if num is None else (num, *mean.shape))
    pre_tanh = mean + jnp.exp(log_std) * noise
    return jnp.tanh(pre_tanh), tanh_normal_log_prob(pre_tanh, noise, log_std)


def tanh_normal_log_prob(pre_tanh, noise, log_std):
    gaussian = -0.5 * noise**2 - log_std - 0.5 * jnp.log(2.0 * jnp.pi)
    log_det = 2.0 * (jnp.log(2.0) - pre_tanh - jax.nn.softplus(-2.0 * pre_tanh))  # log(1 - tanh^2), stably
    return (gaussian - log_det).sum(-1)


def log_prob_of(actions, mean, log_std):
    """log pi(a|s) of dataset actions (clipped to +-(1 - 1e-5): arctanh stays finite)."""
    pre_tanh = jnp.arctanh(jnp.clip(actions, -1.0 + 1e-5, 1.0 - 1e-5))
    return tanh_normal_log_prob(pre_tanh, (pre_tanh - mean) / jnp.exp(log_std), log_std)


@dataclasses.dataclass(frozen=True)
class Config:
    """Static settings the jitted functions close over (hashable: one compilation per setting)."""

    actor: Actor
    critic: TwinCritic  # one member's twin critics
    density: DensityRatio
    action_dim: int
    discount: float
    tau: float
    target_entropy: float
    batch_size: int
    cql_alpha: float
    cql_n_actions: int
    cql_lagrange: bool
    lagrange_threshold: float
    bc_steps: int
    priority_temperature: float
    density_batch_size: int
    online_buffer_size: int


def make_config(args: Args, action_dim: int) -> Config:
    target_entropy = -float(action_dim) if args.target_entropy is None else args.target_entropy
    return Config(Actor(tuple(args.actor_hidden_dims), action_dim), TwinCritic(tuple(args.critic_hidden_dims)),
                  DensityRatio(tuple(args.density_hidden_dims)), action_dim, args.discount, args.tau, target_entropy,
                  args.batch_size, args.cql_alpha, args.cql_n_actions, args.cql_lagrange, args.lagrange_threshold,
                  args.bc_steps, args.priority_temperature, args.density_batch_size, args.online_buffer_size)


# ---------------------------------------------------------------------------------------------
# Pre-training: CQL(H), aviralkumar2907/CQL rlkit/torch/sac/cql.py, one member; vmapped over N


class Member(struct.PyTreeNode):
    """One CQL agent (stacked: all N)."""

    actor: TrainState
    critic: TrainState
    target_critic_params: Any
    temperature: TrainState
    alpha_prime: TrainState
    key: jax.Array


def scalar_value(state: TrainState):
    return state.apply_fn({"params": state.params})


def create_member(args: Args, config: Config, seed: int, observation_dim: int, action_dim: int) -> Member:
    key, actor_key, critic_key = jax.random.split(jax.random.PRNGKey(seed), 3)
    observations, actions = jnp.zeros((1, observation_dim)), jnp.zeros((1, action_dim))
    actor = TrainState.create(apply_fn=config.actor.apply, params=config.actor.init(actor_key, observations)["params"],
                              tx=optax.adam(args.pretrain_actor_lr))
    critic_params = config.critic.init(critic_key, observations, actions)["params"]
    critic = TrainState.create(apply_fn=config.critic.apply, params=critic_params,
                               tx=optax.adam(args.pretrain_critic_lr))

    def scalar(lr):  # temperature and alpha' both start at 1 (log 0)
        return TrainState.create(apply_fn=Scalar().apply, params=Scalar().init(key)["params"], tx=optax.adam(lr))

    return Member(actor, critic, jax.tree_util.tree_map(jnp.copy, critic_params), scalar(args.pretrain_actor_lr),
                  scalar(args.pretrain_critic_lr), key)


def cql_td_target(key, batch, actor_params, target_params, config: Config):
    """r + gamma mask min(tQ1, tQ2)(s', a'), a' ~ pi(s'): no entropy term (deterministic_backup)."""
    next_actions, _ = sample_tanh_normal(key, *config.actor.apply({"params": actor_params}, batch["next_observations"]))
    next_q = config.critic.apply({"params": target_params}, batch["next_observations"], next_actions).min(0)
    return batch["rewards"] + config.discount * batch["masks"] * next_q


def cql_gap(key, batch, actor_params, critic_params, data_q, config: Config):
    """Per critic: logsumexp over n random, n policy (at s) and n next-policy (from s') actions of Q
    minus the proposal's log-density (uniform 0.5^|A|, the policy's), minus Q(s, a_data); batch-mean."""
    random_key, policy_key, next_key = jax.random.split(key, 3)
    n, observations = config.cql_n_actions, batch["observations"]
    random_actions = jax.random.uniform(random_key, (n, observations.shape[0], config.action_dim), minval=-1, maxval=1)
    policy_actions, policy_log_probs = sample_tanh_normal(
        policy_key, *config.actor.apply({"params": actor_params}, observations), n)
    next_actions, next_log_probs = sample_tanh_normal(
        next_key, *config.actor.apply({"params": actor_params}, batch["next_observations"]), n)
    q = config.critic.apply({"params": critic_params}, observations,
                            jnp.concatenate([random_actions, next_actions, policy_actions]))  # (2, 3n, B)
    log_densities = jnp.concatenate([jnp.full((n, observations.shape[0]), config.action_dim * jnp.log(0.5)),
                                     next_log_probs, policy_log_probs])
    return (jax.nn.logsumexp(q - log_densities, axis=1) - data_q).mean(-1)


def cql_critic_loss(critic_params, key, batch, target_q, actor_params, alpha_prime, config: Config):
    """Squared TD error plus the penalty, summed over the twins: alpha gap, or with Lagrange
    alpha' (alpha gap - threshold)."""
    data_q = config.critic.apply({"params": critic_params}, batch["observations"], batch["actions"])
    gap = cql_gap(key, batch, actor_params, critic_params, data_q, config)
    penalty = alpha_prime * (config.cql_alpha * gap - config.lagrange_threshold) if config.cql_lagrange \
        else config.cql_alpha * gap
    return ((data_q - target_q) ** 2).mean(-1).sum() + penalty.sum(), (gap, data_q.mean())


def pretrain_actor_loss(actor_params, key, batch, critic_params, temperature, behaviour_cloning, config: Config):
    """alpha log pi(a|s) - min(Q1, Q2)(s, a), a ~ pi(s); during the warm start log pi(a_data|s)
    replaces the Q term; and the entropy."""
    mean, log_std = config.actor.apply({"params": actor_params}, batch["observations"])
    actions, log_probs = sample_tanh_normal(key, mean, log_std)
    q = config.critic.apply({"params": critic_params}, batch["observations"], actions).min(0)
    objective = jnp.where(behaviour_cloning, log_prob_of(batch["actions"], mean, log_std), q)
    return (temperature * log_probs - objective).mean(), -log_probs.mean()


def temperature_loss(temperature_params, entropy, target_entropy):
    """-log alpha (log pi + target entropy), with the batch-mean log pi = -entropy."""
    return temperature_params["log_value"] * (entropy - target_entropy)


def cql_update(member: Member, batch, config: Config):
    """One CQL step of critics, alpha', actor and temperature, all from the pre-update parameters."""
    key, target_key, cql_key, actor_key = jax.random.split(member.key, 4)
    temperature, alpha_prime = scalar_value(member.temperature), jnp.clip(scalar_value(member.alpha_prime), 0, 1e6)
    target_q = cql_td_target(target_key, batch, member.actor.params, member.target_critic_params, config)
    (loss, (gap, q)), critic_grads = jax.value_and_grad(cql_critic_loss, has_aux=True)(
        member.critic.params, cql_key, batch, target_q, member.actor.params, alpha_prime, config)
    prime_grads = jax.grad(lambda params: -0.5 * (jnp.clip(member.alpha_prime.apply_fn({"params": params}), 0, 1e6) * (
        config.cql_alpha * jax.lax.stop_gradient(gap) - config.lagrange_threshold)).sum())(member.alpha_prime.params)
    (actor_value, entropy), actor_grads = jax.value_and_grad(pretrain_actor_loss, has_aux=True)(
        member.actor.params, actor_key, batch, member.critic.params, temperature,
        member.actor.step < config.bc_steps, config)
    temp_grads = jax.grad(temperature_loss)(member.temperature.params, entropy, config.target_entropy)
    critic = member.critic.apply_gradients(grads=critic_grads)
    member = member.replace(
        actor=member.actor.apply_gradients(grads=actor_grads), critic=critic, key=key,
        target_critic_params=optax.incremental_update(critic.params, member.target_critic_params, config.tau),
        temperature=member.temperature.apply_gradients(grads=temp_grads),
        alpha_prime=member.alpha_prime.apply_gradients(grads=prime_grads) if config.cql_lagrange
        else member.alpha_prime)
    return member, {"critic_loss": loss, "q": q, "cql_gap": gap.mean(), "actor_loss": actor_value, "entropy": entropy,
                    "temperature": temperature, "alpha_prime": alpha_prime}


def train_member(member: Member, offline: buffers.Buffer, num_updates, config: Config):
    """`num_updates` (traced) CQL updates of one member, each on its own uniform offline minibatch."""
    def step(_, carry):
        member, _ = carry
        key, sample_key = jax.random.split(member.key)
        return cql_update(member.replace(key=key), buffers.sample(offline, sample_key, (config.batch_size,)), config)

    info = jax.tree_util.tree_map(lambda shape: jnp.zeros(shape.shape, shape.dtype),
                                  jax.eval_shape(lambda m: step(0, (m, None)), member)[1])
    return jax.lax.fori_loop(0, num_updates, step, (member, info))


def pretrain(members: Member, offline: buffers.Buffer, num_updates, config: Config):
    """All N members at once: train_member vmapped (each samples its own minibatches); one jitted call."""
    return jax.vmap(lambda member: train_member(member, offline, num_updates, config))(members)


# ---------------------------------------------------------------------------------------------
# Fine-tuning state


class Agent(struct.PyTreeNode):
    """The fine-tuning state: N actors and N twin critics (stacked), their targets, alpha, w."""

    actor: TrainState
    critic: TrainState
    target_critic_params: Any
    temperature: TrainState
    density: TrainState
    key: jax.Array


class Replay(struct.PyTreeNode):
    """The online rows and the sum tree over offline rows (0 .. M - 1) then online rows (M ..)."""

    online: buffers.Buffer
    tree: priorities.SumTree


def create_members(args: Args, config: Config, observation_dim: int, action_dim: int) -> Member:
    """N CQL agents, member i from seed + 4 i, every leaf stacked on axis 0."""
    members = harness.stack([create_member(args, config, args.seed + MEMBER_SEED_STRIDE * i, observation_dim,
                                           action_dim) for i in range(args.ensemble_size)])
    return harness.canonical(harness.strongly_typed(members),
                     ("members", config, args.pretrain_actor_lr, args.pretrain_critic_lr))


def fine_tuning_agent(actor_params, critic_params, args: Args, config: Config, observation_dim: int,
                      action_dim: int) -> Agent:
    """The pre-trained members' parameters (stacked), targets copied from them (ours.py loads the
    critics and copies them into the targets), fresh Adam states, alpha reset, a fresh w."""
    key, density_key = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(args.seed), 1))
    observations, actions = jnp.zeros((1, observation_dim)), jnp.zeros((1, action_dim))
    actor = TrainState.create(apply_fn=config.actor.apply, params=actor_params, tx=optax.adam(args.actor_lr))
    critic = TrainState.create(apply_fn=config.critic.apply, params=critic_params, tx=optax.adam(args.critic_lr))
    temperature_module = Scalar(args.init_temperature)
    temperature = TrainState.create(apply_fn=temperature_module.apply, params=temperature_module.init(key)["params"],
                                    tx=optax.adam(args.temp_lr))
    density = TrainState.create(apply_fn=config.density.apply,
                                params=config.density.init(density_key, observations, actions)["params"],
                                tx=optax.adam(args.density_lr))
    agent = Agent(actor, critic, jax.tree_util.tree_map(jnp.copy, critic_params), temperature, density, key)
    return harness.canonical(harness.strongly_typed(agent),
                     ("agent", config, args.actor_lr, args.critic_lr, args.temp_lr, args.density_lr))


# ---------------------------------------------------------------------------------------------
# The ensemble policy and the fine-tuning losses


def member_gaussians(actor_params, observations, config: Config):
    """Each member's pre-tanh Gaussian: means and log-stds, (N, ..., |A|)."""
    return jax.vmap(lambda params: config.actor.apply({"params": params}, observations))(actor_params)


def moment_match(means, log_stds):
    """One Gaussian with the mixture's first two moments: mean of the means; variance = mean of
    (mu^2 + sigma^2) - mean^2; std clipped to [e^-20, e^2] (ParallelTanhGaussianPolicy)."""
    mean = means.mean(0)
    variance = (means**2 + jnp.exp(2.0 * log_stds)).mean(0) - mean**2
    std = jnp.sqrt(jnp.clip(variance, np.exp(2 * LOG_STD_MIN), np.exp(2 * LOG_STD_MAX)))
    return mean, std


def policy_sample(key, actor_params, observations, config: Config):
    """A reparameterised tanh-Gaussian sample of the moment-matched policy and its log-probability."""
    mean, std = moment_match(*member_gaussians(actor_params, observations, config))
    return sample_tanh_normal(key, mean, jnp.log(std))


def member_q(critic_params, observations, actions, config: Config):
    """Q of every member's twin critics, (N, 2, batch)."""
    return jax.vmap(lambda params: config.critic.apply({"params": params}, observations, actions))(critic_params)


def td_target(key, batch, actor_params, target_params, temperature, config: Config):
    """Per member i, (N, B): r + gamma * mask * (min(tQ1_i, tQ2_i)(s', a') - alpha log pi(a'|s')),
    one a' ~ pi(s') shared by all members."""
    next_actions, next_log_probs = policy_sample(key, actor_params, batch["next_observations"], config)
    next_q = member_q(target_params, batch["next_observations"], next_actions, config).min(1)
    return batch["rewards"] + config.discount * batch["masks"] * (next_q - temperature * next_log_probs)


def critic_loss(critic_params, batch, target_q, config: Config):
    """Squared TD errors, batch-mean, summed over the members and their twin critics."""
    q = member_q(critic_params, batch["observations"], batch["actions"], config)
    return ((q - target_q[:, None]) ** 2).mean(-1).sum(), q.mean()


def actor_loss(actor_params, key, batch, critic_params, temperature, config: Config):
    """alpha log pi(a|s) - mean over members of min(Q1_i, Q2_i)(s, a), a ~ pi(s); and the entropy."""
    actions, log_probs = policy_sample(key, actor_params, batch["observations"], config)
    q = member_q(critic_params, batch["observations"], actions, config).min(1).mean(0)
    return (temperature * log_probs - q).mean(), -log_probs.mean()


def density_loss(density_params, offline_batch, online_batch, config: Config):
    """The f-divergence bound whose optimum is w = d_online / d_offline (ours.py's weight_loss);
    returns the loss and w on the offline rows."""
    w_offline = config.density.apply({"params": density_params}, offline_batch["observations"],
                                     offline_batch["actions"])
    w_online = config.density.apply({"params": density_params}, online_batch["observations"], online_batch["actions"])
    offline_term = -jnp.log(2.0 / (w_offline + 1.0) + 1e-10)
    online_term = jnp.log(2.0 * w_online / (w_online + 1.0) + 1e-10)
    return (offline_term - online_term).mean(), (w_offline, w_online)


def new_priorities(w_rl, w_offline, temperature: float):
    """clip(w^(1/T) / (mean of w_off^(1/T) + 1e-10), 1e-3, 1e3)."""
    return jnp.clip(w_rl ** (1.0 / temperature) / ((w_offline ** (1.0 / temperature)).mean() + 1e-10), 1e-3, 1e3)


def update(agent: Agent, offline: buffers.Buffer, replay: Replay, config: Config):
    """One Off2On update: three batches (by priority; uniform offline and uniform online for w),
    every loss from the pre-update parameters, then all steps, the Polyak update of the targets
    and the new priorities of the sampled rows."""
    key, rl_key, offline_key, online_key, target_key, actor_key = jax.random.split(agent.key, 6)
    indices, _ = priorities.sample(replay.tree, rl_key, config.batch_size)
    batch = buffers.gather_union(offline, replay.online, indices)  # index < M: offline row; else online row - M
    offline_batch = buffers.sample(offline, offline_key, (config.density_batch_size,))
    online_batch = buffers.sample_newest(replay.online, online_key, config.density_batch_size,
                                         config.online_buffer_size)

    (w_loss, (w_offline, w_online)), density_grads = jax.value_and_grad(density_loss, has_aux=True)(
        agent.density.params, offline_batch, online_batch, config)
    w_rl = config.density.apply({"params": agent.density.params}, batch["observations"], batch["actions"])
    priority = new_priorities(w_rl, w_offline, config.priority_temperature)

    temperature = scalar_value(agent.temperature)
    target_q = td_target(target_key, batch, agent.actor.params, agent.target_critic_params, temperature, config)
    (loss, q), critic_grads = jax.value_and_grad(critic_loss, has_aux=True)(agent.critic.params, batch, target_q,
                                                                            config)
    (actor_value, entropy), actor_grads = jax.value_and_grad(actor_loss, has_aux=True)(
        agent.actor.params, actor_key, batch, agent.critic.params, temperature, config)
    temp_loss, temp_grads = jax.value_and_grad(temperature_loss)(agent.temperature.params, entropy,
                                                                     config.target_entropy)
    critic = agent.critic.apply_gradients(grads=critic_grads)
    agent = agent.replace(actor=agent.actor.apply_gradients(grads=actor_grads), critic=critic,
                          target_critic_params=optax.incremental_update(critic.params, agent.target_critic_params,
                                                                        config.tau),
                          temperature=agent.temperature.apply_gradients(grads=temp_grads),
                          density=agent.density.apply_gradients(grads=density_grads), key=key)
    replay = replay.replace(tree=priorities.update(replay.tree, indices, priority))
    info = {"critic_loss": loss, "q": q, "actor_loss": actor_value, "entropy": entropy, "temperature": temperature,
            "temperature_loss": temp_loss, "density_loss": w_loss, "w_offline": w_offline.mean(),
            "w_online": w_online.mean(), "w_offline_zero_share": (w_offline == 0).mean(), "priority": priority.mean(),
            "priority_max": priority.max(), "max_priority": replay.tree.max_priority,
            "online_share": (indices >= offline.capacity).mean()}
    return agent, replay, info


def train(agent: Agent, offline: buffers.Buffer, replay: Replay, num_updates, config: Config):
    """`num_updates` (traced: one compilation for any) updates in a jitted loop; the last one's metrics."""
    def step(carry):
        agent, replay, _ = carry
        return update(agent, offline, replay, config)

    info_shapes = jax.eval_shape(step, (agent, replay, None))[2]
    info = jax.tree_util.tree_map(lambda shape: jnp.zeros(shape.shape, shape.dtype), info_shapes)
    return jax.lax.fori_loop(0, num_updates, lambda _, carry: step(carry), (agent, replay, info))


def insert_online(replay: Replay, offline_size: int, start, count: int) -> Replay:
    """Give the `count` online rows written from online row `start` the running maximum priority."""
    indices = offline_size + start + jnp.arange(count)
    return replay.replace(tree=priorities.insert(replay.tree, indices))


def act(agent: Agent, observation, config: Config):
    """A stochastic action of the moment-matched policy; the key advances inside the agent."""
    key, action_key = jax.random.split(agent.key)
    action, _ = policy_sample(action_key, agent.actor.params, observation, config)
    return agent.replace(key=key), action


@functools.partial(jax.jit, static_argnames=("actor",))
def ensemble_mean_action(actor_params, observations, actor: Actor):
    means, _ = jax.vmap(lambda params: actor.apply({"params": params}, observations))(actor_params)
    return jnp.tanh(means.mean(0))


def deterministic_policy(actor: Actor) -> Callable:
    """The evaluation policy: tanh of the moment-matched mean (the mean of the members' means)."""
    return functools.partial(ensemble_mean_action, actor=actor)


# ---------------------------------------------------------------------------------------------
# Flags and data


RULES: list[harness.Rule] = [
    *[(name, harness.at_least(1), "must be >= 1") for name in (
        "ensemble_size", "epoch_steps", "first_epoch_multiplier", "offline_eval_every", "density_batch_size",
        "online_buffer_size", "cql_n_actions")],
    *[(name, harness.at_least(0), "must be >= 0") for name in ("bc_steps", "cql_alpha")],
    ("init_online_fraction", lambda value: 0.0 <= value < 1.0, "must lie in [0, 1)"),
    *[(name, harness.positive, "must be positive") for name in (
        "actor_lr", "critic_lr", "temp_lr", "density_lr", "init_temperature", "priority_temperature",
        "pretrain_actor_lr", "pretrain_critic_lr")],
    *[(name, harness.widths, "must be positive widths") for name in (
        "actor_hidden_dims", "critic_hidden_dims", "density_hidden_dims")],
    ("discount", lambda value: 0.0 < value < 1.0, "must lie in (0, 1)"),
]


def validate(args: Args) -> None:
    """Every flag check that needs no data; runs before anything is loaded or compiled."""
    harness.check_flags(args, RULES + harness.RUN_RULES)
    if args.online_steps is not None:
        check(args.online_steps % args.epoch_steps == 0,
              f"--online-steps {args.online_steps} must be a multiple of --epoch-steps {args.epoch_steps}.")
    if args.eval_every is not None:
        check(args.eval_every % args.epoch_steps == 0,
              f"--eval-every {args.eval_every} must be a multiple of --epoch-steps {args.epoch_steps} "
              f"(evaluations fall between epochs).")
    if args.pretrained:
        check(not args.offline_steps, "--pretrained replaces the pre-training: drop --offline-steps.")


# What a --pretrained run's members fix; the new run takes them from that run.
MEMBER_FIELDS = ("ensemble_size", "actor_hidden_dims", "critic_hidden_dims", "reward_scale", "reward_bias",
                 "pretrain_actor_lr", "pretrain_critic_lr", "cql_alpha", "cql_n_actions", "cql_lagrange",
                 "lagrange_threshold", "bc_steps")


def read_pretrained(args: Args, task: datasets.Task) -> tuple[Args, dict[str, Any]]:
    """Args with the member settings of the --pretrained off2on.py run (same dataset, pre-training
    finished) and no pre-training; and its saved members' parameters."""
    source = args.pretrained
    run_args, record = harness.read_run_config(source, Args, ALGORITHM)
    check(record.get("dataset_id") == task.dataset_id,
          f"--pretrained {source} was trained on {record.get('dataset_id')}, not {task.dataset_id} (--env).")
    check(os.path.isfile(os.path.join(source, PRETRAINED_FILE)),
          f"--pretrained {source} has not finished its pre-training; continue it first: "
          f"{harness.resume_command(ALGORITHM, source)}")
    args = dataclasses.replace(harness.take_pretrained(args, run_args, MEMBER_FIELDS), offline_steps=0)
    return args, checkpoint.load(os.path.join(source, PRETRAINED_FILE))


def load_offline_data(task: datasets.Task, dataset, args: Args) -> dict[str, np.ndarray]:
    """The dataset as training rows: rewards transformed, masks = 1 - terminated."""
    transitions = datasets.dataset_transitions(dataset, task.domain)
    return {"observations": transitions["observations"],
            "actions": datasets.clip_actions(transitions["actions"], dataset.action_space),
            "rewards": transform_rewards(transitions["rewards"], args).astype(np.float32),
            "next_observations": transitions["next_observations"],
            "masks": 1.0 - transitions["terminated"].astype(np.float32)}


# ---------------------------------------------------------------------------------------------
# Training


@dataclasses.dataclass
class Run:
    """One training run: its session, the agent (the N stacked CQL members while pre-training,
    then the fine-tuning Agent), the data and the jitted calls."""

    args: Args
    task: datasets.Task
    session: harness.Session
    env: Any
    offline: buffers.Buffer
    replay: Replay
    agent: Any
    config: Config
    dims: tuple[int, int]
    policy: Callable
    pretrain: Callable
    train: Callable
    act: Callable
    insert: Callable

    def evaluate(self, phase: str, step: int) -> None:
        self.session.evaluate(lambda observations: self.policy(self.agent.actor.params, observations), phase, step)

    def checkpoint(self, step: int) -> None:
        self.session.save(step, self.agent, self.replay.online, priorities=np.asarray(self.replay.tree.leaves),
                          max_priority=float(self.replay.tree.max_priority))

    def reset_env(self) -> np.ndarray:
        return self.env.reset(seed=self.session.reset_seed())[0]


EXTRA_KEYS = ("priorities", "max_priority")


# Jitted once per process for each static configuration (Config is hashable), so runs started one
# after another in one process (tests, sweeps) share their compilations.
_pretrain = jax.jit(pretrain, static_argnames=("config",), donate_argnums=0)
_train = jax.jit(train, static_argnames=("config",), donate_argnums=(0, 2))
_act = jax.jit(act, static_argnames=("config",), donate_argnums=0)
_insert = jax.jit(insert_online, static_argnames=("offline_size", "count"), donate_argnums=0)


def make_step_functions(args: Args, config: Config, offline_size: int):
    return (lambda members, offline, n: _pretrain(members, offline, n, config=config),
            lambda agent, offline, replay, n: _train(agent, offline, replay, n, config=config),
            lambda agent, observation: _act(agent, observation, config=config),
            lambda replay, start: _insert(replay, start=start, offline_size=offline_size, count=args.epoch_steps))


def with_params(members: Member, saved: dict[str, Any]) -> Member:
    """The members with the actors and critics of a PRETRAINED_FILE."""
    return members.replace(**{name: getattr(members, name).replace(params=jax.tree_util.tree_map(
        jnp.asarray, serialization.from_state_dict(getattr(members, name).params, saved[name])))
        for name in ("actor", "critic")})


def start_run(args: Args) -> Run | None:
    """Check flags, load data, build envs and agent, restore a checkpoint when resuming.

    Returns None when the run to resume has already finished.
    """
    args, run_dir, saved = harness.start(args, ALGORITHM, validate, extra_keys=EXTRA_KEYS)
    task = datasets.resolve(args.env)
    check(task.dataset_id is not None,
          f"--env {args.env} is an environment without a dataset; {ALGORITHM}.py needs the offline data: name a dataset.")
    pretrained = None
    if args.pretrained and run_dir is None:
        args, pretrained = read_pretrained(args, task)
    args = apply_preset(args, task.domain, task.dataset_id)
    if run_dir is None and task.domain in PRESET_NOTES and not args.pretrained:
        print(f"Preset {task.domain} ({ALGORITHM}): {PRESET_NOTES[task.domain]}", flush=True)
    validate(args)
    dataset = datasets.load_dataset(task)
    make_env = datasets.env_factory(task, dataset)
    env = make_env()
    dims = observation_dim, action_dim = env.observation_space.shape[0], env.action_space.shape[0]
    if args.target_entropy is None:
        args = dataclasses.replace(args, target_entropy=-float(action_dim))
    offline_rows = load_offline_data(task, dataset, args)
    check(offline_rows["observations"].shape[1] == observation_dim,
          f"dataset observations have {offline_rows['observations'].shape[1]} dims, the env {observation_dim}.")
    offline = buffers.from_arrays(offline_rows)
    offline_size = offline.capacity
    run_dir = run_dir or harness.create_run_dir(args, ALGORITHM)

    config = make_config(args, action_dim)
    online = buffers.empty_like({key: value[0] for key, value in offline_rows.items()}, max(args.online_steps, 1))
    tree = priorities.from_priorities(np.ones(offline_size, np.float32), offline_size + online.capacity,
                                      offline_size * args.init_online_fraction / ((1 - args.init_online_fraction) * 1000))
    agent = create_members(args, config, *dims)
    if pretrained is not None:
        agent = with_params(agent, pretrained)
    if saved is not None and "alpha_prime" not in saved["agent"]:  # saved while fine-tuning: restore into an Agent
        agent = fine_tuning_agent(agent.actor.params, agent.critic.params, args, config, *dims)
    progress, elapsed = harness.Progress(next_checkpoint=args.checkpoint_every), None
    if saved is not None:
        agent, online, progress, elapsed = harness.restore_checkpoint(saved, run_dir, agent, online)
        leaves = np.asarray(saved["priorities"], np.float32)
        check(leaves.shape == (tree.capacity,), f"checkpoint in {run_dir} does not match this run's buffer sizes.")
        tree = priorities.from_priorities(leaves, max_priority=float(saved["max_priority"]))
    if progress.finished:
        print(f"{run_dir} has already finished.")
        return None
    session = harness.open_session(ALGORITHM, args, task, run_dir, progress, elapsed, dims, make_env,
                                   datasets.scoring_for(dataset, task.domain))
    return Run(args, task, session, env, offline, Replay(online, tree), agent, config, dims,
               deterministic_policy(config.actor), *make_step_functions(args, config, offline_size))


def offline_phase(run: Run) -> None:
    """The N CQL agents' pre-training in jitted chunks of vmapped updates, evaluating the
    ensemble policy every `offline_eval_every` updates."""
    args, progress, session = run.args, run.session.progress, run.session
    if progress.offline_step == 0 and args.offline_steps > 0 and not session.evaluated_at(0):
        run.evaluate("offline", 0)

    def chunk(num_updates: int):
        run.agent, info = run.pretrain(run.agent, run.offline, num_updates)
        return info

    while progress.offline_step < args.offline_steps:
        next_eval = (progress.offline_step // args.offline_eval_every + 1) * args.offline_eval_every
        next_log = (progress.offline_step // args.log_every + 1) * args.log_every
        wanted = min(next_eval, args.offline_steps, next_log) - progress.offline_step
        done, info = session.updates(wanted, chunk, STOP_CHECK_UPDATES)
        progress.offline_step += done
        session.logger.advance(done)
        if done < wanted:  # a stop: checkpoint now, mid-chunk (the resumed run finishes the chunk)
            run.checkpoint(progress.offline_step)
        session.log_training({f"pretrain_{name}": value.mean() for name, value in info.items()},
                             progress.offline_step)
        if progress.offline_step == args.offline_steps:
            break  # the phase-end evaluation opens the online phase
        if progress.offline_step % args.offline_eval_every == 0:
            run.evaluate("offline", progress.offline_step)
        if session.checkpoint_due(progress.offline_step):
            run.checkpoint(progress.offline_step)


def collect_epoch(run: Run) -> dict[str, np.ndarray]:
    """`epoch_steps` environment steps of the stochastic ensemble policy, starting a new episode;
    the episode running at the end is cut (rlkit's path collector starts afresh each epoch)."""
    args, progress, session, base = run.args, run.session.progress, run.session, run.args.offline_steps
    rows = {key: [] for key in ("observations", "actions", "rewards", "next_observations", "masks")}
    observation = None
    for _ in range(args.epoch_steps):
        if observation is None:
            observation, episode_return = run.reset_env(), 0.0
        run.agent, action = run.act(run.agent, observation)
        action = np.asarray(action)
        next_observation, reward, terminated, truncated, _ = run.env.step(action)
        episode_return += reward
        for key, value in (("observations", observation), ("actions", action),
                           ("rewards", transform_rewards(reward, args)), ("next_observations", next_observation),
                           ("masks", 1.0 - terminated)):
            rows[key].append(value)
        progress.online_step += 1
        session.logger.advance()
        observation = next_observation
        if terminated or truncated:
            progress.episode += 1
            session.logger.scalars({"train/episode_return": episode_return}, base + progress.online_step)
            observation = None
    if observation is not None:
        progress.episode += 1
    return {key: np.asarray(value, np.float32) for key, value in rows.items()}


def start_fine_tuning(run: Run) -> None:
    """The phase switch: the pre-trained members are saved in the run folder (for --pretrained)
    and become the ensemble (fresh optimizers, alpha reset, a fresh density-ratio network)."""
    members = run.agent
    checkpoint.save(os.path.join(run.session.run_dir, PRETRAINED_FILE),
                    {name: serialization.to_state_dict(jax.device_get(getattr(members, name).params))
                     for name in ("actor", "critic")})
    run.agent = fine_tuning_agent(members.actor.params, members.critic.params, run.args, run.config, *run.dims)


def online_phase(run: Run) -> None:
    """Epoch by epoch: collect, insert with the running maximum priority, then the epoch's updates
    in pieces of STOP_CHECK_FINE_TUNING_UPDATES. A stop during the collection waits for its end
    (the epoch's rows are kept); a stop between pieces saves the owed updates, which a resumed run
    does first."""
    args, progress, session, base = run.args, run.session.progress, run.session, run.args.offline_steps
    if not isinstance(run.agent, Agent):
        start_fine_tuning(run)
    if progress.online_step == 0 and not progress.pending_updates and not session.evaluated_at(base):
        run.evaluate("online" if args.offline_steps == 0 else "offline", base)
    if session.stop_requested and progress.online_step == 0 and not progress.pending_updates:
        run.checkpoint(base)  # before the first action moves the agent (an owed evaluation is of this one)
    session.logger.new_phase("online")

    def chunk(num_updates: int):
        run.agent, run.replay, info = run.train(run.agent, run.offline, run.replay, num_updates)
        return info

    while progress.online_step < args.online_steps or progress.pending_updates:
        if not progress.pending_updates:
            epoch = progress.online_step // args.epoch_steps
            start = int(run.replay.online.cursor)
            rows = collect_epoch(run)
            online = buffers.insert_rows(run.replay.online, rows)
            run.replay = run.insert(run.replay.replace(online=online), jnp.int32(start))
            progress.pending_updates = args.utd * args.epoch_steps * (args.first_epoch_multiplier if epoch == 0 else 1)
        step = base + progress.online_step
        done, info = session.updates(progress.pending_updates, chunk, STOP_CHECK_FINE_TUNING_UPDATES)
        progress.pending_updates -= done
        if progress.pending_updates:  # a stop before or between pieces
            run.checkpoint(step)  # ends the run; the rest of the epoch's updates are owed
        session.log_training(info, step)
        if progress.online_step == args.online_steps:
            run.evaluate("online", step)
            break
        if progress.online_step % args.eval_every == 0:
            run.evaluate("online", step)
        if session.checkpoint_due(step):
            run.checkpoint(step)


def main(args: Args) -> str | None:
    """Train (or resume) one run; returns its run folder."""
    run = start_run(args)
    return args.resume if run is None else harness.run_phases(run, offline_phase, online_phase)


if __name__ == "__main__":
    run_cli(main, Args)
