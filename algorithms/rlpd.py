"""RLPD: Reinforcement Learning with Prior Data, in one file.

Ball, Smith, Kostrikov, Levine. "Efficient Online Reinforcement Learning with Offline Data",
ICML 2023, https://arxiv.org/abs/2302.02948. Follows the official code, ikostrikov/rlpd
(`train_finetuning.py`, `rlpd/agents/sac/sac_learner.py`, `configs/rlpd_config.py`).

SAC trained from the start on a 50/50 mix of offline data and the online replay buffer
("symmetric sampling"), with an ensemble of E=10 LayerNorm critics whose TD target is the min
over a random subset of Z target critics, and G=20 critic updates per environment step.

  * Per environment step, ONE jitted call inserts the transition into the on-device buffer,
    samples G x B rows (each of the G minibatches holds round(B * offline_ratio) offline rows;
    the official code interleaves offline and online rows to the same effect at ratio 0.5),
    runs the G critic steps in a `lax.scan`, then one actor and one temperature step on the
    last minibatch, and samples the next action. The official code unrolls G in Python.
  * Critic target: r + gamma * mask * min over Z random target critics of Q(s', a'), minus
    gamma * mask * alpha * log pi(a'|s') when `backup_entropy` is on (the paper's Algorithm 1,
    line 17, has this sign wrong; the code subtracts). Actor: alpha * log pi - MEAN over all E.
  * Temperature: alpha = exp(log_alpha), loss alpha * (entropy - target_entropy),
    target entropy -|A|/2, initial alpha 1.
  * Xavier-uniform initialisation; critic MLP Dense -> LayerNorm -> ReLU; actor without
    LayerNorm; tanh-Gaussian actor with log-std clipped to [-20, 2].
  * AntMaze: reward r - 1 on every transition (offline and online), Minari AntMaze relabelled
    to D4RL semantics (common/datasets.py); masks are 1 - terminated, never 1 - truncated.

Presets (`README.md`'s commands for `train_finetuning.py` with `configs/rlpd_config.py`, which
builds on `configs/sac_config.py` and `configs/td_config.py`): locomotion (the "D4RL Locomotion"
command) 2x256, Z=2, entropy backup on, 250k steps; antmaze ("D4RL Antmaze") 3x256, Z=1, no
entropy backup, 300k steps; adroit ("Adroit Binary") 3x256, Z=2, no entropy backup, 1M steps;
random actions for the first 5000 steps (`--start_training 5000` in all three); G=20 in all.
Other domains (kitchen) take the official defaults (2x256, Z=2, backup on, G=20, `max_steps`
1M, `start_training` 10000). pointmaze is our own preset, sized for the no-argument run to
finish in about 10 minutes on a 2-core CPU: 2x64, Z=2, backup on, G=10, 15k steps, 1000 random,
20 evaluation episodes (still E=10 LayerNorm critics and symmetric sampling).

Deviations: none in the algorithm (benchmarks/parity.py checks the update against SACLearner's).
Logged differently: the temperature after its step (the official code logs it before), and the
mean of the G critic steps' metrics (the official code logs the last one's). Our own additions: `--offline-steps` (the official
`pretrain_steps`, offline-only updates before the online phase, 0 by default), atomic
checkpoints at episode boundaries with exact resume, and an offline ratio other than 0.5.

Usage:
  python algorithms/rlpd.py                                   # local PointMaze data, built on first use
  python algorithms/rlpd.py --env antmaze-large               # D4RL/antmaze/large-diverse-v1
  python algorithms/rlpd.py --env Hopper-v5 --offline-ratio 0 # online SAC from scratch
  python algorithms/rlpd.py --resume runs/rlpd__...           # continue a stopped run
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
from flax import struct
from flax.training.train_state import TrainState

if __package__ in (None, ""):  # run as `python algorithms/rlpd.py`: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import buffers, datasets  # noqa: E402
from common import run as harness
from common.cli import UserError, check, run_cli

ALGORITHM = "rlpd"
# Offline-phase updates (each G critic steps and one actor step) per jitted call between looks for
# a stop signal: about 1.6 s at the AntMaze preset on a 2-core CPU (G=20, 2.5 updates/s), so a stop
# reaches its checkpoint within seconds.
STOP_CHECK_UPDATES = 4


@tyro.conf.configure(tyro.conf.FlagConversionOff)  # every boolean flag takes a value: --progress False
@dataclasses.dataclass
class Args:
    """RLPD (Ball et al. 2023). Flags marked [preset] take the domain's preset unless given:
    locomotion 2x256, Z=2, entropy backup, G=20, 250k steps, 5000 random; antmaze 3x256, Z=1, no
    backup, G=20, 300k, 5000; adroit 3x256, Z=2, no backup, G=20, 1M, 5000; pointmaze (ours,
    about 10 minutes on a 2-core CPU) 2x64, Z=2, backup, G=10, 15k, 1000; other 2x256, Z=2,
    backup, G=20, 1M, 10000. A step is an environment step online and one update (G critic
    steps) offline."""

    # --- run ---
    env: str = "local/pointmaze/medium-30k-v0"
    """D4RL-style name (antmaze-large), Minari id, local dataset id, or Gymnasium id (online-only, with --offline-ratio 0)."""
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
    offline_steps: int = 0
    """Offline-only updates before the online phase (official `pretrain_steps`; RLPD uses 0)."""
    online_steps: int | None = None
    """Environment steps of the online phase [preset]."""
    start_training: int | None = None
    """Random-action steps before the first update [preset]."""
    utd: int | None = None
    """G: critic gradient steps per environment step [preset: 20 on every paper domain]."""
    batch_size: int = 256
    """Minibatch size B of one gradient step (offline and online rows together)."""
    offline_ratio: float = 0.5
    """Share of every minibatch drawn from the offline data (0 = online only, RLPD: 0.5)."""
    eval_every: int = 5000
    """Evaluate every this many steps of each phase."""
    eval_episodes: int | None = None
    """Episodes per evaluation (deterministic policy) [preset: 10; pointmaze 20]."""
    log_every: int = 1000
    """Write training scalars every this many steps."""

    # --- network ---
    hidden_dims: tuple[int, ...] | None = None
    """Hidden layer widths of actor and critic MLPs [preset]."""
    num_qs: int = 10
    """E: critics in the ensemble."""

    # --- algorithm ---
    num_min_qs: int | None = None
    """Z: target critics drawn (without replacement) for the min in the TD target [preset]."""
    backup_entropy: bool | None = None
    """Subtract gamma * alpha * log pi(a'|s') in the TD target [preset]."""
    discount: float = 0.99
    """Discount factor gamma."""
    tau: float = 0.005
    """Target network update rate."""
    actor_lr: float = 3e-4
    """Actor learning rate (Adam)."""
    critic_lr: float = 3e-4
    """Critic learning rate (Adam)."""
    temp_lr: float = 3e-4
    """Temperature learning rate (Adam)."""
    init_temperature: float = 1.0
    """Initial entropy temperature alpha."""
    target_entropy: float | None = None
    """Target entropy; default -|A|/2."""


PRESETS: dict[str, dict[str, Any]] = {
    "locomotion": dict(hidden_dims=(256, 256), num_min_qs=2, backup_entropy=True, utd=20,
                       online_steps=250_000, start_training=5000, eval_episodes=10),
    "antmaze": dict(hidden_dims=(256, 256, 256), num_min_qs=1, backup_entropy=False, utd=20,
                    online_steps=300_000, start_training=5000, eval_episodes=10),
    "adroit": dict(hidden_dims=(256, 256, 256), num_min_qs=2, backup_entropy=False, utd=20,
                   online_steps=1_000_000, start_training=5000, eval_episodes=10),
    # ours: the no-argument run, sized for about 10 minutes on a 2-core CPU (PRESET_NOTES)
    "pointmaze": dict(hidden_dims=(64, 64), num_min_qs=2, backup_entropy=True, utd=10,
                      online_steps=15_000, start_training=1000, eval_episodes=20),
    "default": dict(hidden_dims=(256, 256), num_min_qs=2, backup_entropy=True, utd=20,
                    online_steps=1_000_000, start_training=10_000, eval_episodes=10),
}
# What a preset is and why, printed at the start of a new run (domains whose preset is not a paper's).
PRESET_NOTES: dict[str, str] = {
    "pointmaze": "ours, not a paper's: RLPD as in the paper (E=10 LayerNorm critics, Z=2, symmetric "
                 "sampling) on 2x64 networks with G=10 for 15k steps, sized to finish in about 10 minutes "
                 "on a 2-core CPU; the paper presets (G=20, 2x256 or 3x256) apply to the paper datasets.",
}


def apply_preset(args: Args, domain: str) -> Args:
    """Fill every unset (None) field from the domain's preset."""
    preset = PRESETS.get(domain, PRESETS["default"])
    filled = {name: value for name, value in preset.items() if getattr(args, name) is None}
    return dataclasses.replace(args, **filled)


def transform_rewards(rewards: np.ndarray, domain: str) -> np.ndarray:
    """RLPD's reward transform: r - 1 on AntMaze, unchanged elsewhere."""
    return rewards - 1.0 if domain == "antmaze" else rewards


# ---------------------------------------------------------------------------------------------
# Networks

default_init = nn.initializers.xavier_uniform


class MLP(nn.Module):
    hidden_dims: tuple[int, ...]
    layer_norm: bool = False

    @nn.compact
    def __call__(self, x):
        for width in self.hidden_dims:
            x = nn.Dense(width, kernel_init=default_init())(x)
            if self.layer_norm:
                x = nn.LayerNorm()(x)
            x = nn.relu(x)
        return x


class Critic(nn.Module):
    hidden_dims: tuple[int, ...]

    @nn.compact
    def __call__(self, observations, actions):
        x = MLP(self.hidden_dims, layer_norm=True)(jnp.concatenate([observations, actions], -1))
        return nn.Dense(1, kernel_init=default_init())(x).squeeze(-1)


class CriticEnsemble(nn.Module):
    """`num` independent critics evaluated in one vmapped call; output shape (num, batch)."""

    hidden_dims: tuple[int, ...]
    num: int

    @nn.compact
    def __call__(self, observations, actions):
        ensemble = nn.vmap(Critic, variable_axes={"params": 0}, split_rngs={"params": True},
                           in_axes=None, out_axes=0, axis_size=self.num)
        return ensemble(self.hidden_dims)(observations, actions)


class Actor(nn.Module):
    """Tanh-Gaussian policy head: returns the Gaussian's mean and log-std before the tanh."""

    hidden_dims: tuple[int, ...]
    action_dim: int

    @nn.compact
    def __call__(self, observations):
        x = MLP(self.hidden_dims)(observations)
        mean = nn.Dense(self.action_dim, kernel_init=default_init())(x)
        log_std = nn.Dense(self.action_dim, kernel_init=default_init())(x)
        return mean, jnp.clip(log_std, -20.0, 2.0)


class Temperature(nn.Module):
    init_value: float = 1.0

    @nn.compact
    def __call__(self):
        log_temp = self.param("log_temp", lambda _: jnp.full((), jnp.log(self.init_value)))
        return jnp.exp(log_temp)


def sample_tanh_normal(key, mean, log_std):
    """A tanh-squashed Gaussian sample and its log-probability (summed over action dims)."""
    noise = jax.random.normal(key, mean.shape)
    pre_tanh = mean + jnp.exp(log_std) * noise
    gaussian_log_prob = -0.5 * noise**2 - log_std - 0.5 * jnp.log(2.0 * jnp.pi)
    # log(1 - tanh(x)^2), written stably
    log_det = 2.0 * (jnp.log(2.0) - pre_tanh - jax.nn.softplus(-2.0 * pre_tanh))
    return jnp.tanh(pre_tanh), (gaussian_log_prob - log_det).sum(-1)


# ---------------------------------------------------------------------------------------------
# Agent state and losses


@struct.dataclass
class Config:
    """Static settings the jitted functions close over."""

    actor: Actor = struct.field(pytree_node=False)
    critic: CriticEnsemble = struct.field(pytree_node=False)
    target_critic: CriticEnsemble = struct.field(pytree_node=False)  # the Z-member subset
    num_qs: int = struct.field(pytree_node=False)
    num_min_qs: int = struct.field(pytree_node=False)
    discount: float = struct.field(pytree_node=False)
    tau: float = struct.field(pytree_node=False)
    backup_entropy: bool = struct.field(pytree_node=False)
    target_entropy: float = struct.field(pytree_node=False)


class Agent(struct.PyTreeNode):
    actor: TrainState
    critic: TrainState
    target_critic_params: Any
    temperature: TrainState
    key: jax.Array


def make_config(args: Args, action_dim: int) -> Config:
    hidden = tuple(args.hidden_dims)
    target_entropy = -action_dim / 2 if args.target_entropy is None else args.target_entropy
    return Config(Actor(hidden, action_dim), CriticEnsemble(hidden, args.num_qs),
                  CriticEnsemble(hidden, args.num_min_qs), args.num_qs, args.num_min_qs,
                  args.discount, args.tau, args.backup_entropy, target_entropy)


def create_agent(args: Args, config: Config, observation_dim: int, action_dim: int) -> Agent:
    key, actor_key, critic_key, temp_key = jax.random.split(jax.random.PRNGKey(args.seed), 4)
    observations, actions = jnp.zeros((1, observation_dim)), jnp.zeros((1, action_dim))
    actor = TrainState.create(apply_fn=config.actor.apply, tx=optax.adam(args.actor_lr),
                              params=config.actor.init(actor_key, observations)["params"])
    critic_params = config.critic.init(critic_key, observations, actions)["params"]
    critic = TrainState.create(apply_fn=config.critic.apply, params=critic_params, tx=optax.adam(args.critic_lr))
    temperature_module = Temperature(args.init_temperature)
    temperature = TrainState.create(apply_fn=temperature_module.apply, tx=optax.adam(args.temp_lr),
                                    params=temperature_module.init(temp_key)["params"])
    target_params = jax.tree_util.tree_map(jnp.copy, critic_params)  # own buffers: the state is donated
    agent = Agent(actor, critic, target_params, temperature, key)
    return harness.strongly_typed(agent)  # no recompilation when the first update fixes the dtypes


def td_target(key, batch, actor_params, target_params, temperature, config: Config):
    """r + gamma * mask * (min over a random Z-subset of target critics - [alpha * log pi])."""
    action_key, subset_key = jax.random.split(key)
    mean, log_std = config.actor.apply({"params": actor_params}, batch["next_observations"])
    next_actions, next_log_probs = sample_tanh_normal(action_key, mean, log_std)
    members = jax.random.choice(subset_key, config.num_qs, (config.num_min_qs,), replace=False)
    subset = jax.tree_util.tree_map(lambda leaf: leaf[members], target_params)
    next_q = config.target_critic.apply({"params": subset}, batch["next_observations"], next_actions).min(0)
    if config.backup_entropy:
        next_q = next_q - temperature * next_log_probs
    return batch["rewards"] + config.discount * batch["masks"] * next_q


def critic_loss(critic_params, batch, target_q, config: Config):
    """Mean squared TD error over every critic of the ensemble and every row."""
    qs = config.critic.apply({"params": critic_params}, batch["observations"], batch["actions"])
    return ((qs - target_q) ** 2).mean(), qs.mean()


def actor_loss(actor_params, key, batch, critic_params, temperature, config: Config):
    """alpha * log pi(a|s) - MEAN over all E critics of Q(s, a), a ~ pi(s)."""
    mean, log_std = config.actor.apply({"params": actor_params}, batch["observations"])
    actions, log_probs = sample_tanh_normal(key, mean, log_std)
    q = config.critic.apply({"params": critic_params}, batch["observations"], actions).mean(0)
    return (temperature * log_probs - q).mean(), -log_probs.mean()


def temperature_loss(temperature_params, entropy, target_entropy, temperature_apply):
    temperature = temperature_apply({"params": temperature_params})
    return temperature * (entropy - target_entropy)


def current_temperature(agent: Agent):
    return agent.temperature.apply_fn({"params": agent.temperature.params})


def update_critic(agent: Agent, batch, config: Config):
    key, target_key = jax.random.split(agent.key)
    target_q = td_target(target_key, batch, agent.actor.params, agent.target_critic_params,
                         current_temperature(agent), config)
    (loss, q), grads = jax.value_and_grad(critic_loss, has_aux=True)(agent.critic.params, batch, target_q, config)
    critic = agent.critic.apply_gradients(grads=grads)
    target = optax.incremental_update(critic.params, agent.target_critic_params, config.tau)
    return agent.replace(critic=critic, target_critic_params=target, key=key), {"critic_loss": loss, "q": q}


def update_actor_and_temperature(agent: Agent, batch, config: Config):
    key, actor_key = jax.random.split(agent.key)
    (loss, entropy), grads = jax.value_and_grad(actor_loss, has_aux=True)(
        agent.actor.params, actor_key, batch, agent.critic.params, current_temperature(agent), config)
    actor = agent.actor.apply_gradients(grads=grads)
    temp_loss, temp_grads = jax.value_and_grad(temperature_loss)(
        agent.temperature.params, entropy, config.target_entropy, agent.temperature.apply_fn)
    temperature = agent.temperature.apply_gradients(grads=temp_grads)
    agent = agent.replace(actor=actor, temperature=temperature, key=key)
    return agent, {"actor_loss": loss, "entropy": entropy, "temperature_loss": temp_loss,
                   "temperature": current_temperature(agent)}


def update_on_batches(agent: Agent, batches, config: Config):
    """G critic steps, one per minibatch of `batches` (leading axis G), in a lax.scan; then one
    actor and one temperature step on the last minibatch."""
    agent, critic_info = jax.lax.scan(functools.partial(update_critic, config=config), agent, batches)
    last = jax.tree_util.tree_map(lambda leaf: leaf[-1], batches)
    agent, actor_info = update_actor_and_temperature(agent, last, config)
    return agent, {**jax.tree_util.tree_map(jnp.mean, critic_info), **actor_info}


def update(agent: Agent, offline, online, config: Config, utd: int, batch_size: int, offline_ratio: float):
    """Sample G x B rows on the device, then `update_on_batches`."""
    key, sample_key = jax.random.split(agent.key)
    batches = buffers.sample_mixed(sample_key, offline, online, utd, batch_size, offline_ratio)
    return update_on_batches(agent.replace(key=key), batches, config)


def act(agent: Agent, observation, config: Config):
    """A stochastic action for exploration; the key advances inside the agent."""
    key, action_key = jax.random.split(agent.key)
    mean, log_std = config.actor.apply({"params": agent.actor.params}, observation)
    action, _ = sample_tanh_normal(action_key, mean, log_std)
    return agent.replace(key=key), action


def deterministic_policy(config: Config) -> Callable:
    """The evaluation policy: tanh of the Gaussian mean."""
    @jax.jit
    def policy(actor_params, observations):
        return jnp.tanh(config.actor.apply({"params": actor_params}, observations)[0])
    return policy


def make_step_functions(args: Args, config: Config):
    """The jitted calls of the training loop. `online_step` is THE one call per env step."""

    def online_step(agent, online, offline, transition, observation, train: bool):
        online = buffers.insert(online, transition)
        info = {}
        if train:
            agent, info = update(agent, offline, online, config, args.utd, args.batch_size, args.offline_ratio)
        agent, action = act(agent, observation, config)
        return agent, online, action, info

    def offline_chunk(agent, offline, num_updates: int):
        def body(agent, _):
            return update(agent, offline, None, config, args.utd, args.batch_size, 1.0)
        agent, infos = jax.lax.scan(body, agent, None, length=num_updates)
        return agent, jax.tree_util.tree_map(lambda leaf: leaf[-1], infos)

    online_step = jax.jit(online_step, static_argnames="train", donate_argnums=(0, 1))
    offline_chunk = jax.jit(offline_chunk, static_argnames="num_updates", donate_argnums=0)
    return online_step, offline_chunk


# ---------------------------------------------------------------------------------------------
# Flags and data

RULES: list[harness.Rule] = [
    ("offline_ratio", harness.fraction, "must lie in [0, 1]"),
    ("utd", harness.at_least(1), "(G) must be at least 1"),
    ("start_training", harness.at_least(0), "must be >= 0"),
    ("num_qs", harness.at_least(1), "must be >= 1"),
    ("hidden_dims", harness.widths, "must be positive widths"),
    ("actor_lr", harness.positive, "must be positive"),
    ("critic_lr", harness.positive, "must be positive"),
    ("temp_lr", harness.positive, "must be positive"),
    ("init_temperature", harness.positive, "must be positive"),
]


def validate(args: Args) -> None:
    """Every flag check that needs no data; runs before anything is loaded or compiled."""
    harness.check_flags(args, RULES + harness.RUN_RULES)
    n_offline = args.batch_size * args.offline_ratio
    check(abs(n_offline - round(n_offline)) < 1e-6,
          f"--batch-size {args.batch_size} cannot be split by --offline-ratio {args.offline_ratio}: "
          f"batch-size x ratio = {n_offline:g} offline rows must be a whole number.")
    check(args.num_min_qs is None or 1 <= args.num_min_qs <= args.num_qs,
          f"--num-min-qs must lie in [1, --num-qs={args.num_qs}], got {args.num_min_qs} "
          f"(from the domain preset unless you passed it).")


def needs_offline_data(args: Args) -> bool:
    return args.offline_ratio > 0 or args.offline_steps > 0


def load_offline_data(task: datasets.Task, dataset, action_space) -> dict[str, np.ndarray]:
    """The dataset as RLPD's training rows: rewards transformed, masks = 1 - terminated."""
    transitions = datasets.dataset_transitions(dataset, task.domain)
    return {
        "observations": transitions["observations"],
        "actions": datasets.clip_actions(transitions["actions"], action_space),
        "rewards": transform_rewards(transitions["rewards"], task.domain),
        "next_observations": transitions["next_observations"],
        "masks": 1.0 - transitions["terminated"].astype(np.float32),
    }


CHECKPOINT_EXTRAS = ("numpy_rng", "pending_action")  # besides common/run.py's payload


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
    offline: buffers.Buffer | None
    online: buffers.Buffer
    agent: Agent
    rng: np.random.Generator
    action: np.ndarray | None  # the next action, computed by the last jitted call
    policy: Callable
    online_step: Callable
    offline_chunk: Callable

    def evaluate(self, phase: str, step: int) -> None:
        self.session.evaluate(lambda observations: self.policy(self.agent.actor.params, observations), phase, step)

    def checkpoint(self, step: int) -> None:
        self.session.save(step, self.agent, self.online, numpy_rng=harness.rng_state(self.rng),
                          pending_action=harness.optional_array(self.action))

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
    if needs_offline_data(args) and task.dataset_id is None:
        raise UserError(f"--env {args.env} is an environment without a dataset: pass --offline-ratio 0 "
                        f"(and --offline-steps 0) for online-only RLPD, or name a dataset.")
    dataset = datasets.load_dataset(task) if task.dataset_id is not None else None
    make_env = datasets.env_factory(task, dataset)
    env = make_env()
    observation_dim, action_dim = env.observation_space.shape[0], env.action_space.shape[0]
    if args.target_entropy is None:
        args = dataclasses.replace(args, target_entropy=-action_dim / 2)
    offline = None
    if needs_offline_data(args):
        offline_rows = load_offline_data(task, dataset, dataset.action_space)
        check(offline_rows["observations"].shape[1] == observation_dim,
              f"dataset observations have {offline_rows['observations'].shape[1]} dims, the env {observation_dim}.")
        offline = buffers.from_arrays(offline_rows)
    run_dir = run_dir or harness.create_run_dir(args, ALGORITHM)

    config = make_config(args, action_dim)
    agent = create_agent(args, config, observation_dim, action_dim)
    example = {"observations": np.zeros(observation_dim, np.float32), "actions": np.zeros(action_dim, np.float32),
               "rewards": np.float32(0), "next_observations": np.zeros(observation_dim, np.float32),
               "masks": np.float32(0)}
    online = buffers.empty_like(example, max(args.online_steps, 1))
    rng, action, elapsed = np.random.default_rng(args.seed), None, None
    progress = harness.Progress(next_checkpoint=args.checkpoint_every)
    if saved is not None:
        agent, online, progress, elapsed = harness.restore_checkpoint(saved, run_dir, agent, online)
        rng, action = harness.rng_from_state(saved["numpy_rng"]), harness.array_or_none(saved["pending_action"])
    if progress.finished:
        print(f"{run_dir} has already finished.")
        return None
    session = harness.open_session(ALGORITHM, args, task, run_dir, progress, elapsed, (observation_dim, action_dim),
                                   make_env, datasets.scoring_for(dataset, task.domain))
    return Run(args, task, session, env, offline, online, agent, rng, action, deterministic_policy(config),
               *make_step_functions(args, config))


def offline_phase(run: Run) -> None:
    """Offline-only updates in jitted chunks, evaluating every `eval_every` updates.

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
    """One environment step and ONE jitted call (insert, G+2 updates, next action) per iteration.

    Checkpoints fall at episode ends (every --checkpoint-every steps or --checkpoint-minutes),
    where a resumed run continues exactly; a stop signal mid-episode checkpoints at once, and the
    resumed run starts a new episode there (the simulator's state is not saved).
    """
    args, progress, session, base = run.args, run.session.progress, run.session, run.args.offline_steps
    if progress.online_step == 0 and run.action is None and not session.evaluated_at(base):  # the phase starts
        run.evaluate("online" if args.offline_steps == 0 else "offline", base)
    if session.stop_requested and progress.online_step == 0 and run.action is None:
        run.checkpoint(base)  # before the first action moves the agent (an owed evaluation is of this one)
    session.logger.new_phase("online")
    observation, episode_return = run.reset_env(), 0.0
    while progress.online_step < args.online_steps:
        if progress.online_step == args.start_training:
            session.logger.new_phase("online, training")  # the ETA of random-action steps is no guide
        if progress.online_step < args.start_training or run.action is None:
            run.action = run.rng.uniform(-1.0, 1.0, run.env.action_space.shape).astype(np.float32)
        next_observation, reward, terminated, truncated, _ = run.env.step(np.asarray(run.action))
        episode_return += reward
        transition = {"observations": observation, "actions": np.asarray(run.action, np.float32),
                      "rewards": np.float32(transform_rewards(reward, run.task.domain)),
                      "next_observations": next_observation, "masks": np.float32(1.0 - terminated)}
        step = base + progress.online_step + 1
        episode_over = terminated or truncated
        if episode_over:
            session.logger.scalars({"train/episode_return": episode_return}, step)
            progress.episode += 1
            next_observation, episode_return = run.reset_env(), 0.0
        train = progress.online_step >= args.start_training
        run.agent, run.online, run.action, info = run.online_step(
            run.agent, run.online, run.offline, transition, next_observation, train)
        observation = next_observation
        progress.online_step += 1
        session.logger.advance()
        if train and (progress.online_step % args.log_every == 0 or progress.online_step == args.start_training + 1):
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
