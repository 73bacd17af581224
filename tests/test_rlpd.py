"""RLPD's pure pieces: subset-min target, entropy backup, mean-of-E actor, scanned update."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from algorithms import rlpd

OBS, ACT, B = 5, 2, 32


def setup(num_qs=5, num_min_qs=2, backup_entropy=False, seed=0, discount=1.0):
    args = dataclasses.replace(rlpd.Args(), hidden_dims=(32, 32), num_qs=num_qs, num_min_qs=num_min_qs,
                               backup_entropy=backup_entropy, seed=seed, discount=discount)
    config = rlpd.make_config(args, ACT)
    agent = rlpd.create_agent(args, config, OBS, ACT)
    # Different target params per member (init makes them differ already; perturb to be sure).
    agent = agent.replace(target_critic_params=jax.tree_util.tree_map(
        lambda p: p + 0.1 * jax.random.normal(jax.random.PRNGKey(7), p.shape), agent.target_critic_params))
    return args, config, agent


def batch(key=0, masks=1.0):
    keys = jax.random.split(jax.random.PRNGKey(key), 3)
    return {"observations": jax.random.normal(keys[0], (B, OBS)), "actions": jax.random.uniform(keys[1], (B, ACT), minval=-1, maxval=1),
            "rewards": jnp.zeros(B), "next_observations": jax.random.normal(keys[2], (B, OBS)), "masks": jnp.full(B, masks)}


def near_deterministic(agent):
    """Make the actor's std e^-20 so its samples are tanh(mean) to float precision."""
    params = jax.tree_util.tree_map(lambda x: x, agent.actor.params)
    last = sorted(k for k in params if k.startswith("Dense"))[-1]  # the log-std head
    params[last] = {"kernel": jnp.zeros_like(params[last]["kernel"]), "bias": jnp.full_like(params[last]["bias"], -30.0)}
    return agent.replace(actor=agent.actor.replace(params=params))


def all_target_qs(agent, config, data):
    """Q of every target critic at (s', tanh(mean(s')))."""
    mean, _ = config.actor.apply({"params": agent.actor.params}, data["next_observations"])
    return config.critic.apply({"params": agent.target_critic_params}, data["next_observations"], jnp.tanh(mean))


def target(agent, config, data, key, temperature=1.0):
    return rlpd.td_target(jax.random.PRNGKey(key), data, agent.actor.params, agent.target_critic_params, temperature, config)


def test_target_with_all_members_is_the_ensemble_min():
    _, config, agent = setup(num_qs=5, num_min_qs=5)
    agent, data = near_deterministic(agent), batch()
    np.testing.assert_allclose(target(agent, config, data, 0), all_target_qs(agent, config, data).min(0), rtol=1e-5, atol=1e-5)


def test_target_is_min_over_a_random_subset_without_replacement():
    _, config, agent = setup(num_qs=5, num_min_qs=2)
    agent, data = near_deterministic(agent), batch()
    qs = np.asarray(all_target_qs(agent, config, data))
    pairs = {(i, j): np.minimum(qs[i], qs[j]) for i in range(5) for j in range(i + 1, 5)}
    used = set()
    for key in range(40):
        value = np.asarray(target(agent, config, data, key))
        matches = [pair for pair, expected in pairs.items() if np.allclose(value, expected, atol=1e-5)]
        assert matches, "the target must be the min of two distinct members"
        used.update(matches)
    assert len(used) >= 5  # the subset is redrawn: many different pairs over 40 keys


def test_target_with_one_member_is_one_critic():
    _, config, agent = setup(num_qs=5, num_min_qs=1)
    agent, data = near_deterministic(agent), batch()
    qs = np.asarray(all_target_qs(agent, config, data))
    value = np.asarray(target(agent, config, data, 3))
    assert any(np.allclose(value, qs[i], atol=1e-5) for i in range(5))


def test_entropy_backup_subtracts_gamma_alpha_log_pi():
    _, config_on, agent = setup(backup_entropy=True, discount=0.9)
    config_off = dataclasses.replace(config_on, backup_entropy=False)
    data = batch()
    off = target(agent, config_off, data, 0)
    diff1 = target(agent, config_on, data, 0, temperature=1.0) - off
    diff2 = target(agent, config_on, data, 0, temperature=2.0) - off
    assert float(jnp.abs(diff1).max()) > 1e-3
    np.testing.assert_allclose(diff2, 2 * diff1, rtol=1e-4, atol=1e-5)  # proportional to alpha
    # ...and to gamma: -gamma * mask * alpha * log pi(a'|s'), with a' drawn as td_target draws it.
    mean, log_std = config_on.actor.apply({"params": agent.actor.params}, data["next_observations"])
    _, log_pi = rlpd.sample_tanh_normal(jax.random.split(jax.random.PRNGKey(0))[0], mean, log_std)
    np.testing.assert_allclose(diff1, -0.9 * log_pi, rtol=1e-4, atol=1e-4)
    # With a near-deterministic actor log pi is large and positive: the backup must LOWER the target.
    sharp = near_deterministic(agent)
    assert float((target(sharp, config_on, data, 0) - target(sharp, config_off, data, 0)).max()) < 0
    # Terminal transitions (mask 0) get no entropy term.
    terminal = batch(masks=0.0)
    np.testing.assert_allclose(target(agent, config_on, terminal, 0), target(agent, config_off, terminal, 0))


def test_actor_uses_mean_over_all_critics():
    _, config, agent = setup(num_qs=5)
    agent, data = near_deterministic(agent), batch()
    loss, _ = rlpd.actor_loss(agent.actor.params, jax.random.PRNGKey(0), data, agent.critic.params, 0.0, config)
    mean, _ = config.actor.apply({"params": agent.actor.params}, data["observations"])
    qs = config.critic.apply({"params": agent.critic.params}, data["observations"], jnp.tanh(mean))
    assert float(loss) == pytest.approx(float(-qs.mean()), rel=1e-4, abs=1e-5)
    assert abs(float(-qs.min(0).mean()) - float(loss)) > 1e-3  # not the min


def test_scanned_update_equals_sequential_steps():
    _, config, agent = setup()
    G = 4
    batches = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *[batch(k) for k in range(G)])
    scanned, _ = jax.jit(lambda a, b: rlpd.update_on_batches(a, b, config))(agent, batches)
    sequential = agent
    for g in range(G):
        sequential, _ = rlpd.update_critic(sequential, jax.tree_util.tree_map(lambda x: x[g], batches), config)
    sequential, _ = rlpd.update_actor_and_temperature(sequential, batch(G - 1), config)
    for a, b in zip(jax.tree_util.tree_leaves(scanned), jax.tree_util.tree_leaves(sequential)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    # ...and the G steps really happened: the critic moved G Adam steps.
    assert int(scanned.critic.step) == G and int(scanned.actor.step) == 1


def test_presets_fill_only_unset_fields():
    args = rlpd.apply_preset(rlpd.Args(num_min_qs=2), "antmaze")
    assert args.hidden_dims == (256, 256, 256) and args.backup_entropy is False
    assert args.num_min_qs == 2  # explicit flag wins over the preset's 1
    assert args.online_steps == 300_000 and args.start_training == 5000
    assert rlpd.apply_preset(rlpd.Args(), "kitchen").hidden_dims == (256, 256)


def test_antmaze_reward_transform():
    np.testing.assert_array_equal(rlpd.transform_rewards(np.array([0.0, 1.0]), "antmaze"), [-1.0, 0.0])
    np.testing.assert_array_equal(rlpd.transform_rewards(np.array([0.0, 1.0]), "locomotion"), [0.0, 1.0])


def test_tanh_normal_log_prob_matches_change_of_variables():
    mean, log_std = jnp.array([[0.3, -0.2]]), jnp.array([[-0.5, 0.1]])
    action, log_prob = rlpd.sample_tanh_normal(jax.random.PRNGKey(0), mean, log_std)
    pre = jnp.arctanh(action)
    gaussian = jax.scipy.stats.norm.logpdf(pre, mean, jnp.exp(log_std)).sum()
    np.testing.assert_allclose(log_prob[0], gaussian - jnp.log(1 - action**2).sum(), rtol=1e-4)
