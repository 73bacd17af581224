"""RLPD's pure pieces: subset-min target, entropy backup, mean-of-E actor, scanned update."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from algorithms import rlpd
from common import buffers

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


# ---------------------------------------------------------------------------------------------
# Every loss term against a hand computation, and the online loop's bookkeeping (issue 7)


def numpy_critics(params, observations, actions):
    """Every critic of the ensemble by hand: (Dense -> LayerNorm -> ReLU) per hidden layer, then
    Dense(1); shape (E, B)."""
    p = jax.tree_util.tree_map(lambda leaf: np.asarray(leaf, np.float64), params)["VmapCritic_0"]
    layers = len([name for name in p["MLP_0"] if name.startswith("Dense")])
    x = np.concatenate([np.asarray(observations, np.float64), np.asarray(actions, np.float64)], -1)
    qs = []
    for e in range(p["Dense_0"]["kernel"].shape[0]):
        h = x
        for i in range(layers):
            dense, norm = p["MLP_0"][f"Dense_{i}"], p["MLP_0"][f"LayerNorm_{i}"]
            h = h @ dense["kernel"][e] + dense["bias"][e]
            h = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-6)
            h = np.maximum(h * norm["scale"][e] + norm["bias"][e], 0.0)
        qs.append(h @ p["Dense_0"]["kernel"][e][:, 0] + p["Dense_0"]["bias"][e][0])
    return np.stack(qs)


def numpy_actor(params, observations):
    """The actor by hand: Dense -> ReLU per hidden layer (no LayerNorm), then the mean head and the
    log-std head clipped to [-20, 2]."""
    p = jax.tree_util.tree_map(lambda leaf: np.asarray(leaf, np.float64), params)
    h = np.asarray(observations, np.float64)
    for i in range(len(p["MLP_0"])):
        h = np.maximum(h @ p["MLP_0"][f"Dense_{i}"]["kernel"] + p["MLP_0"][f"Dense_{i}"]["bias"], 0.0)
    mean = h @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]
    return mean, np.clip(h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"], -20.0, 2.0)


def perturbed(params, seed, scale=0.3):
    """Every leaf moved by Gaussian noise (LayerNorm scales and biases leave their 1 / 0 init)."""
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree_util.tree_unflatten(tree, [leaf + scale * jax.random.normal(k, leaf.shape)
                                               for leaf, k in zip(leaves, keys)])


def test_critic_loss_is_the_mean_squared_error_of_every_critic_by_hand():
    _, config, agent = setup(num_qs=3)
    params, data = perturbed(agent.critic.params, 1), batch(2)
    target_q = jax.random.normal(jax.random.PRNGKey(3), (B,))
    qs = numpy_critics(params, data["observations"], data["actions"])
    loss, q_mean = rlpd.critic_loss(params, data, target_q, config)
    assert float(loss) == pytest.approx(float(((qs - np.asarray(target_q)) ** 2).mean()), rel=1e-5)
    assert float(q_mean) == pytest.approx(float(qs.mean()), rel=1e-4, abs=1e-5)


def test_layer_norm_in_the_critics_only():
    args, config, agent = setup(num_qs=3)
    hidden = len(args.hidden_dims)
    critic_layers = agent.critic.params["VmapCritic_0"]["MLP_0"]
    assert sorted(name for name in critic_layers if name.startswith("LayerNorm")) == [
        f"LayerNorm_{i}" for i in range(hidden)]
    actor_names = {path[-2].key for path, _ in jax.tree_util.tree_flatten_with_path(agent.actor.params)[0]}
    assert not any(name.startswith("LayerNorm") for name in actor_names)
    # ...and the forward passes are exactly the hand-written ones (LayerNorm between Dense and ReLU).
    critic_params, actor_params, data = perturbed(agent.critic.params, 4), perturbed(agent.actor.params, 5), batch(6)
    np.testing.assert_allclose(config.critic.apply({"params": critic_params}, data["observations"], data["actions"]),
                               numpy_critics(critic_params, data["observations"], data["actions"]), rtol=1e-4, atol=1e-4)
    mean, log_std = config.actor.apply({"params": actor_params}, data["observations"])
    expected_mean, expected_log_std = numpy_actor(actor_params, data["observations"])
    np.testing.assert_allclose(mean, expected_mean, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(log_std, expected_log_std, rtol=1e-4, atol=1e-4)


def test_log_std_is_clipped_to_minus_20_and_2():
    _, config, agent = setup()
    params = jax.tree_util.tree_map(lambda x: x, agent.actor.params)
    params["Dense_1"] = {"kernel": jnp.zeros_like(params["Dense_1"]["kernel"]),
                         "bias": jnp.array([50.0, -50.0])}
    _, log_std = config.actor.apply({"params": params}, batch()["observations"])
    np.testing.assert_array_equal(log_std, np.broadcast_to([2.0, -20.0], (B, ACT)))
    params["Dense_1"]["bias"] = jnp.array([1.9, -19.5])  # inside the bounds: untouched
    _, log_std = config.actor.apply({"params": params}, batch()["observations"])
    np.testing.assert_allclose(log_std, np.broadcast_to([1.9, -19.5], (B, ACT)), rtol=1e-6)


def test_polyak_update_moves_the_targets_by_tau_towards_the_new_critic():
    assert rlpd.Args().tau == 0.005
    _, config, agent = setup()  # the target params differ from the critic's (perturbed)
    assert config.tau == 0.005
    new, _ = rlpd.update_critic(agent, batch(), config)
    old_targets = jax.tree_util.tree_leaves(agent.target_critic_params)
    for old, critic, target in zip(old_targets, jax.tree_util.tree_leaves(new.critic.params),
                                   jax.tree_util.tree_leaves(new.target_critic_params)):
        np.testing.assert_allclose(target, 0.005 * critic + 0.995 * old, rtol=1e-5, atol=1e-6)
    moved = [float(jnp.abs(c - o).max()) for c, o in zip(jax.tree_util.tree_leaves(new.critic.params), old_targets)]
    assert max(moved) > 0.05  # target and critic far apart: a swapped argument order would show


def empty_online_buffer(capacity):
    example = {"observations": np.zeros(OBS, np.float32), "actions": np.zeros(ACT, np.float32),
               "rewards": np.float32(0), "next_observations": np.zeros(OBS, np.float32), "masks": np.float32(0)}
    return buffers.empty_like(example, capacity)


def test_polyak_update_runs_after_every_critic_step_of_an_env_step():
    """With a zero critic learning rate the critic stands still, so after G critic steps the
    targets must be critic + (1 - tau)^G (old target - critic): G Polyak steps, not one."""
    G, tau = 4, 0.1
    args, _, _ = setup(num_qs=2, num_min_qs=1)
    args = dataclasses.replace(args, hidden_dims=(8,), critic_lr=0.0, tau=tau, utd=G, batch_size=4,
                               target_entropy=-1.0)
    config = rlpd.make_config(args, ACT)
    agent = rlpd.create_agent(args, config, OBS, ACT)
    agent = agent.replace(target_critic_params=perturbed(agent.target_critic_params, 8))
    old_targets = [np.asarray(leaf) for leaf in jax.tree_util.tree_leaves(agent.target_critic_params)]
    critic = [np.asarray(leaf) for leaf in jax.tree_util.tree_leaves(agent.critic.params)]
    online_step, _ = rlpd.make_step_functions(args, config)
    offline = buffers.from_arrays({key: np.asarray(value) for key, value in batch().items()})
    transition = {key: np.asarray(value[0]) for key, value in batch(1).items()}
    agent, _, _, _ = online_step(agent, empty_online_buffer(8), offline, transition, transition["observations"], True)
    assert int(agent.critic.step) == G
    for old, c, target, now in zip(old_targets, critic, jax.tree_util.tree_leaves(agent.target_critic_params),
                                   jax.tree_util.tree_leaves(agent.critic.params)):
        np.testing.assert_array_equal(now, c)  # lr 0: the critic did not move
        np.testing.assert_allclose(target, c + (1 - tau) ** G * (old - c), rtol=1e-5, atol=1e-6)


def test_temperature_loss_is_alpha_times_entropy_minus_target():
    module = rlpd.Temperature(rlpd.Args().init_temperature)
    params = module.init(jax.random.PRNGKey(0))["params"]
    assert float(module.apply({"params": params})) == pytest.approx(1.0)  # initial alpha 1
    params = {"log_temp": jnp.log(2.0)}
    assert float(rlpd.temperature_loss(params, 1.5, -1.0, module.apply)) == pytest.approx(2.0 * 2.5, rel=1e-6)
    grad = jax.grad(rlpd.temperature_loss)
    # d/d log alpha: entropy above its target -> positive gradient -> descent lowers alpha; below -> raises.
    assert float(grad(params, 1.5, -1.0, module.apply)["log_temp"]) == pytest.approx(5.0, rel=1e-6)
    assert float(grad(params, -3.0, -1.0, module.apply)["log_temp"]) == pytest.approx(-4.0, rel=1e-6)


def test_temperature_step_follows_the_actor_entropy():
    _, config, agent = setup()
    data = batch()
    for target_entropy, direction in ((-50.0, -1), (50.0, 1)):
        cfg = config.replace(target_entropy=target_entropy)
        new, info = rlpd.update_actor_and_temperature(agent, data, cfg)
        _, actor_key = jax.random.split(agent.key)
        _, entropy = rlpd.actor_loss(agent.actor.params, actor_key, data, agent.critic.params, 1.0, cfg)
        assert float(info["entropy"]) == pytest.approx(float(entropy), rel=1e-5)
        assert float(info["temperature_loss"]) == pytest.approx(1.0 * (float(entropy) - target_entropy), rel=1e-5)
        assert direction * (float(rlpd.current_temperature(new)) - 1.0) > 1e-5


def test_actor_loss_has_the_alpha_log_pi_term():
    _, config, agent = setup(num_qs=3)
    data, key = batch(3), jax.random.PRNGKey(5)
    without, _ = rlpd.actor_loss(agent.actor.params, key, data, agent.critic.params, 0.0, config)
    with_alpha, entropy = rlpd.actor_loss(agent.actor.params, key, data, agent.critic.params, 0.7, config)
    mean, log_std = config.actor.apply({"params": agent.actor.params}, data["observations"])
    _, log_pi = rlpd.sample_tanh_normal(key, mean, log_std)
    assert abs(float(log_pi.mean())) > 0.05
    assert float(with_alpha - without) == pytest.approx(0.7 * float(log_pi.mean()), rel=1e-4, abs=1e-6)
    assert float(entropy) == pytest.approx(-float(log_pi.mean()), rel=1e-5)


def test_online_loop_masks_only_terminations_and_waits_for_start_training(tmp_path):
    """12 env steps of an AntMaze-domain run: a termination at step 4, a time-limit truncation at
    step 9. Rows: r - 1, mask 0 only at the termination; no update before `start_training` (5),
    then G critic steps per env step."""
    from common import datasets
    from tests.conftest import RecordingEvaluator, ScriptedEnv, quiet_session, strong_types

    args, _, _ = setup(num_qs=2, num_min_qs=1)
    args = dataclasses.replace(args, hidden_dims=(8,), utd=2, batch_size=4, start_training=5, online_steps=12,
                               eval_every=1000, log_every=1000, checkpoint_every=10**9, checkpoint_minutes=1e9,
                               target_entropy=-1.0)
    config = rlpd.make_config(args, ACT)
    agent = strong_types(rlpd.create_agent(args, config, OBS, ACT))
    script = [(0.0, False, False)] * 12
    script[3], script[8] = (1.0, True, False), (0.0, False, True)
    online_step, offline_chunk = rlpd.make_step_functions(args, config)
    calls = []

    def recording_step(agent, online, offline, transition, observation, train):
        before = int(agent.critic.step)
        result = online_step(agent, online, offline, transition, observation, train)
        calls.append((train, before, int(result[0].critic.step)))
        return result

    offline = buffers.from_arrays({key: np.asarray(value) for key, value in batch().items()})
    task = datasets.Task("antmaze-test", "antmaze-test", None, "antmaze")
    session = quiet_session(rlpd.ALGORITHM, args, tmp_path, RecordingEvaluator(np.zeros((1, OBS))))
    run = rlpd.Run(args=args, task=task, session=session, env=ScriptedEnv(script, OBS, ACT), offline=offline,
                   online=empty_online_buffer(12), agent=agent, rng=np.random.default_rng(0), action=None,
                   policy=rlpd.deterministic_policy(config), online_step=recording_step, offline_chunk=offline_chunk)
    rlpd.online_phase(run)

    rows = buffers.filled_rows(run.online)
    np.testing.assert_array_equal(rows["observations"][:, 0], np.arange(12))  # every step, in order
    np.testing.assert_array_equal(rows["masks"], [1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1, 1])
    np.testing.assert_array_equal(rows["rewards"], [-1, -1, -1, 0, -1, -1, -1, -1, -1, -1, -1, -1])
    assert [train for train, _, _ in calls] == [False] * 5 + [True] * 7
    assert [(before, after) for _, before, after in calls[:5]] == [(0, 0)] * 5
    assert [after for _, _, after in calls[5:]] == [2 * (i + 1) for i in range(7)]
    assert int(run.agent.actor.step) == 7  # one actor step per env step once training


def test_evaluation_policy_is_tanh_of_the_mean(tmp_path):
    """The policy `start_run` hands to the evaluations is tanh(mean), not a sample, not the raw mean."""
    from tests.conftest import RecordingEvaluator

    run = rlpd.start_run(rlpd.Args(env="InvertedPendulum-v5", offline_ratio=0.0, online_steps=10,
                                   hidden_dims=(8,), eval_episodes=1, log_dir=str(tmp_path), progress=False))
    try:
        params = jax.tree_util.tree_map(lambda x: x, run.agent.actor.params)
        params["Dense_0"] = {"kernel": 0.1 * params["Dense_0"]["kernel"],  # mean near 1.5: tanh matters
                             "bias": params["Dense_0"]["bias"] + 1.5}
        params["Dense_1"]["bias"] = params["Dense_1"]["bias"] + 2.0  # wide Gaussian: a sample would differ
        run.agent = run.agent.replace(actor=run.agent.actor.replace(params=params))
        observations = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
        original, run.session.evaluator = run.session.evaluator, RecordingEvaluator(observations)
        original.close()
        run.evaluate("online", 0)
        run.evaluate("online", 0)
        mean, _ = run.agent.actor.apply_fn({"params": params}, observations)
        assert float(jnp.abs(mean).min()) > 1.0
        assert len(run.session.evaluator.actions) == 2
        for actions in run.session.evaluator.actions:
            np.testing.assert_allclose(actions, np.tanh(np.asarray(mean)), rtol=1e-5, atol=1e-6)
    finally:
        run.session.logger.close()
        run.env.close()
