"""WSRL: Warm-Start RL, online fine-tuning that keeps no offline data, in one file.

Zhou, Peng, Li, Levine, Kumar. "Efficient Online Reinforcement Learning Fine-Tuning Need Not
Retain Offline Data", ICLR 2025, https://arxiv.org/abs/2412.07762. Follows the official code,
zhouzypaul/wsrl (commit 891ee35): `finetune.py` (the loop, the warmup rule, the batch split),
`wsrl/agents/sac.py` (the losses and `update_high_utd`), `experiments/configs/wsrl_config.py`
and `train_config.py` (networks), `experiments/scripts/*/launch_wsrl_finetune.sh` (presets).

WSRL is two runs:
  1. pre-training: Cal-QL (AntMaze, Adroit, Kitchen) or CQL (locomotion) offline, with a
     10-critic LayerNorm ensemble. That is a run of `calql.py` / `cql.py`; `wsrl.py` starts one
     in-process when no `--pretrained` run folder is given (WSRL's settings below).
  2. fine-tuning (this file): the whole pre-trained training state (actor, critics, targets,
     their Adam states, temperature, step counters) is restored; the offline data are dropped.
     The pre-trained policy, sampling stochastically, fills an empty buffer for `--warmup-steps`
     steps with no update (the official rule: no update while online step <= max(warmup,
     batch x (1 - offline ratio))); then every environment step makes ONE jitted call:

       batch of 1024 online rows -> 4 minibatches of 256 -> lax.scan of 4 critic steps, each
       followed by the target's Polyak update -> one actor and one temperature step on all 1024

  * TD target: r + gamma * mask * min over 2 target critics drawn WITH replacement
    (jax.random.randint) of Q(s', a'), a' ~ pi(s'); no entropy term. AntMaze: max-target
    backup, n = 10 next actions, the max taken after the subset-min.
  * Critic loss: squared TD error, mean over the 10 critics and the rows.
  * Actor loss: alpha log pi(a|s) - MIN over all 10 critics of Q(s, a), a ~ pi(s).
  * Temperature: loss alpha * (entropy - target entropy), the entropy estimated at the next
    observations (sac.py `temperature_loss_fn`), target -|A|.
  * Every optimizer steps at every update, with zero gradients for the networks the update does
    not train (sac.py `update` replaces their losses by 0 and `JaxRLTrainState.apply_gradients`
    still applies Adam): during the 4 critic steps the actor and temperature keep moving by
    Adam's momentum, and so do the critics during the actor step. `--idle-optimizer-steps False`
    steps each optimizer only with its own gradients.
  * Offline data: ratio 0 (none) by default. With `--offline-ratio` > 0 the official code
    concatenates [online, offline] before the split, so minibatches are all-online or
    all-offline; `--shuffle-split True` mixes the rows first.
  * Evaluation: deterministic (tanh of the mean), at the start and the end of the online phase
    and every `--eval-every` steps, on raw (untransformed) returns.

Presets (fine-tuning: launch_wsrl_finetune.sh, all 500k online steps, warmup 5000, batch 1024,
UTD 4, actor lr 1e-4, critic lr 3e-4, temperature lr 1e-4; pre-training: `WSRL_PRETRAINING`):
  * antmaze: Cal-QL, 4x256 critics / 2x256 actor, reward 10 r - 5, Lagrange gap 0.8, 1M updates;
    max-target backup in fine-tuning.
  * adroit: Cal-QL, 3x512 / 2x512, alpha 1, 20k updates. The official run used binary Adroit
    data with reward 10 r + 5; Minari's Adroit data are dense, and as in calql.py the raw reward
    is used (10 r + 5 assumes binary rewards).
  * kitchen: Cal-QL, 3x512 / 3x512, alpha 5 with plain log-sum-exp, reward r - 4, 250k updates.
  * locomotion: CQL (JaxCQL recipe: max backup, no BC), 2x256 / 2x256, alpha 5, raw reward,
    250k updates.
  * pointmaze: ours, Cal-QL on 2x64 networks with 10 critics, 2k updates, then 6k online steps
    with a 1000-step warmup: the no-argument run, sized for minutes on a CPU (about 10 on a
    2-core CPU; the short pre-training leaves a policy that fails, which fine-tuning repairs).

Deviations (named, not hidden):
  * Pre-training runs calql.py / cql.py with WSRL's switches (`--std-head`, `--output-gain`,
    `--last-hidden-gain`, `--wsrl-losses`; see `WSRL_PRETRAINING`): WSRL's network (a separate
    log-std head, or a state-independent one on AntMaze, std clipped to [1e-5, 10]; orthogonal
    gain 1e-2 on the last hidden layer except Kitchen, sqrt 2 on the outputs; softplus
    temperature and Lagrange multiplier) and losses (TD and penalty averaged over critics, the
    penalty on 2 critics drawn with replacement, Lagrange weight alpha' alone). What remains
    JaxCQL's there: the plain log-sum-exp (Kitchen) omits WSRL's constant -log(3n + 1) T, which
    changes the logged gap but no gradient; the temperature's entropy reuses no samples but is
    drawn from its own key, as in WSRL, with a different stream of random numbers.
  * With UTD 1 the official code updates everything from the same parameters; here the critic
    step comes first (the scan of length 1), then the actor and temperature.

Usage:
  python algorithms/wsrl.py                                          # pre-train on local PointMaze, then fine-tune
  python algorithms/wsrl.py --pretrained runs/calql__antmaze-large__0__...   # fine-tune a pre-trained run
  python algorithms/wsrl.py --env antmaze-large                      # pre-train (1M updates) and fine-tune
  python algorithms/wsrl.py --resume runs/wsrl__...                  # continue a stopped run
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tyro
from flax import struct
from flax.training.train_state import TrainState

if __package__ in (None, ""):  # run as `python algorithms/wsrl.py`: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from algorithms import calql, cql  # noqa: E402  the pre-training scripts, whose networks are fine-tuned
from common import buffers, datasets  # noqa: E402
from common import run as harness  # noqa: E402
from common.cli import check, run_cli  # noqa: E402

ALGORITHM = "wsrl"
PRETRAINERS = {"calql": calql, "cql": cql}
DEFAULT_ENV = "local/pointmaze/umaze-dense-v0"


@tyro.conf.configure(tyro.conf.FlagConversionOff)  # every boolean flag takes a value: --pretrain False
@dataclasses.dataclass
class Args:
    """WSRL (Zhou et al. 2025): online fine-tuning of a pre-trained Cal-QL/CQL run without its
    offline data. Flags marked [preset] take the domain's preset unless given (launch_wsrl_finetune.sh:
    500k online steps, warmup 5000; pointmaze, ours: 6k online steps, warmup 1000). Without
    --pretrained, the pre-training runs first, in-process (calql.py or cql.py with WSRL's settings)."""

    # --- run ---
    pretrained: str | None = None
    """Run folder of a finished calql.py / cql.py run to fine-tune."""
    pretrain: bool = True
    """Without --pretrained: run WSRL's pre-training first, in-process (False: --pretrained is required)."""
    pretrain_steps: int | None = None
    """Offline updates of that pre-training; default: WSRL's for the domain (AntMaze 1M)."""
    env: str | None = None
    """D4RL-style name, Minari id or local dataset id; default: the pre-trained run's (or local PointMaze)."""
    seed: int = 0
    """One seed for sampling, exploration and environment resets (and the pre-training it starts)."""
    log_dir: str = "runs"
    """Root folder of run folders."""
    resume: str | None = None
    """Run folder to continue from its last checkpoint (its saved configuration is used)."""
    checkpoint_every: int = 50_000
    """Checkpoint every this many online steps (at the next episode end) and at the end."""
    checkpoint_minutes: float = 10.0
    """Also checkpoint once this many minutes have passed since the last checkpoint (at the next episode end)."""
    progress: bool = True
    """Show a progress bar."""
    capture_video: bool = False
    """Record episode 0 of every evaluation as run_dir/videos/{phase}_{step}.mp4 (MUJOCO_GL=egl unless set; osmesa on CPUs)."""

    # --- schedule ---
    online_steps: int | None = None
    """Environment steps of fine-tuning, the warmup included [preset]."""
    warmup_steps: int | None = None
    """First online steps that only collect data, with the pre-trained policy [preset]."""
    utd: int = 4
    """Critic steps per environment step; the batch is split into this many minibatches."""
    batch_size: int = 1024
    """Rows sampled per environment step (split into --utd critic minibatches; the actor uses all)."""
    offline_ratio: float = 0.0
    """Share of every batch drawn from the offline data (WSRL: 0, the data are not kept)."""
    shuffle_split: bool = False
    """Mix online and offline rows before the split (official: no, minibatches are all-online or all-offline)."""
    eval_every: int | None = None
    """Evaluate every this many online steps, and at the start and end [preset]."""
    eval_episodes: int = 10
    """Episodes per evaluation (deterministic policy)."""
    log_every: int = 1000
    """Write training scalars every this many online steps."""

    # --- algorithm ---
    num_min_qs: int = 2
    """Target critics drawn with replacement for the min in the TD target."""
    max_target_backup: bool | None = None
    """TD target: max over --n-actions next actions of the subset-min (AntMaze) [preset]."""
    n_actions: int = 10
    """Next actions sampled per row for the max-target backup."""
    discount: float = 0.99
    """Discount factor gamma."""
    tau: float = 0.005
    """Target network update rate."""
    actor_lr: float = 1e-4
    """Actor learning rate (Adam; the pre-trained Adam state continues)."""
    critic_lr: float = 3e-4
    """Critic learning rate (Adam)."""
    temp_lr: float = 1e-4
    """Entropy temperature learning rate (Adam)."""
    idle_optimizer_steps: bool = True
    """Step every optimizer at every update, with zero gradients where the update trains nothing (official)."""


PRESETS: dict[str, dict[str, Any]] = {
    # experiments/scripts/<domain>/launch_wsrl_finetune.sh; train_config.py antmaze_wsrl: max_target_backup
    # (finetune.py: eval_interval 20k)
    "default": dict(online_steps=500_000, warmup_steps=5000, max_target_backup=False, eval_every=20_000),
    "antmaze": dict(online_steps=500_000, warmup_steps=5000, max_target_backup=True, eval_every=20_000),
    # ours: the no-argument run (PRESET_NOTES)
    "pointmaze": dict(online_steps=6000, warmup_steps=1000, max_target_backup=False, eval_every=2000),
}
# wsrl_config.py / --use_redq: 10 LayerNorm critics, subset 2. WSRL's network and losses (train_config.py
# *_cql policy_kwargs and *_network_kwargs, wsrl/networks/*.py, wsrl/agents/cql.py): a separate log-std
# head ("exp"), output layers with the default orthogonal gain sqrt 2, kernel_scale_final 1e-2 on the last
# hidden layer, softplus multipliers, averaged losses with the penalty on the 2 subsampled critics.
_ENSEMBLE = dict(num_qs=10, num_min_qs=2, layer_norm=True, online_steps=0, std_head="separate",
                 output_gain=calql.SQRT2, last_hidden_gain=1e-2, wsrl_losses=True)
# (pre-training script, its flags): launch_{calql,cql}_finetune.sh --use_redq and train_config.py
WSRL_PRETRAINING: dict[str, tuple[str, dict[str, Any]]] = {
    # antmaze_cql: std_parameterization "uniform" (a state-independent std)
    "antmaze": ("calql", dict(_ENSEMBLE, std_head="state-independent", offline_steps=1_000_000,
                              actor_hidden_dims=(256, 256),
                              critic_hidden_dims=(256,) * 4, reward_scale=10.0, reward_bias=-5.0, cql_lagrange=True,
                              cql_target_action_gap=0.8)),
    "adroit": ("calql", dict(_ENSEMBLE, offline_steps=20_000, actor_hidden_dims=(512, 512),
                             critic_hidden_dims=(512,) * 3, cql_alpha=1.0, cql_lagrange=False, reward_scale=1.0,
                             reward_bias=0.0)),
    # kitchen_cql: no kernel_scale_final
    "kitchen": ("calql", dict(_ENSEMBLE, last_hidden_gain=calql.SQRT2, offline_steps=250_000,
                              actor_hidden_dims=(512,) * 3,
                              critic_hidden_dims=(512,) * 3, cql_alpha=5.0, cql_importance_sample=False,
                              reward_scale=1.0, reward_bias=-4.0)),
    "locomotion": ("cql", dict(_ENSEMBLE, recipe="jaxcql", offline_steps=250_000, actor_hidden_dims=(256, 256),
                               critic_hidden_dims=(256, 256), cql_alpha=5.0, max_target_backup=True, bc_steps=0)),
    "pointmaze": ("calql", dict(_ENSEMBLE, offline_steps=2000, actor_hidden_dims=(64, 64),
                                critic_hidden_dims=(64, 64), eval_every=2000)),
}
PRESET_NOTES: dict[str, str] = {
    "pointmaze": "ours, not a paper's: Cal-QL pre-training with 10 LayerNorm critics on 2x64 networks for 2k "
                 "updates, then 6k online steps (1000 of warmup), sized for minutes on a CPU; the paper "
                 "presets (1M updates, 500k steps) apply to the paper datasets.",
}


def apply_preset(args: Args, domain: str) -> Args:
    """Fill every unset (None) field from the domain's preset."""
    preset = PRESETS.get(domain, PRESETS["default"])
    return dataclasses.replace(args, **{name: value for name, value in preset.items() if getattr(args, name) is None})


# ---------------------------------------------------------------------------------------------
# The pre-trained run


@dataclasses.dataclass
class Pretrained:
    """A pre-training run as fine-tuning uses it: its script module, Args, network Config and an
    agent of its structure (the template its checkpoint is restored into)."""

    module: Any
    args: Any
    config: Any
    agent: Any
    record: dict[str, Any]


def read_pretrained(run_dir: str) -> Pretrained:
    """The pre-trained run's configuration and a template agent; nothing is restored yet."""
    path = os.path.join(run_dir, "config.json")
    check(os.path.isfile(path), f"--pretrained {run_dir}: no config.json there; is it a calql.py or cql.py run folder?")
    with open(path) as file:
        algorithm = json.load(file).get("algorithm")
    check(algorithm in PRETRAINERS,
          f"--pretrained {run_dir} is a run of {algorithm!r}; WSRL fine-tunes calql or cql runs.")
    module = PRETRAINERS[algorithm]
    args, record = harness.read_run_config(run_dir, module.Args, algorithm, getattr(module, "OLDER_RUNS", None))
    config = module.make_config(args, record["action_dim"])
    return Pretrained(module, args, config, module.create_agent(args, config, record["observation_dim"],
                                                                record["action_dim"]), record)


def restore_pretrained(run_dir: str, pretrained: Pretrained) -> Any:
    """The pre-trained agent of a finished run's final checkpoint."""
    payload = harness.read_checkpoint(run_dir)
    progress = payload["progress"]
    check(progress.get("finished", False),
          f"--pretrained {run_dir} has not finished (offline step {progress.get('offline_step')} of "
          f"{pretrained.args.offline_steps}); finish it first: "
          f"{harness.resume_command(pretrained.module.ALGORITHM, run_dir)}")
    return harness.load_agent_state(run_dir, pretrained.agent)


def pretrain(args: Args) -> str:
    """Run WSRL's pre-training for the domain in-process; returns its run folder."""
    task = datasets.resolve(args.env or DEFAULT_ENV)
    algorithm, settings = WSRL_PRETRAINING.get(task.domain, WSRL_PRETRAINING["locomotion"])
    module = PRETRAINERS[algorithm]
    if args.pretrain_steps is not None:
        settings = dict(settings, offline_steps=args.pretrain_steps)
    pre_args = module.Args(env=args.env or DEFAULT_ENV, seed=args.seed, log_dir=args.log_dir, progress=args.progress,
                           eval_episodes=args.eval_episodes, **settings)
    print(f"Pre-training for WSRL: {algorithm}.py on {pre_args.env} ({settings['offline_steps']} updates, "
          f"{settings['num_qs']} LayerNorm critics). If it stops, continue it with its --resume command, then "
          f"run wsrl.py with --pretrained and its run folder.", flush=True)
    run_dir = module.main(pre_args)
    print(f"Pre-training done: {run_dir}", flush=True)
    return run_dir


# ---------------------------------------------------------------------------------------------
# Agent state and losses


@struct.dataclass
class Config:
    """Static settings the jitted functions close over."""

    actor: Any = struct.field(pytree_node=False)  # the pre-trained run's modules
    critic: Any = struct.field(pytree_node=False)
    sample_tanh_normal: Callable = struct.field(pytree_node=False)
    num_qs: int = struct.field(pytree_node=False)
    num_min_qs: int = struct.field(pytree_node=False)
    max_target_backup: bool = struct.field(pytree_node=False)
    n_actions: int = struct.field(pytree_node=False)
    discount: float = struct.field(pytree_node=False)
    tau: float = struct.field(pytree_node=False)
    target_entropy: float = struct.field(pytree_node=False)
    idle_optimizer_steps: bool = struct.field(pytree_node=False)


class Agent(struct.PyTreeNode):
    actor: TrainState
    critic: TrainState
    target_critic_params: Any
    temperature: TrainState
    key: jax.Array


def make_config(args: Args, pretrained: Pretrained) -> Config:
    return Config(pretrained.config.actor, pretrained.config.critic, pretrained.module.sample_tanh_normal,
                  pretrained.args.num_qs, args.num_min_qs, args.max_target_backup, args.n_actions, args.discount,
                  args.tau, -float(pretrained.record["action_dim"]), args.idle_optimizer_steps)


def fine_tuning_agent(pre_agent, args: Args) -> Agent:
    """The pre-trained state with WSRL's learning rates: parameters, targets, Adam moments and
    step counts carry over (the Adam state does not depend on the learning rate)."""
    def with_lr(state: TrainState, lr: float) -> TrainState:
        return state.replace(tx=optax.adam(lr))
    agent = Agent(with_lr(pre_agent.actor, args.actor_lr), with_lr(pre_agent.critic, args.critic_lr),
                  jax.tree_util.tree_map(jnp.copy, pre_agent.target_critic_params),
                  with_lr(pre_agent.temperature, args.temp_lr), jax.random.PRNGKey(args.seed))
    return harness.strongly_typed(agent)


def temperature_value(agent: Agent):
    return agent.temperature.apply_fn({"params": agent.temperature.params})


def sample_actions(key, actor_params, observations, config: Config, num: int | None = None):
    return config.sample_tanh_normal(key, *config.actor.apply({"params": actor_params}, observations), num)


def td_target(key, batch, actor_params, target_params, config: Config):
    """r + gamma * mask * min over num_min_qs target critics drawn with replacement of Q(s', a');
    with max-target backup, the max of that min over n sampled a'. No entropy term."""
    action_key, subset_key = jax.random.split(key)
    num = config.n_actions if config.max_target_backup else None
    next_actions, _ = sample_actions(action_key, actor_params, batch["next_observations"], config, num)
    next_q = config.critic.apply({"params": target_params}, batch["next_observations"], next_actions)
    members = jax.random.randint(subset_key, (config.num_min_qs,), 0, config.num_qs)
    next_q = next_q[members].min(0)
    if config.max_target_backup:  # (n, B): the best sampled action of each row
        next_q = next_q.max(0)
    return batch["rewards"] + config.discount * batch["masks"] * next_q


def critic_loss(critic_params, batch, target_q, config: Config):
    """Squared TD error, mean over every critic and row."""
    qs = config.critic.apply({"params": critic_params}, batch["observations"], batch["actions"])
    return ((qs - target_q) ** 2).mean(), qs.mean()


def actor_loss(actor_params, key, batch, critic_params, temperature, config: Config):
    """alpha * log pi(a|s) - MIN over all critics of Q(s, a), a ~ pi(s)."""
    actions, log_probs = sample_actions(key, actor_params, batch["observations"], config)
    q = config.critic.apply({"params": critic_params}, batch["observations"], actions).min(0)
    return (temperature * log_probs - q).mean(), -log_probs.mean()


def temperature_loss(temperature_params, temperature_apply, entropy, target_entropy):
    """alpha * (entropy - target entropy): alpha falls while the policy's entropy is above target."""
    return temperature_apply({"params": temperature_params}) * (entropy - target_entropy)


def idle_step(state: TrainState, active: bool) -> TrainState:
    """The official zero-gradient optimizer step of a network an update does not train."""
    if not active:
        return state
    return state.apply_gradients(grads=jax.tree_util.tree_map(jnp.zeros_like, state.params))


def update_critic(agent: Agent, batch, config: Config):
    """One critic step on a minibatch, then the target's Polyak update."""
    key, target_key = jax.random.split(agent.key)
    target_q = td_target(target_key, batch, agent.actor.params, agent.target_critic_params, config)
    (loss, q), grads = jax.value_and_grad(critic_loss, has_aux=True)(agent.critic.params, batch, target_q, config)
    critic = agent.critic.apply_gradients(grads=grads)
    target = optax.incremental_update(critic.params, agent.target_critic_params, config.tau)
    agent = agent.replace(critic=critic, target_critic_params=target, key=key,
                          actor=idle_step(agent.actor, config.idle_optimizer_steps),
                          temperature=idle_step(agent.temperature, config.idle_optimizer_steps))
    return agent, {"critic_loss": loss, "q": q, "target_q": target_q.mean()}


def update_actor_and_temperature(agent: Agent, batch, config: Config):
    """One actor step and one temperature step on the whole batch, from the same parameters; the
    temperature's entropy is measured at the next observations (sac.py temperature_loss_fn)."""
    key, actor_key, entropy_key = jax.random.split(agent.key, 3)
    temperature = temperature_value(agent)
    (loss, entropy), grads = jax.value_and_grad(actor_loss, has_aux=True)(
        agent.actor.params, actor_key, batch, agent.critic.params, temperature, config)
    num = config.n_actions if config.max_target_backup else None
    _, next_log_probs = sample_actions(entropy_key, agent.actor.params, batch["next_observations"], config, num)
    temp_loss, temp_grads = jax.value_and_grad(temperature_loss)(
        agent.temperature.params, agent.temperature.apply_fn, -next_log_probs.mean(), config.target_entropy)
    agent = agent.replace(actor=agent.actor.apply_gradients(grads=grads),
                          temperature=agent.temperature.apply_gradients(grads=temp_grads),
                          critic=idle_step(agent.critic, config.idle_optimizer_steps), key=key)
    return agent, {"actor_loss": loss, "entropy": entropy, "temperature_loss": temp_loss,
                   "temperature": temperature}


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


def sample_batch(key, online, offline, args: Args):
    """`batch_size` rows: the online share first, then the offline share ([online, offline] as
    finetune.py concatenates them), optionally shuffled before the split."""
    n_offline = buffers.offline_count(args.batch_size, args.offline_ratio)
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


# ---------------------------------------------------------------------------------------------
# Flags and data


RULES: list[harness.Rule] = [
    ("offline_ratio", harness.fraction, "must lie in [0, 1]"),
    ("warmup_steps", harness.at_least(0), "must be >= 0"),
    ("num_min_qs", harness.at_least(1), "must be >= 1"),
    ("n_actions", harness.at_least(1), "must be >= 1"),
    *[(name, harness.positive, "must be positive") for name in ("actor_lr", "critic_lr", "temp_lr")],
    ("pretrain_steps", harness.at_least(1), "must be >= 1"),
]


def validate(args: Args) -> None:
    """Every flag check that needs no data; runs before anything is loaded or compiled."""
    harness.check_flags(args, RULES + harness.RUN_RULES)
    check(args.batch_size % args.utd == 0,
          f"--batch-size {args.batch_size} must split into --utd {args.utd} equal minibatches.")
    n_offline = args.batch_size * args.offline_ratio
    check(abs(n_offline - round(n_offline)) < 1e-6,
          f"--batch-size {args.batch_size} cannot be split by --offline-ratio {args.offline_ratio}: "
          f"batch-size x ratio = {n_offline:g} offline rows must be a whole number.")
    check(args.pretrained is not None or args.pretrain or args.resume is not None,
          "wsrl.py fine-tunes a pre-trained run: pass --pretrained RUN_DIR (a calql.py or cql.py run folder) "
          "or leave --pretrain True to pre-train first.")


def warmup_length(args: Args) -> int:
    """Online steps without update: finetune.py updates only once online step > max(warmup,
    batch x (1 - offline ratio)) (so there are enough online rows for a batch)."""
    return int(max(args.warmup_steps, args.batch_size * (1 - args.offline_ratio))) + 1


PRETRAINED_COPY = "pretrained"  # the pre-trained run's config.json, kept in the run folder for --resume
CHECKPOINT_EXTRAS = ("pending_action",)


@dataclasses.dataclass
class Run:
    """One fine-tuning run: its session, the pre-trained run it started from, the agent, the
    buffers and the jitted calls."""

    args: Args
    pretrained: Pretrained
    session: harness.Session
    env: Any
    offline: buffers.Buffer | None
    online: buffers.Buffer
    agent: Agent
    action: np.ndarray | None
    policy: Callable
    online_step: Callable
    act: Callable  # the first action of an episode after a (re)start

    def evaluate(self, step: int) -> None:
        self.session.evaluate(lambda observations: self.policy(self.agent.actor.params, observations), "online", step)

    def checkpoint(self, step: int) -> None:
        self.session.save(step, self.agent, self.online, pending_action=harness.optional_array(self.action))

    def reset_env(self) -> np.ndarray:
        return self.env.reset(seed=self.session.reset_seed())[0]


def start_run(args: Args) -> Run | None:
    """Check flags, find (or make) the pre-trained run, build envs and agent, restore a checkpoint
    when resuming. Returns None when the run to resume has already finished."""
    args, run_dir, saved = harness.resolve_resume(args, ALGORITHM, CHECKPOINT_EXTRAS)
    validate(args)
    harness.prepare_video(args)  # --capture-video: the rendering backend, checked before any work
    if run_dir is None:
        harness.check_log_dir(args.log_dir)
        check(args.pretrained is None or os.path.isdir(args.pretrained), f"--pretrained {args.pretrained}: no such folder.")
        task = datasets.resolve(args.env or DEFAULT_ENV)  # a bad --env fails before any pre-training
        sized_by_preset = args.pretrain_steps is None and args.online_steps is None  # the note gives the preset's sizes
        if task.domain in PRESET_NOTES and args.pretrained is None and sized_by_preset:
            print(f"Preset {task.domain} ({ALGORITHM}): {PRESET_NOTES[task.domain]}", flush=True)
        if args.pretrained is None:
            args = dataclasses.replace(args, pretrained=pretrain(args))
    pretrained = read_pretrained(os.path.join(run_dir, PRETRAINED_COPY) if run_dir else args.pretrained)
    pre_env = pretrained.record["dataset_id"]
    if args.env is None:
        args = dataclasses.replace(args, env=pre_env)
    task = datasets.resolve(args.env)
    check(task.dataset_id == pre_env, f"--env {args.env} is {task.dataset_id}, but the pre-trained run "
                                      f"trained on {pre_env}.")
    args = apply_preset(args, task.domain)
    validate(args)
    pre_agent = pretrained.agent if run_dir else restore_pretrained(args.pretrained, pretrained)

    dataset = datasets.load_dataset(task)
    make_env = datasets.env_factory(task, dataset)
    env = make_env()
    observation_dim, action_dim = env.observation_space.shape[0], env.action_space.shape[0]
    check((observation_dim, action_dim) == (pretrained.record["observation_dim"], pretrained.record["action_dim"]),
          f"the pre-trained networks take {pretrained.record['observation_dim']}-dim observations and "
          f"{pretrained.record['action_dim']}-dim actions; {args.env} has {observation_dim} and {action_dim}.")
    example = {"observations": np.zeros(observation_dim, np.float32), "actions": np.zeros(action_dim, np.float32),
               "rewards": np.float32(0), "next_observations": np.zeros(observation_dim, np.float32),
               "masks": np.float32(0)}
    offline = None
    if args.offline_ratio > 0:
        rows = pretrained.module.load_offline_data(task, dataset, dataset.action_space, pretrained.args)
        offline = buffers.from_arrays({key: rows[key] for key in example})
    if run_dir is None:
        run_dir = harness.create_run_dir(args, ALGORITHM)
        os.makedirs(os.path.join(run_dir, PRETRAINED_COPY))
        shutil.copy(os.path.join(args.pretrained, "config.json"), os.path.join(run_dir, PRETRAINED_COPY))

    config = make_config(args, pretrained)
    agent = fine_tuning_agent(pre_agent, args)
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
                                   pretrained_algorithm=pretrained.module.ALGORITHM)
    return Run(args, pretrained, session, env, offline, online, agent, action, deterministic_policy(config),
               make_online_step(args, config), jax.jit(functools.partial(act, config=config)))


def online_phase(run: Run) -> None:
    """One environment step and ONE jitted call (insert, [4 critic + 1 actor step], next action)
    per iteration. Checkpoints fall at episode ends; a stop signal mid-episode checkpoints at
    once and the resumed run starts a new episode there (the simulator's state is not saved)."""
    args, progress, session = run.args, run.session.progress, run.session
    if progress.online_step == 0 and run.action is None:
        run.evaluate(0)  # the pre-trained policy
    session.logger.new_phase("online, warmup")
    observation, episode_return, warmup = run.reset_env(), 0.0, warmup_length(args)
    while progress.online_step < args.online_steps:
        if progress.online_step == warmup:
            session.logger.new_phase("online")
        if run.action is None:
            run.agent, action = run.act(run.agent, observation)
            run.action = np.asarray(action)
        next_observation, reward, terminated, truncated, _ = run.env.step(np.asarray(run.action))
        episode_return += reward
        transition = {"observations": observation, "actions": np.asarray(run.action, np.float32),
                      "rewards": np.float32(run.pretrained.module.transform_rewards(reward, run.pretrained.args)),
                      "next_observations": next_observation, "masks": np.float32(1.0 - terminated)}
        step = progress.online_step + 1
        episode_over = terminated or truncated
        if episode_over:
            session.logger.scalars({"train/episode_return": episode_return}, step)
            progress.episode += 1
            next_observation, episode_return = run.reset_env(), 0.0
        train = progress.online_step >= warmup
        run.agent, run.online, run.action, info = run.online_step(
            run.agent, run.online, run.offline, transition, next_observation, train)
        observation = next_observation
        progress.online_step += 1
        session.logger.advance()
        if train and (progress.online_step % args.log_every == 0 or progress.online_step == warmup + 1):
            session.log_training(info, step)
        if progress.online_step % args.eval_every == 0 or progress.online_step == args.online_steps:
            run.evaluate(step)
        if step == args.online_steps:
            break  # the final checkpoint follows
        if session.stop_requested and not episode_over:
            progress.episode, run.action = progress.episode + 1, None  # the resumed run starts a new episode
        if (episode_over or session.stop_requested) and session.checkpoint_due(step):
            run.checkpoint(step)


def main(args: Args) -> str | None:
    """Fine-tune (or resume) one run; returns its run folder."""
    run = start_run(args)
    if run is None:
        return args.resume
    run.session.run(lambda: online_phase(run), lambda: run.checkpoint(run.args.online_steps))
    return run.session.run_dir


if __name__ == "__main__":
    run_cli(main, Args)
