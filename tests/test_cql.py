"""cql.py and calql.py: the pure functions (penalty, calibration, Lagrange, backups, log-probs)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from algorithms import calql, cql
from common import buffers

OBSERVATION_DIM, ACTION_DIM = 3, 2


def small_args(module, **overrides):
    preset = module.apply_preset(module.Args(), "pointmaze")
    settings = dict(actor_hidden_dims=(32, 32), critic_hidden_dims=(32, 32), bc_steps=0, cql_n_actions=4,
                    target_entropy=-float(ACTION_DIM))
    return dataclasses.replace(preset, **{**settings, **overrides})


def setup(module, **overrides):
    args = small_args(module, **overrides)
    config = module.make_config(args, ACTION_DIM)
    return args, config, module.create_agent(args, config, OBSERVATION_DIM, ACTION_DIM)


def toy_batch(n=64, seed=0, mc_returns=None):
    rng = np.random.default_rng(seed)
    batch = {"observations": rng.normal(size=(n, OBSERVATION_DIM)).astype(np.float32),
             "actions": np.clip(rng.normal(0.5, 0.1, (n, ACTION_DIM)), -0.99, 0.99).astype(np.float32),
             "rewards": np.zeros(n, np.float32), "next_observations": rng.normal(size=(n, OBSERVATION_DIM)).astype(np.float32),
             "masks": np.zeros(n, np.float32)}
    if mc_returns is not None:
        batch["mc_returns"] = np.full(n, mc_returns, np.float32)
    return batch


def q_gap_after_training(module, cql_alpha, steps=150):
    """Mean Q(s, uniform random a) minus mean Q(s, a_data) after `steps` updates on a toy batch
    whose TD targets are all 0 (rewards 0, terminal)."""
    args, config, agent = setup(module, cql_alpha=cql_alpha, cql_lagrange=False)
    batch = toy_batch(mc_returns=-100.0)  # far below every Q: the Cal-QL bound is inactive
    offline = buffers.from_arrays(batch)
    train = jax.jit(lambda agent, n: module.train(agent, offline, None, n, config, 64, 1.0))
    agent, _ = train(agent, steps)
    observations = jnp.asarray(batch["observations"])
    random_actions = jax.random.uniform(jax.random.PRNGKey(7), (16, 64, ACTION_DIM), minval=-1, maxval=1)
    q_random = config.critic.apply({"params": agent.critic.params},
                                   jnp.broadcast_to(observations, (16, *observations.shape)), random_actions)
    q_data = config.critic.apply({"params": agent.critic.params}, observations, jnp.asarray(batch["actions"]))
    return float(q_random.mean() - q_data.mean())


@pytest.mark.parametrize("module", [cql, calql], ids=["cql", "calql"])
def test_cql_penalty_lowers_q_on_unseen_actions(module):
    with_penalty, without_penalty = q_gap_after_training(module, 5.0), q_gap_after_training(module, 0.0)
    assert with_penalty < -0.2, with_penalty  # pushed down below the data actions' values
    assert with_penalty < without_penalty - 0.2  # without it, no gap forms (|gap| < 1e-3)


@pytest.mark.parametrize("module", [cql, calql], ids=["cql", "calql"])
def test_tanh_normal_log_prob_of_sampled_actions_matches(module):
    mean, log_std = jnp.array([[0.3, -1.0]]), jnp.array([[-0.5, 0.2]])
    actions, log_probs = module.sample_tanh_normal(jax.random.PRNGKey(0), mean, log_std, 5)
    np.testing.assert_allclose(module.log_prob_of(actions, mean, log_std), log_probs, rtol=1e-4, atol=1e-4)


def test_calibration_floors_exactly_the_policy_samples_below_the_return():
    args, config, agent = setup(calql)
    batch = {key: jnp.asarray(value) for key, value in toy_batch().items()}
    samples = calql.ood_q_values(jax.random.PRNGKey(3), batch, agent.actor.params, agent.critic.params, config)
    # a per-row return-to-go in the middle of the sampled values, so some samples lie below it
    mc_returns = jnp.median(samples["policy"], axis=(0, 1)) + 0.01 * jnp.arange(64)
    floored = calql.calibrate(samples, mc_returns)
    for name in ("policy", "next_policy"):
        below = samples[name] < mc_returns
        assert 0 < int(below.sum()) < below.size
        np.testing.assert_array_equal(floored[name], jnp.where(below, mc_returns, samples[name]))
    assert bool((samples["random"] < mc_returns).any())  # the bound would change some of them...
    np.testing.assert_array_equal(floored["random"], samples["random"])  # ...but leaves them alone
    for name in ("policy_log_probs", "next_policy_log_probs"):
        np.testing.assert_array_equal(floored[name], samples[name])


def test_critic_loss_uses_the_calibrated_samples():
    """The penalty inside the critic loss is computed from the floored policy samples and the
    untouched random samples."""
    args, config, agent = setup(calql)
    batch = {key: jnp.asarray(value) for key, value in toy_batch(mc_returns=0.0).items()}
    key = jax.random.PRNGKey(4)
    samples = calql.ood_q_values(key, batch, agent.actor.params, agent.critic.params, config)
    batch["mc_returns"] = jnp.quantile(samples["random"], 0.5) + 0.01 * jnp.arange(64)  # some of every kind below
    data_q = config.critic.apply({"params": agent.critic.params}, batch["observations"], batch["actions"])
    expected = calql.cql_gap(calql.calibrate(samples, batch["mc_returns"]), data_q, config).mean()
    _, (gap, info) = calql.critic_loss(agent.critic.params, key, batch, jnp.zeros(64), agent.actor.params, 1.0, config)
    np.testing.assert_allclose(info["cql_gap"], expected, rtol=1e-5)
    uncalibrated = calql.cql_gap(samples, data_q, config).mean()
    assert abs(float(expected - uncalibrated)) > 1e-3  # the bound mattered here
    _, (_, info_off) = calql.critic_loss(agent.critic.params, key, batch, jnp.zeros(64), agent.actor.params, 1.0,
                                         config.replace(calibration=False))
    np.testing.assert_allclose(info_off["cql_gap"], uncalibrated, rtol=1e-5)


@pytest.mark.parametrize("module", [cql, calql], ids=["cql", "calql"])
def test_lagrange_multiplier_rises_above_the_threshold_and_falls_below(module):
    args, config, agent = setup(module, cql_lagrange=True)
    threshold = config.lagrange_threshold if module is cql else config.cql_target_action_gap * config.cql_alpha
    state = agent.alpha_prime

    def gradient(gap_value):
        gap = jnp.full((2,), gap_value / config.cql_alpha)  # cql_alpha x gap = gap_value
        return jax.grad(module.alpha_prime_loss)(state.params, gap, state.apply_fn, config)["log_value"]

    assert gradient(threshold + 1.0) < 0 < gradient(threshold - 1.0)  # descent raises / lowers alpha'


def test_max_target_backups_differ_as_in_the_official_codes():
    """CQL: min over critics of each critic's max over actions; Cal-QL: max over actions of the
    min over critics. Both exceed the single-sample target on average."""
    batch = {key: jnp.asarray(value) for key, value in toy_batch().items()}
    batch["masks"] = jnp.ones(64)
    for module in (cql, calql):
        args, config, agent = setup(module, max_target_backup=True)
        perturbed = jax.tree_util.tree_map(  # make the two critics disagree
            lambda leaf: leaf + 0.3 * jax.random.normal(jax.random.PRNGKey(1), leaf.shape), agent.target_critic_params)
        with_max = module.td_target(jax.random.PRNGKey(2), batch, agent.actor.params, perturbed, 1.0, config)
        single = module.td_target(jax.random.PRNGKey(2), batch, agent.actor.params, perturbed, 1.0,
                                  config.replace(max_target_backup=False))
        assert float(with_max.mean()) > float(single.mean())
    cql_config = setup(cql, max_target_backup=True)[1]
    calql_config = setup(calql, max_target_backup=True)[1]
    key, params = jax.random.PRNGKey(2), setup(cql)[2].actor.params
    assert not np.allclose(cql.td_target(key, batch, params, perturbed, 1.0, cql_config),
                           calql.td_target(key, batch, params, perturbed, 1.0, calql_config))


def test_behaviour_cloning_warm_start_trains_towards_data_actions():
    """The data actions sit near 0.5; the critics learn nothing useful (all targets 0), so only
    the warm start's log-likelihood term moves the policy mean towards them."""
    def mean_action_after_training(bc_steps):
        args, config, agent = setup(cql, bc_steps=bc_steps, cql_alpha=0.0)
        batch = toy_batch()
        offline = buffers.from_arrays(batch)
        agent, _ = jax.jit(lambda agent, n: cql.train(agent, offline, None, n, config, 64, 1.0))(agent, 300)
        return float(jnp.tanh(config.actor.apply({"params": agent.actor.params}, batch["observations"])[0]).mean())

    assert mean_action_after_training(10_000) > 0.2
    assert abs(mean_action_after_training(0)) < 0.1
