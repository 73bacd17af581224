"""CQL: Conservative Q-Learning, offline pre-training then online fine-tuning, in one file.

Kumar, Zhou, Tucker, Levine. "Conservative Q-Learning for Offline Reinforcement Learning",
NeurIPS 2020, https://arxiv.org/abs/2006.04779. Two official codes, picked by `--recipe`:
  * rlkit: the authors' code, aviralkumar2907/CQL (`d4rl/rlkit/torch/sac/cql.py`,
    `d4rl/examples/cql_mujoco_new.py`, `d4rl/examples/cql_antmaze_new.py`, `README.md`);
  * jaxcql: the JAX CQL that Cal-QL builds on, nakamotoo/Cal-QL (`JaxCQL/conservative_sac.py`,
    `JaxCQL/model.py`, `JaxCQL/conservative_sac_main.py` run with `--enable_calql=False`), which
    is how the Cal-QL paper ran its CQL baseline; tinkoff-ai/CORL's `algorithms/finetune/cql.py`
    implements the same variant in PyTorch (Lagrange form, alpha' start, max-target backup), and
    CORL's CQL fine-tuning numbers come from it.
They differ in the Lagrange form, the max-target backup and the behaviour-cloning warm start
(below); the networks and the online fine-tuning loop are JaxCQL's in both.
`diff algorithms/cql.py algorithms/calql.py` shows everything Cal-QL changes.

SAC with twin Q-functions (as one vmapped ensemble) whose TD loss is joined by the CQL(H)
penalty, per critic:

    alpha_cql * ( T * logsumexp_j(Q(s, a_j) / T) - Q(s, a_data) ),

the log-sum-exp estimated by importance sampling over n=10 uniform random actions (density
0.5^|A|), n actions of the current policy at s and n actions of the policy at s' (both
evaluated at s, each Q minus its log-probability).

  * Lagrange tuning (`--cql-lagrange`), alpha' = exp(log alpha') clipped to [0, 1e6] and
    trained (learning rate: the critics') to hold the gap at its target. rlkit: the penalty is
    alpha' * (alpha_cql * gap - `--lagrange-threshold`), log alpha' starting at 0
    (`rlkit/torch/sac/cql.py`, `with_lagrange`). jaxcql: alpha' * alpha_cql * (gap - `--cql-target-action-gap`), log alpha'
    starting at 1 (`conservative_sac.py`, `cql_lagrange`), Cal-QL's form.
  * Max-target backup (`--max-target-backup`): n next actions are sampled. rlkit's
    (`max_q_backup`): the min over target critics of each critic's max over them, with no
    entropy term. jaxcql's (`cql_max_target_backup`): the max over them of the min over target
    critics (with that action's log-probability, for `--backup-entropy`).
  * Behaviour-cloning warm start (`--bc-steps`): for the first updates the actor minimises
    alpha * log pi(a~|s) - log pi(a_data|s) (rlkit's `policy_eval_start`, 40k; jaxcql has none).
  * No entropy term in the TD target by default (`deterministic_backup` / `backup_entropy` off).
  * Temperature: automatic, target entropy -|A|, loss -log alpha * (log pi + target entropy).
  * Every loss of an update is computed from the same parameters (the critic target, the CQL
    samples and the actor loss use the pre-update actor and critics), then all are applied;
    targets move by Polyak averaging with tau = 0.005 after every update.
  * Networks (JaxCQL): ReLU MLPs; hidden layers with orthogonal init (gain sqrt 2); output
    layers orthogonal with gain 1e-2; tanh-Gaussian actor whose log-std is
    multiplier * head + offset (both learned, initially 1 and -1), clipped to [-20, 2].
    Off by default: `--layer-norm True` adds LayerNorm after each hidden layer, and `--num-qs` /
    `--num-min-qs` give a larger ensemble with a subset-min target.

Online fine-tuning (JaxCQL's loop; the rlkit code has no online phase): the policy collects one
whole trajectory, which then goes into the online buffer, followed by `utd` x (its length)
updates, each on a minibatch with `offline_ratio` (0.5; Kitchen 0.25) of its rows from the
offline data. Evaluations fall at multiples of `--eval-every` environment steps (mid-trajectory,
with the policy that is collecting it) and at the end of each phase; checkpoints at trajectory
ends.

Presets (explicit flags win; each row names the official file it comes from; every preset has
actor lr 1e-4, critic lr 3e-4, batch 256 and the importance-sampled log-sum-exp unless said):
  * antmaze (jaxcql), the setup of the CQL fine-tuning numbers AntMaze results are compared
    with: Cal-QL's `scripts/run_antmaze.sh` with `--enable_calql=False`, other values from
    `JaxCQL/conservative_sac_main.py` and `conservative_sac.py` defaults: actor 2x256, critics
    4x256, alpha 5 with Lagrange (target gap 0.8, alpha' from e), max-target backup, no BC,
    reward 10 r - 5, 1M offline updates (1000 epochs x 1000) + 1M online steps, mixing 0.5.
    CORL's `configs/finetune/cql/antmaze/*.yaml` agree except 5x256 critics, a 3x256 actor, the
    gap clipped below at -200 and one shared buffer instead of mixing.
  * antmaze with `--recipe rlkit`, the original offline recipe: `d4rl/examples/cql_antmaze_new.py`
    run with the README's AntMaze command: 3x256 actor and critics, alpha 5 with Lagrange
    threshold 5 (alpha' from 1), no max backup, 40k BC updates, reward 4 (r - 0.5), offline only
    (the code has no online phase), 1M offline updates (the script's 3000 epochs would be 3M).
  * locomotion (rlkit): `d4rl/examples/cql_mujoco_new.py` run with the README's MuJoCo command:
    3x256, alpha 5 fixed (the README's "5 or 10", `--lagrange_thresh=-1`), no max backup, 40k BC
    updates, raw reward, 1M offline updates only.
  * kitchen (jaxcql): Cal-QL's `scripts/run_kitchen.sh` (commit c510025) with
    `--enable_calql=False`: 3x512 actor and critics, alpha 5 fixed, plain log-sum-exp
    (`--cql.cql_importance_sample=False`), max backup, no BC, raw reward, 500k + 1.5M, mixing 0.25.
    (The CQL code has no Kitchen command; its README names only MuJoCo and AntMaze.)
  * adroit (jaxcql): CORL's `configs/finetune/cql/{pen,door,hammer,relocate}/cloned_v1.yaml`,
    written for D4RL's dense Adroit rewards, which Minari's Adroit data keep: 3x256 actor and
    critics, alpha 1 fixed, max backup, no BC, raw reward, 1M + 1M; mixing 0.5 (CORL: one
    shared buffer; gap clipped below at -200). Cal-QL's Adroit script is for the binary tasks.
  * pointmaze (jaxcql): ours, for the no-argument run on a sparse maze: calql.py's pointmaze
    preset without the calibration (the Cal-QL paper's CQL baseline): alpha 5, max backup, no
    BC, reward 10 r - 5, 2x64 networks, 20k + 20k, 20 evaluation episodes.
On the other domains `--recipe` switches only the Lagrange form (with the start of alpha') and
the max-target backup; the BC warm start is the `--bc-steps` preset value.

Deviations: none in the losses. The networks are JaxCQL's in both recipes, not rlkit's (whose
actor has a separate log-std layer clipped to [-5, 2] and uniform(+-1e-3) output layers); the
BC log-likelihood does not clamp the Gaussian mean to [-9, 9] as rlkit does; rlkit's max
backup always samples 10 actions, here `--cql-n-actions` (10). With `--recipe rlkit`, every loss
comes from the pre-update parameters (above); rlkit steps the temperature first and uses the
updated alpha in the policy loss, and takes the policy's gradient after the critics' in-place
steps (which PyTorch >= 1.5 refuses: aviralkumar2907/CQL issue 5).

Usage:
  python algorithms/cql.py                                   # local PointMaze data, built on first use
  python algorithms/cql.py --env antmaze-large               # D4RL/antmaze/large-diverse-v1, 1M + 1M (jaxcql)
  python algorithms/cql.py --env antmaze-large --recipe rlkit     # the original offline AntMaze recipe
  python algorithms/cql.py --env hopper-medium               # offline only (locomotion preset)
  python algorithms/cql.py --resume runs/cql__...            # continue a stopped run
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

if __package__ in (None, ""):  # run as `python algorithms/cql.py`: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import buffers, datasets  # noqa: E402
from common import run as harness
from common.cli import check, run_cli

ALGORITHM = "cql"
# Updates per jitted call between looks for a stop signal: about 1 s at the AntMaze preset (4x256
# critics, batch 256: 5 updates/s on a 2-core CPU), so a stop reaches its checkpoint within seconds.
STOP_CHECK_UPDATES = 5


@tyro.conf.configure(tyro.conf.FlagConversionOff)  # every boolean flag takes a value: --progress False
@dataclasses.dataclass
class Args:
    """CQL (Kumar et al. 2020), offline then online. Flags marked [preset] take the domain's
    preset unless given (actor lr 1e-4, importance-sampled penalty, 1M offline updates and
    mixing 0.5 unless said): antmaze (jaxcql, Cal-QL's run_antmaze.sh without calibration) actor
    2x256, critics 4x256, alpha 5 with Lagrange gap 0.8, max backup, no BC, reward 10r - 5,
    1M + 1M; antmaze with --recipe rlkit (cql_antmaze_new.py) 3x256, alpha 5 with Lagrange
    threshold 5, 40k BC, reward 4 (r - 0.5), offline only; locomotion (rlkit, cql_mujoco_new.py)
    3x256, alpha 5, 40k BC, offline only; kitchen (jaxcql, run_kitchen.sh) 3x512, alpha 5, plain
    log-sum-exp, max backup, 500k + 1.5M, mixing 0.25; adroit (jaxcql, CORL finetune configs)
    3x256, alpha 1, max backup, 1M + 1M; pointmaze (jaxcql, ours, about 10 minutes on a 2-core
    CPU) 2x64, alpha 5, max backup, reward 10r - 5, 20k + 20k. An offline step is one gradient
    update; an online step is one environment step."""

    # --- run ---
    env: str = "local/pointmaze/medium-30k-v0"
    """D4RL-style name (antmaze-large), Minari id or local dataset id."""
    seed: int = 0
    """One seed for network init, sampling, exploration and environment resets."""
    log_dir: str = "runs"
    """Root folder of run folders."""
    resume: str | None = None
    """Run folder to continue from its last checkpoint (its saved configuration is used)."""
    checkpoint_every: int = 50_000
    """Checkpoint every this many steps (online: at the next trajectory end) and at the end."""
    checkpoint_minutes: float = 10.0
    """Also checkpoint once this many minutes have passed since the last checkpoint (online: at the next trajectory end)."""
    progress: bool = True
    """Show a progress bar."""
    capture_video: bool = False
    """Record episode 0 of every evaluation as run_dir/videos/{phase}_{step}.mp4 (MUJOCO_GL=egl unless set; osmesa on CPUs)."""

    # --- schedule ---
    offline_steps: int | None = None
    """Offline gradient updates [preset]."""
    online_steps: int | None = None
    """Environment steps of online fine-tuning; 0 for offline only [preset]."""
    utd: int = 1
    """Online updates per environment step (each trajectory is followed by utd x its length updates)."""
    batch_size: int = 256
    """Minibatch size of one gradient update."""
    offline_ratio: float | None = None
    """Share of every online-phase minibatch drawn from the offline data (Cal-QL's mixing ratio) [preset]."""
    eval_every: int = 10_000
    """Evaluate every this many steps of each phase, and at the end of each phase."""
    eval_episodes: int | None = None
    """Episodes per evaluation (deterministic policy) [preset: 10; pointmaze 20]."""
    log_every: int = 1000
    """Write training scalars every this many offline updates (online: at the next trajectory end)."""

    # --- network ---
    actor_hidden_dims: tuple[int, ...] | None = None
    """Hidden layer widths of the actor [preset]."""
    critic_hidden_dims: tuple[int, ...] | None = None
    """Hidden layer widths of each critic [preset]."""
    num_qs: int = 2
    """Critics in the ensemble (CQL: twin Q)."""
    num_min_qs: int | None = None
    """Target critics drawn without replacement for the min in the TD target (default: all)."""
    layer_norm: bool = False
    """LayerNorm after every hidden layer of actor and critics (off in CQL's and Cal-QL's networks)."""

    # --- algorithm ---
    discount: float = 0.99
    """Discount factor gamma."""
    tau: float = 0.005
    """Target network update rate."""
    actor_lr: float | None = None
    """Actor learning rate (Adam) [preset]."""
    critic_lr: float = 3e-4
    """Critic learning rate (Adam)."""
    temp_lr: float | None = None
    """Entropy temperature learning rate (Adam); default: the actor's."""
    init_temperature: float = 1.0
    """Initial entropy temperature alpha."""
    target_entropy: float | None = None
    """Target entropy; default -|A|."""
    backup_entropy: bool = False
    """Subtract gamma * alpha * log pi(a'|s') in the TD target (CQL: off)."""
    cql_alpha: float | None = None
    """Weight of the CQL penalty (the code's min_q_weight) [preset]."""
    online_cql_alpha: float | None = None
    """Penalty weight from the online phase on (Cal-QL's cql_min_q_weight_online); default: unchanged."""
    cql_n_actions: int = 10
    """n: random, policy and next-policy actions each, per state, in the log-sum-exp."""
    cql_temperature: float = 1.0
    """Temperature T of the log-sum-exp."""
    cql_importance_sample: bool | None = None
    """Importance-sampled log-sum-exp (CQL(H) as in the paper); off: plain log-sum-exp over the samples and Q(s, a_data) [preset]."""
    recipe: Literal["jaxcql", "rlkit"] | None = None
    """Official code followed: jaxcql (Cal-QL's JaxCQL without calibration) or rlkit (aviralkumar2907/CQL); picks the Lagrange form, the max-target backup and, on AntMaze, the preset [preset]."""
    cql_lagrange: bool | None = None
    """Tune the penalty weight by dual gradient descent (--lagrange-threshold for rlkit, --cql-target-action-gap for jaxcql) [preset]."""
    lagrange_threshold: float = 5.0
    """rlkit's lagrange_thresh: the target of cql_alpha x gap (gap: log-sum-exp minus data Q; cql_antmaze_new.py)."""
    cql_target_action_gap: float = 0.8
    """jaxcql's cql_target_action_gap: the target of the gap (run_antmaze.sh)."""
    alpha_prime_lr: float = 3e-4
    """Learning rate of the Lagrange multiplier's log (the code uses the critic's)."""
    max_target_backup: bool | None = None
    """TD target over n sampled next actions: rlkit, min over critics of each one's max; jaxcql, max of the min over critics [preset]."""
    bc_steps: int | None = None
    """First actor updates trained by behaviour cloning (rlkit's policy_eval_start; jaxcql: none) [preset]."""
    reward_scale: float | None = None
    """Rewards become reward_scale * r + reward_bias, offline and online [preset]."""
    reward_bias: float | None = None
    """See --reward-scale [preset]."""


# aviralkumar2907/CQL: d4rl/examples/cql_*_new.py (layer_size 256 x 3, policy_eval_start 40000,
# max_q_backup False, deterministic_backup True) and the README's commands (policy_lr 1e-4)
_RLKIT = dict(recipe="rlkit", actor_hidden_dims=(256, 256, 256), critic_hidden_dims=(256, 256, 256),
              max_target_backup=False, bc_steps=40_000, actor_lr=1e-4, reward_scale=1.0, reward_bias=0.0,
              offline_steps=1_000_000, offline_ratio=0.5, cql_importance_sample=True, eval_episodes=10)
# nakamotoo/Cal-QL: JaxCQL/conservative_sac_main.py and conservative_sac.py defaults (policy_arch and
# qf_arch 256-256, policy_lr 1e-4, cql_max_target_backup True, no BC), --enable_calql=False
_JAXCQL = dict(recipe="jaxcql", actor_hidden_dims=(256, 256), critic_hidden_dims=(256, 256),
               max_target_backup=True, bc_steps=0, actor_lr=1e-4, reward_scale=1.0, reward_bias=0.0,
               offline_steps=1_000_000, offline_ratio=0.5, cql_importance_sample=True, cql_alpha=5.0,
               cql_lagrange=False, eval_episodes=10)
PRESETS: dict[str, dict[str, Any]] = {
    # README MuJoCo command (cql_mujoco_new.py): min_q_weight 5, lagrange_thresh -1 (off); offline only
    "locomotion": dict(_RLKIT, cql_alpha=5.0, cql_lagrange=False, online_steps=0),
    # Cal-QL scripts/run_antmaze.sh, --enable_calql=False: qf_arch 4x256, cql_min_q_weight 5,
    # cql_lagrange with cql_target_action_gap 0.8 (the field's default), reward 10 r - 5, 1M + 1M, mixing 0.5
    "antmaze": dict(_JAXCQL, critic_hidden_dims=(256, 256, 256, 256), cql_lagrange=True,
                    reward_scale=10.0, reward_bias=-5.0, online_steps=1_000_000),
    # --recipe rlkit: README AntMaze command (cql_antmaze_new.py): min_q_weight 5, lagrange_thresh 5
    # (the field's default); the loader's 4 (r - 0.5); offline only
    "antmaze/rlkit": dict(_RLKIT, cql_alpha=5.0, cql_lagrange=True, reward_scale=4.0, reward_bias=-2.0,
                          online_steps=0),
    # Cal-QL scripts/run_kitchen.sh (commit c510025), --enable_calql=False: 512-512-512 both,
    # cql_min_q_weight 5, cql_importance_sample False, raw reward, 500 epochs + 1.5M, mixing 0.25
    "kitchen": dict(_JAXCQL, actor_hidden_dims=(512, 512, 512), critic_hidden_dims=(512, 512, 512),
                    cql_importance_sample=False, offline_steps=500_000, online_steps=1_500_000,
                    offline_ratio=0.25),
    # CORL configs/finetune/cql/{pen,door,hammer,relocate}/cloned_v1.yaml (a port of JaxCQL):
    # 3x256 actor (fixed in CORL) and critics (q_n_hidden_layers 3), cql_alpha 1, no Lagrange,
    # cql_max_target_backup, bc_steps 0, raw reward, 1M + 1M
    "adroit": dict(_JAXCQL, actor_hidden_dims=(256, 256, 256), critic_hidden_dims=(256, 256, 256),
                   cql_alpha=1.0, online_steps=1_000_000),
    # ours: the no-argument run on a sparse maze, calql.py's pointmaze preset without the calibration
    # (the Cal-QL paper's CQL baseline), sized for about 10 minutes on a 2-core CPU (PRESET_NOTES)
    "pointmaze": dict(_JAXCQL, actor_hidden_dims=(64, 64), critic_hidden_dims=(64, 64), offline_steps=20_000,
                      online_steps=20_000, reward_scale=10.0, reward_bias=-5.0, eval_episodes=20),
}
PRESETS["default"] = PRESETS["locomotion"]
# What a preset is and why, printed at the start of a new run (domains whose preset is not a paper's).
PRESET_NOTES: dict[str, str] = {
    "pointmaze": "ours, not a paper's: calql.py's pointmaze preset without the calibration (JaxCQL recipe, alpha 5, "
                 "max backup, rewards 10 r - 5 as on AntMaze) on 2x64 networks, 20k offline updates then 20k online "
                 "steps, sized to finish in about 10 minutes on a 2-core CPU; the paper presets (3x256 or wider, 1M "
                 "updates) apply to the paper datasets.",
}


def apply_preset(args: Args, domain: str) -> Args:
    """Fill every unset (None) field from the domain's preset: PRESETS[f"{domain}/{recipe}"] when
    an explicit --recipe has one (antmaze/rlkit), else PRESETS[domain]."""
    name = domain if domain in PRESETS else "default"
    preset = PRESETS.get(f"{name}/{args.recipe}", PRESETS[name])
    filled = {field: value for field, value in preset.items() if getattr(args, field) is None}
    return dataclasses.replace(args, **filled)


def transform_rewards(rewards, args: Args):
    """The preset's affine reward transform, the same offline and online."""
    return args.reward_scale * rewards + args.reward_bias


# ---------------------------------------------------------------------------------------------
# Networks


def hidden_init():
    return nn.initializers.orthogonal(jnp.sqrt(2.0))


def output_init():
    return nn.initializers.orthogonal(1e-2)


class MLP(nn.Module):
    hidden_dims: tuple[int, ...]
    layer_norm: bool = False

    @nn.compact
    def __call__(self, x):
        for width in self.hidden_dims:
            x = nn.Dense(width, kernel_init=hidden_init())(x)
            if self.layer_norm:
                x = nn.LayerNorm()(x)
            x = nn.relu(x)
        return x


class Critic(nn.Module):
    hidden_dims: tuple[int, ...]
    layer_norm: bool = False

    @nn.compact
    def __call__(self, observations, actions):
        x = MLP(self.hidden_dims, self.layer_norm)(jnp.concatenate([observations, actions], -1))
        return nn.Dense(1, kernel_init=output_init())(x).squeeze(-1)


class CriticEnsemble(nn.Module):
    """`num` independent critics, their parameters stacked on a leading axis (one vmapped
    initialisation); output shape (num, ...batch).

    Evaluation runs each critic on the rows flattened to one matrix, a loop over the members'
    slices of the stacked parameters: plain matrix products, which a CPU runs faster than the
    batched ones of a vmapped call on CQL's (31 actions x batch) rows (`benchmarks/compare.py`).
    Ensembles of more than 2 keep the one vmapped call: unrolled over 10 members
    the update took 78 s to compile against 18 s (`benchmarks/offline_speed.py`, pointmaze).
    """

    hidden_dims: tuple[int, ...]
    num: int
    layer_norm: bool = False

    @nn.compact
    def __call__(self, observations, actions):
        ensemble = nn.vmap(Critic, variable_axes={"params": 0}, split_rngs={"params": True},
                           in_axes=None, out_axes=0, axis_size=self.num)(self.hidden_dims, self.layer_norm)
        if self.is_initializing():
            return ensemble(observations, actions)
        batch_shape = actions.shape[:-1]
        observations = jnp.broadcast_to(observations, (*batch_shape, observations.shape[-1]))
        if self.num > 2:  # one vmapped call (a 10-member loop compiles and runs far slower)
            return ensemble(observations, actions)
        rows = observations.reshape(-1, observations.shape[-1]), actions.reshape(-1, actions.shape[-1])
        member = Critic(self.hidden_dims, self.layer_norm, parent=None)
        stacked = self.variables["params"][ensemble.name]
        values = [member.apply({"params": jax.tree_util.tree_map(lambda leaf: leaf[i], stacked)}, *rows)
                  for i in range(self.num)]
        return jnp.stack(values).reshape(self.num, *batch_shape)


class Actor(nn.Module):
    """Tanh-Gaussian policy head: the Gaussian's mean and log-std before the tanh. As in JaxCQL,
    log-std = multiplier * head + offset with both scalars learned (initial 1 and -1)."""

    hidden_dims: tuple[int, ...]
    action_dim: int
    layer_norm: bool = False

    @nn.compact
    def __call__(self, observations):
        x = MLP(self.hidden_dims, self.layer_norm)(observations)
        mean, log_std = jnp.split(nn.Dense(2 * self.action_dim, kernel_init=output_init())(x), 2, axis=-1)
        multiplier = self.param("log_std_multiplier", lambda _: jnp.ones(()))
        offset = self.param("log_std_offset", lambda _: -jnp.ones(()))
        return mean, jnp.clip(multiplier * log_std + offset, -20.0, 2.0)


class Scalar(nn.Module):
    """A learned positive scalar exp(log_value) (entropy temperature, Lagrange multiplier)."""

    init_value: float = 1.0

    @nn.compact
    def __call__(self):
        return jnp.exp(self.param("log_value", lambda _: jnp.full((), jnp.log(self.init_value))))


def sample_tanh_normal(key, mean, log_std, num: int | None = None):
    """Tanh-squashed Gaussian samples and their log-probabilities (summed over action dims);
    with `num`, `num` samples per row stacked on a new leading axis."""
    shape = mean.shape if num is None else (num, *mean.shape)
    noise = jax.random.normal(key, shape)
    pre_tanh = mean + jnp.exp(log_std) * noise
    return jnp.tanh(pre_tanh), tanh_normal_log_prob(pre_tanh, noise, log_std)


def tanh_normal_log_prob(pre_tanh, noise, log_std):
    gaussian_log_prob = -0.5 * noise**2 - log_std - 0.5 * jnp.log(2.0 * jnp.pi)
    # log(1 - tanh(x)^2), written stably
    log_det = 2.0 * (jnp.log(2.0) - pre_tanh - jax.nn.softplus(-2.0 * pre_tanh))
    return (gaussian_log_prob - log_det).sum(-1)


def log_prob_of(actions, mean, log_std):
    """log pi(a|s) of given actions, clipped to +-(1 - 1e-5) as the dataset's are: an online action
    can be exactly +-1 in float32, and its infinite arctanh would make even the unused branch of
    the actor loss's `jnp.where` give NaN gradients."""
    pre_tanh = jnp.arctanh(jnp.clip(actions, -1.0 + 1e-5, 1.0 - 1e-5))
    return tanh_normal_log_prob(pre_tanh, (pre_tanh - mean) / jnp.exp(log_std), log_std)


# ---------------------------------------------------------------------------------------------
# Agent state and losses


@struct.dataclass
class Config:
    """Static settings the jitted functions close over."""

    actor: Actor = struct.field(pytree_node=False)
    critic: CriticEnsemble = struct.field(pytree_node=False)
    target_critic: CriticEnsemble = struct.field(pytree_node=False)  # the num_min_qs subset
    num_qs: int = struct.field(pytree_node=False)
    num_min_qs: int = struct.field(pytree_node=False)
    action_dim: int = struct.field(pytree_node=False)
    discount: float = struct.field(pytree_node=False)
    tau: float = struct.field(pytree_node=False)
    backup_entropy: bool = struct.field(pytree_node=False)
    target_entropy: float = struct.field(pytree_node=False)
    cql_alpha: float = struct.field(pytree_node=False)
    cql_n_actions: int = struct.field(pytree_node=False)
    cql_temperature: float = struct.field(pytree_node=False)
    cql_importance_sample: bool = struct.field(pytree_node=False)
    cql_lagrange: bool = struct.field(pytree_node=False)
    lagrange_threshold: float = struct.field(pytree_node=False)
    cql_target_action_gap: float = struct.field(pytree_node=False)
    max_target_backup: bool = struct.field(pytree_node=False)
    bc_steps: int = struct.field(pytree_node=False)
    recipe: str = struct.field(pytree_node=False)  # "rlkit" or "jaxcql": the Lagrange form and the max backup


class Agent(struct.PyTreeNode):
    actor: TrainState
    critic: TrainState
    target_critic_params: Any
    temperature: TrainState
    alpha_prime: TrainState
    key: jax.Array


def make_config(args: Args, action_dim: int) -> Config:
    target_entropy = -float(action_dim) if args.target_entropy is None else args.target_entropy
    num_min_qs = args.num_qs if args.num_min_qs is None else args.num_min_qs
    critic = functools.partial(CriticEnsemble, tuple(args.critic_hidden_dims), layer_norm=args.layer_norm)
    return Config(Actor(tuple(args.actor_hidden_dims), action_dim, args.layer_norm), critic(args.num_qs),
                  critic(num_min_qs), args.num_qs, num_min_qs, action_dim, args.discount, args.tau,
                  args.backup_entropy, target_entropy, args.cql_alpha, args.cql_n_actions, args.cql_temperature,
                  args.cql_importance_sample, args.cql_lagrange, args.lagrange_threshold, args.cql_target_action_gap,
                  args.max_target_backup, args.bc_steps, recipe=args.recipe)


def create_agent(args: Args, config: Config, observation_dim: int, action_dim: int) -> Agent:
    key, actor_key, critic_key = jax.random.split(jax.random.PRNGKey(args.seed), 3)
    observations, actions = jnp.zeros((1, observation_dim)), jnp.zeros((1, action_dim))
    actor = TrainState.create(apply_fn=config.actor.apply, tx=optax.adam(args.actor_lr),
                              params=config.actor.init(actor_key, observations)["params"])
    critic_params = config.critic.init(critic_key, observations, actions)["params"]
    critic = TrainState.create(apply_fn=config.critic.apply, params=critic_params, tx=optax.adam(args.critic_lr))
    temperature_lr = args.actor_lr if args.temp_lr is None else args.temp_lr

    def scalar(init_value, lr):
        module = Scalar(init_value)
        return TrainState.create(apply_fn=module.apply, params=module.init(key)["params"], tx=optax.adam(lr))

    target_params = jax.tree_util.tree_map(jnp.copy, critic_params)  # own buffers: the state is donated
    agent = Agent(actor, critic, target_params, scalar(args.init_temperature, temperature_lr),
                 scalar(1.0 if args.recipe == "rlkit" else float(np.e), args.alpha_prime_lr), key)  # log alpha' 0 or 1
    return harness.strongly_typed(agent)  # no recompilation when the first update fixes the dtypes


def scalar_value(state: TrainState):
    return state.apply_fn({"params": state.params})


def td_target(key, batch, actor_params, target_params, temperature, config: Config):
    """r + gamma * mask * (min over target critics of Q(s', a') - [alpha * log pi(a'|s')]); with
    max-target backup over n sampled a', rlkit: the min over target critics of each one's max;
    jaxcql: the max of that min (with the log pi of the best)."""
    action_key, subset_key = jax.random.split(key)
    mean, log_std = config.actor.apply({"params": actor_params}, batch["next_observations"])
    num = config.cql_n_actions if config.max_target_backup else None
    next_actions, next_log_probs = sample_tanh_normal(action_key, mean, log_std, num)
    members = jax.random.choice(subset_key, config.num_qs, (config.num_min_qs,), replace=False)
    subset = jax.tree_util.tree_map(lambda leaf: leaf[members], target_params)
    next_observations = jnp.broadcast_to(batch["next_observations"],
                                         (*next_actions.shape[:-1], batch["next_observations"].shape[-1]))
    next_q = config.target_critic.apply({"params": subset}, next_observations, next_actions)
    if config.max_target_backup and config.recipe == "rlkit":  # (critics, n, B); no entropy term (validate)
        next_q = next_q.max(1)
    next_q = next_q.min(0)
    if config.max_target_backup and config.recipe != "rlkit":  # (n, B): keep the best sampled action of each row
        best = next_q.argmax(0)
        next_q = jnp.take_along_axis(next_q, best[None], 0)[0]
        next_log_probs = jnp.take_along_axis(next_log_probs, best[None], 0)[0]
    if config.backup_entropy:
        next_q = next_q - temperature * next_log_probs
    return batch["rewards"] + config.discount * batch["masks"] * next_q


def ood_q_values(key, batch, actor_params, critic_params, config: Config) -> dict[str, jax.Array]:
    """Q of every critic at s for n random, n policy (from s) and n next-policy (from s')
    actions per row, each (num_qs, n, B); and the log-probabilities of the policy samples (n, B)."""
    random_key, policy_key, next_key = jax.random.split(key, 3)
    n, observations = config.cql_n_actions, batch["observations"]
    random_actions = jax.random.uniform(random_key, (n, observations.shape[0], config.action_dim),
                                        minval=-1.0, maxval=1.0)
    policy_actions, policy_log_probs = sample_tanh_normal(
        policy_key, *config.actor.apply({"params": actor_params}, observations), n)
    next_actions, next_log_probs = sample_tanh_normal(
        next_key, *config.actor.apply({"params": actor_params}, batch["next_observations"]), n)

    # one critic pass over all 3n actions at s: one large matrix product per layer, not three
    q = config.critic.apply({"params": critic_params}, observations,
                            jnp.concatenate([random_actions, policy_actions, next_actions]))
    q_random, q_policy, q_next = jnp.split(q, 3, axis=1)
    return {"random": q_random, "policy": q_policy, "next_policy": q_next,
            "policy_log_probs": policy_log_probs, "next_policy_log_probs": next_log_probs}


def cql_gap(samples, data_q, config: Config):
    """Per critic: T * logsumexp(Q_ood / T) minus Q(s, a_data), batch-mean. Importance-sampled, each
    sample's Q is divided by its proposal density (uniform 0.5^|A|, or the policy's)."""
    if config.cql_importance_sample:
        random_log_density = config.action_dim * jnp.log(0.5)
        weighted = jnp.concatenate([samples["random"] - random_log_density,
                                    samples["next_policy"] - samples["next_policy_log_probs"],
                                    samples["policy"] - samples["policy_log_probs"]], axis=1)
    else:
        weighted = jnp.concatenate([samples["random"], data_q[:, None], samples["next_policy"],
                                    samples["policy"]], axis=1)
    temperature = config.cql_temperature
    log_sum_exp = jax.nn.logsumexp(weighted / temperature, axis=1) * temperature
    return (log_sum_exp - data_q).mean(-1)


def critic_loss(critic_params, key, batch, target_q, actor_params, alpha_prime, config: Config):
    """Sum over critics of the mean squared TD error plus the CQL penalty."""
    data_q = config.critic.apply({"params": critic_params}, batch["observations"], batch["actions"])
    td_loss = ((data_q - target_q) ** 2).mean(-1).sum()
    samples = ood_q_values(key, batch, actor_params, critic_params, config)
    gap = cql_gap(samples, data_q, config)
    if config.cql_lagrange:
        penalty = lagrange_penalty(alpha_prime, gap, config)
    else:
        penalty = config.cql_alpha * gap
    info = {"td_loss": td_loss, "q": data_q.mean(), "cql_gap": gap.mean(),
            "ood_policy_q": samples["policy"].mean(), "ood_random_q": samples["random"].mean()}
    return td_loss + penalty.sum(), (gap, info)


def lagrange_penalty(alpha_prime, gap, config: Config):
    """Per critic, rlkit: alpha' * (alpha_cql * gap - threshold); jaxcql (Cal-QL's form):
    alpha' * alpha_cql * (gap - target action gap)."""
    if config.recipe == "rlkit":
        return alpha_prime * (config.cql_alpha * gap - config.lagrange_threshold)
    return alpha_prime * config.cql_alpha * (gap - config.cql_target_action_gap)


def alpha_prime_loss(alpha_prime_params, gap, alpha_prime_apply, config: Config):
    """Dual step: raise alpha' while the penalty exceeds the threshold, lower it below."""
    alpha_prime = jnp.clip(alpha_prime_apply({"params": alpha_prime_params}), 0.0, 1e6)
    return -lagrange_penalty(alpha_prime, gap, config).sum() * 0.5


def actor_loss(actor_params, key, batch, critic_params, temperature, behaviour_cloning, config: Config):
    """alpha * log pi(a|s) - min over critics of Q(s, a), a ~ pi(s); during the warm start,
    alpha * log pi(a|s) - log pi(a_data|s) instead."""
    mean, log_std = config.actor.apply({"params": actor_params}, batch["observations"])
    actions, log_probs = sample_tanh_normal(key, mean, log_std)
    q = config.critic.apply({"params": critic_params}, batch["observations"], actions).min(0)
    objective = jnp.where(behaviour_cloning, log_prob_of(batch["actions"], mean, log_std), q)
    return (temperature * log_probs - objective).mean(), -log_probs.mean()


def temperature_loss(temperature_params, entropy, target_entropy):
    """-log alpha * (log pi + target entropy), with the batch-mean log pi = -entropy."""
    return temperature_params["log_value"] * (entropy - target_entropy)


def update(agent: Agent, batch, config: Config):
    """One gradient step of critics, Lagrange multiplier, actor and temperature, all from the
    same pre-update parameters, then the Polyak update of the targets."""
    key, target_key, cql_key, actor_key = jax.random.split(agent.key, 4)
    temperature = scalar_value(agent.temperature)
    alpha_prime = jnp.clip(scalar_value(agent.alpha_prime), 0.0, 1e6)
    target_q = td_target(target_key, batch, agent.actor.params, agent.target_critic_params, temperature, config)
    (loss, (gap, info)), grads = jax.value_and_grad(critic_loss, has_aux=True)(
        agent.critic.params, cql_key, batch, target_q, agent.actor.params, alpha_prime, config)
    critic = agent.critic.apply_gradients(grads=grads)
    alpha_prime_state = agent.alpha_prime
    if config.cql_lagrange:
        prime_loss, prime_grads = jax.value_and_grad(alpha_prime_loss)(
            agent.alpha_prime.params, jax.lax.stop_gradient(gap), agent.alpha_prime.apply_fn, config)
        alpha_prime_state = agent.alpha_prime.apply_gradients(grads=prime_grads)
        info = {**info, "alpha_prime_loss": prime_loss, "alpha_prime": alpha_prime}

    behaviour_cloning = agent.actor.step < config.bc_steps
    (actor_value, entropy), actor_grads = jax.value_and_grad(actor_loss, has_aux=True)(
        agent.actor.params, actor_key, batch, agent.critic.params, temperature, behaviour_cloning, config)
    temp_loss, temp_grads = jax.value_and_grad(temperature_loss)(agent.temperature.params, entropy,
                                                                  config.target_entropy)
    target = optax.incremental_update(critic.params, agent.target_critic_params, config.tau)
    agent = agent.replace(actor=agent.actor.apply_gradients(grads=actor_grads), critic=critic,
                          target_critic_params=target, alpha_prime=alpha_prime_state,
                          temperature=agent.temperature.apply_gradients(grads=temp_grads), key=key)
    return agent, {**info, "critic_loss": loss, "actor_loss": actor_value, "entropy": entropy,
                   "temperature": temperature, "temperature_loss": temp_loss}


def train(agent: Agent, offline, online, num_updates, config: Config, batch_size: int, offline_ratio: float):
    """`num_updates` (a traced count: one compilation for any) updates in a jitted loop, each on
    a minibatch sampled on the device; returns the last update's metrics."""

    def step(agent):
        key, sample_key = jax.random.split(agent.key)
        batch = buffers.sample_mixed(sample_key, offline, online, 1, batch_size, offline_ratio)
        return update(agent.replace(key=key), jax.tree_util.tree_map(lambda leaf: leaf[0], batch), config)

    info_shapes = jax.eval_shape(step, agent)[1]
    info = jax.tree_util.tree_map(lambda shape: jnp.zeros(shape.shape, shape.dtype), info_shapes)
    return jax.lax.fori_loop(0, num_updates, lambda _, carry: step(carry[0]), (agent, info))


def act(agent: Agent, observation, config: Config):
    """A stochastic action for exploration; the key advances inside the agent."""
    key, action_key = jax.random.split(agent.key)
    action, _ = sample_tanh_normal(action_key, *config.actor.apply({"params": agent.actor.params}, observation))
    return agent.replace(key=key), action


def deterministic_policy(config: Config) -> Callable:
    """The evaluation policy: tanh of the Gaussian mean."""
    @jax.jit
    def policy(actor_params, observations):
        return jnp.tanh(config.actor.apply({"params": actor_params}, observations)[0])
    return policy


def make_step_functions(args: Args, config: Config):
    """The jitted calls of the training loop: update loops for each phase, and the action."""
    train_offline = functools.partial(train, online=None, config=config, batch_size=args.batch_size,
                                      offline_ratio=1.0)
    if args.online_cql_alpha is not None:  # the phase switch
        config = config.replace(cql_alpha=args.online_cql_alpha)
    train_online = functools.partial(train, config=config, batch_size=args.batch_size,
                                     offline_ratio=args.offline_ratio)
    return (jax.jit(lambda agent, offline, n: train_offline(agent, offline, num_updates=n), donate_argnums=0),
            jax.jit(lambda agent, offline, online, n: train_online(agent, offline, online, num_updates=n),
                    donate_argnums=0),
            jax.jit(functools.partial(act, config=config), donate_argnums=0))


# ---------------------------------------------------------------------------------------------
# Flags and data


RULES: list[harness.Rule] = [
    ("offline_ratio", harness.fraction, "must lie in [0, 1]"),
    ("bc_steps", harness.at_least(0), "must be >= 0"),
    ("num_qs", harness.at_least(1), "must be >= 1"),
    ("cql_n_actions", harness.at_least(1), "must be >= 1"),
    *[(name, harness.positive, "must be positive") for name in (
        "actor_lr", "critic_lr", "temp_lr", "alpha_prime_lr", "init_temperature", "cql_temperature")],
    ("cql_alpha", harness.at_least(0), "must be >= 0"),
    ("online_cql_alpha", harness.at_least(0), "must be >= 0"),
    ("actor_hidden_dims", harness.widths, "must be positive widths"),
    ("critic_hidden_dims", harness.widths, "must be positive widths"),
    ("discount", lambda value: 0.0 < value < 1.0, "must lie in (0, 1)"),  # returns-to-go divide by 1 - gamma
]


OLDER_RUNS = {"recipe": "rlkit"}  # run folders written before --recipe existed used rlkit's forms
# Settings of WSRL's pre-training that this script had until wsrl.py took that pre-training over,
# with the values that left the network and losses this script's: a run folder that used other
# values cannot be continued.
RETIRED = {"std_head": "scaled", "output_gain": 1e-2, "last_hidden_gain": float(2.0 ** 0.5), "wsrl_losses": False}
RETIRED_HINT = "WSRL's pre-training now runs in wsrl.py: python algorithms/wsrl.py --env ENV"


def validate(args: Args) -> None:
    """Every flag check that needs no data; runs before anything is loaded or compiled."""
    harness.check_flags(args, RULES + harness.RUN_RULES)
    if args.offline_ratio is not None:
        n_offline = args.batch_size * args.offline_ratio
        check(abs(n_offline - round(n_offline)) < 1e-6,
              f"--batch-size {args.batch_size} cannot be split by --offline-ratio {args.offline_ratio}: "
              f"batch-size x ratio = {n_offline:g} offline rows must be a whole number.")
    check(args.num_min_qs is None or 1 <= args.num_min_qs <= args.num_qs,
          f"--num-min-qs must lie in [1, --num-qs={args.num_qs}], got {args.num_min_qs}.")
    check(not (args.recipe == "rlkit" and args.max_target_backup and args.backup_entropy),
          "--max-target-backup has no entropy term in rlkit's code: drop --backup-entropy (or use --recipe jaxcql).")


def load_offline_data(task: datasets.Task, dataset, action_space, args: Args) -> dict[str, np.ndarray]:
    """The dataset as training rows: rewards transformed, masks = 1 - terminated."""
    transitions = datasets.dataset_transitions(dataset, task.domain)
    return {
        "observations": transitions["observations"],
        "actions": datasets.clip_actions(transitions["actions"], action_space),
        "rewards": transform_rewards(transitions["rewards"], args).astype(np.float32),
        "next_observations": transitions["next_observations"],
        "masks": 1.0 - transitions["terminated"].astype(np.float32),
    }


def trajectory_rows(trajectory: dict[str, list], args: Args, task: datasets.Task) -> dict[str, np.ndarray]:
    """A finished online trajectory as buffer rows (`args` and `task` serve calql.py's version,
    which adds the returns-to-go; the signature is shared to keep the two files diff-minimal)."""
    return {key: np.asarray(value, np.float32) for key, value in trajectory.items()}


def load_agent(run_dir: str) -> tuple[Agent, Config, dict[str, Any]]:
    """The agent of a run's last checkpoint, its Config and its config.json."""
    args, saved = harness.read_run_config(run_dir, Args, ALGORITHM, OLDER_RUNS, RETIRED, RETIRED_HINT)
    config = make_config(args, saved["action_dim"])
    agent = create_agent(args, config, saved["observation_dim"], saved["action_dim"])
    return harness.load_agent_state(run_dir, agent), config, saved


def load_policy(run_dir: str) -> Callable[[np.ndarray], np.ndarray]:
    """The deterministic policy of a run's last checkpoint: (n, obs_dim) -> (n, act_dim) in [-1, 1]."""
    agent, config, _ = load_agent(run_dir)
    policy = deterministic_policy(config)
    return lambda observations: np.asarray(policy(agent.actor.params, jnp.asarray(observations, jnp.float32)))


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
    policy: Callable
    train_offline: Callable
    train_online: Callable
    act: Callable

    def evaluate(self, phase: str, step: int) -> None:
        self.session.evaluate(lambda observations: self.policy(self.agent.actor.params, observations), phase, step)

    def checkpoint(self, step: int) -> None:
        self.session.save(step, self.agent, self.online)

    def reset_env(self) -> np.ndarray:
        return self.env.reset(seed=self.session.reset_seed())[0]


def start_run(args: Args) -> Run | None:
    """Check flags, load data, build envs and agent, restore a checkpoint when resuming.

    Returns None when the run to resume has already finished.
    """
    args, run_dir, saved = harness.start(args, ALGORITHM, validate, older_runs=OLDER_RUNS,
                                         retired=RETIRED, hint=RETIRED_HINT)
    task = datasets.resolve(args.env)
    check(task.dataset_id is not None,
          f"--env {args.env} is an environment without a dataset; {ALGORITHM}.py pre-trains offline: name a dataset.")
    sized_by_preset = args.offline_steps is None  # the note describes the preset's size, not a caller's
    args = apply_preset(args, task.domain)
    if run_dir is None and task.domain in PRESET_NOTES and sized_by_preset:
        print(f"Preset {task.domain} ({ALGORITHM}): {PRESET_NOTES[task.domain]}", flush=True)
    validate(args)
    dataset = datasets.load_dataset(task)
    make_env = datasets.env_factory(task, dataset)
    env = make_env()
    observation_dim, action_dim = env.observation_space.shape[0], env.action_space.shape[0]
    if args.target_entropy is None:
        args = dataclasses.replace(args, target_entropy=-float(action_dim))
    offline_rows = load_offline_data(task, dataset, dataset.action_space, args)
    check(offline_rows["observations"].shape[1] == observation_dim,
          f"dataset observations have {offline_rows['observations'].shape[1]} dims, the env {observation_dim}.")
    offline = buffers.from_arrays(offline_rows)
    run_dir = run_dir or harness.create_run_dir(args, ALGORITHM)

    config = make_config(args, action_dim)
    agent = create_agent(args, config, observation_dim, action_dim)
    online = buffers.empty_like({key: value[0] for key, value in offline_rows.items()}, max(args.online_steps, 1))
    progress, elapsed = harness.Progress(next_checkpoint=args.checkpoint_every), None
    if saved is not None:
        agent, online, progress, elapsed = harness.restore_checkpoint(saved, run_dir, agent, online)
    if progress.finished:
        print(f"{run_dir} has already finished.")
        return None
    session = harness.open_session(ALGORITHM, args, task, run_dir, progress, elapsed, (observation_dim, action_dim),
                                   make_env, datasets.scoring_for(dataset, task.domain))
    return Run(args, task, session, env, offline, online, agent, deterministic_policy(config),
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
        run.agent, info = run.train_offline(run.agent, run.offline, num_updates)
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


def collect_trajectory(run: Run) -> dict[str, list]:
    """Act with the stochastic policy until the episode ends, the online budget is spent or a
    stop signal cuts it. Evaluations due at multiples of `eval_every` run on the way, with the
    acting policy."""
    args, progress, session, base = run.args, run.session.progress, run.session, run.args.offline_steps
    trajectory = {key: [] for key in ("observations", "actions", "rewards", "next_observations", "masks")}
    observation, episode_return, over = run.reset_env(), 0.0, False
    while not over:
        run.agent, action = run.act(run.agent, observation)
        action = np.asarray(action)
        next_observation, reward, terminated, truncated, _ = run.env.step(action)
        episode_return += reward
        for key, value in (("observations", observation), ("actions", action),
                           ("rewards", transform_rewards(reward, args)), ("next_observations", next_observation),
                           ("masks", 1.0 - terminated)):
            trajectory[key].append(value)
        observation = next_observation
        progress.online_step += 1
        session.logger.advance()
        over = terminated or truncated or progress.online_step == args.online_steps or session.stop_requested
        if progress.online_step % args.eval_every == 0 and progress.online_step < args.online_steps:
            run.evaluate("online", base + progress.online_step)
    progress.episode += 1
    session.logger.scalars({"train/episode_return": episode_return}, base + progress.online_step)
    return trajectory


def online_phase(run: Run) -> None:
    """Trajectory by trajectory: collect, add to the online buffer, then utd x length updates.

    Checkpoints fall after a trajectory's updates. A stop signal cuts the trajectory being
    collected: its rows are saved with the updates they are owed, which a resumed run does first
    (the cut episode is not continued: the simulator's state is not saved). The updates run in
    pieces of STOP_CHECK_UPDATES; a stop between pieces saves the rest as owed. (A run resumed
    that way knows only the rest, so it logs that trajectory's training scalars only if the rest
    alone crosses a multiple of --log-every.)
    """
    args, progress, session, base = run.args, run.session.progress, run.session, run.args.offline_steps
    if progress.online_step == 0 and not session.evaluated_at(base):  # the phase starts
        run.evaluate("online" if args.offline_steps == 0 else "offline", base)
    if session.stop_requested and progress.online_step == 0:
        run.checkpoint(base)  # before the first action moves the agent (an owed evaluation is of this one)
    session.logger.new_phase("online")

    def chunk(num_updates: int):
        run.agent, info = run.train_online(run.agent, run.offline, run.online, num_updates)
        return info

    while progress.online_step < args.online_steps or progress.pending_updates:
        if not progress.pending_updates:
            start = progress.online_step
            trajectory = collect_trajectory(run)
            run.online = buffers.insert_rows(run.online, trajectory_rows(trajectory, args, run.task))
            progress.pending_updates = args.utd * (progress.online_step - start)
            if session.stop_requested:
                run.checkpoint(base + progress.online_step)  # ends the run; the updates are owed
        start = progress.online_step - progress.pending_updates // args.utd
        done, info = session.updates(progress.pending_updates, chunk, STOP_CHECK_UPDATES)
        progress.pending_updates -= done
        step = base + progress.online_step
        if progress.pending_updates:  # a stop between pieces
            run.checkpoint(step)  # ends the run; the rest of the trajectory's updates are owed
        if start == 0 or progress.online_step // args.log_every > start // args.log_every:
            session.log_training(info, step)
        if progress.online_step == args.online_steps:
            run.evaluate("online", step)
        elif session.checkpoint_due(step):
            run.checkpoint(step)


def main(args: Args) -> str | None:
    """Train (or resume) one run; returns its run folder."""
    run = start_run(args)
    return args.resume if run is None else harness.run_phases(run, offline_phase, online_phase)


if __name__ == "__main__":
    run_cli(main, Args)
