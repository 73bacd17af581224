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
    if module is cql:  # cql.py's own recipe (its pointmaze preset is calql.py's, uncalibrated)
        settings.update(recipe="rlkit", max_target_backup=False)
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


@pytest.mark.slow  # outside CI's 20-minute budget; `pytest -m slow` runs it
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


@pytest.mark.slow  # outside CI's 20-minute budget; `pytest -m slow` runs it
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


# ---------------------------------------------------------------------------------------------
# Every loss term against a hand computation in numpy (issue 7). The networks' parameters are
# read out and applied by hand; the random draws are the ones the code makes from the same keys.

B_SMALL = 6


def cql_recipes():
    """cql.py's forms of the Lagrange penalty and the max-target backup: both recipes where it
    has its --recipe switch, else its one form (None)."""
    return ["rlkit", "jaxcql"] if "recipe" in {field.name for field in dataclasses.fields(cql.Args)} else [None]


FORMS = [(cql, recipe) for recipe in cql_recipes()] + [(calql, None)]
FORM_IDS = [f"cql-{recipe}" if recipe else "cql" for recipe in cql_recipes()] + ["calql"]


def rlkit_form(module, recipe) -> bool:
    """rlkit's CQL: min over critics of each one's max backup, alpha' from 1, threshold after the
    weight. Cal-QL (and JaxCQL): max over actions of the min over critics, alpha' from e."""
    return module is cql and recipe != "jaxcql"


def form_setup(module, recipe, **overrides):
    fields = {field.name for field in dataclasses.fields(module.Args)}
    if recipe is not None:
        overrides["recipe"] = recipe
    overrides = {name: value for name, value in overrides.items() if name in fields}
    overrides.setdefault("actor_hidden_dims", (16,))
    overrides.setdefault("critic_hidden_dims", (16,))
    return setup(module, **overrides)


def as64(tree):
    return jax.tree_util.tree_map(lambda leaf: np.asarray(leaf, np.float64), tree)


def perturbed(params, seed, scale):
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree_util.tree_unflatten(tree, [leaf + scale * jax.random.normal(k, jnp.shape(leaf))
                                               for leaf, k in zip(leaves, keys)])


def numpy_critics(params, observations, actions):
    """Every critic by hand (Dense -> ReLU per hidden layer, then Dense(1)) at observations
    broadcast against actions (..., B, |A|); shape (critics, ..., B)."""
    p = as64(params)["VmapCritic_0"]
    observations = np.broadcast_to(np.asarray(observations, np.float64),
                                   np.shape(actions)[:-1] + (np.shape(observations)[-1],))
    x = np.concatenate([observations, np.asarray(actions, np.float64)], -1)
    qs = []
    for e in range(p["Dense_0"]["kernel"].shape[0]):
        h = x
        for i in range(len(p["MLP_0"])):
            h = np.maximum(h @ p["MLP_0"][f"Dense_{i}"]["kernel"][e] + p["MLP_0"][f"Dense_{i}"]["bias"][e], 0.0)
        qs.append(h @ p["Dense_0"]["kernel"][e][:, 0] + p["Dense_0"]["bias"][e][0])
    return np.stack(qs)


def numpy_actor(params, observations):
    """JaxCQL's actor by hand: mean and log-std = clip(multiplier * head + offset, -20, 2)."""
    p = as64(params)
    h = np.asarray(observations, np.float64)
    for i in range(len(p["MLP_0"])):
        h = np.maximum(h @ p["MLP_0"][f"Dense_{i}"]["kernel"] + p["MLP_0"][f"Dense_{i}"]["bias"], 0.0)
    out = h @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]
    mean, head = out[..., :ACTION_DIM], out[..., ACTION_DIM:]
    return mean, np.clip(p["log_std_multiplier"] * head + p["log_std_offset"], -20.0, 2.0)


def numpy_tanh_normal(mean, log_std, noise):
    """tanh(mean + std * noise) and its log-density by the change of variables."""
    pre_tanh = mean + np.exp(log_std) * noise
    actions = np.tanh(pre_tanh)
    gaussian = -0.5 * noise**2 - log_std - 0.5 * np.log(2 * np.pi)
    return actions, (gaussian - np.log(1.0 - actions**2)).sum(-1)


def numpy_logsumexp(x, axis):
    top = x.max(axis, keepdims=True)
    return (top + np.log(np.exp(x - top).sum(axis, keepdims=True))).squeeze(axis)


def small_batch(seed, masks=None):
    rng = np.random.default_rng(seed)
    batch = toy_batch(B_SMALL, seed)
    batch["actions"] = rng.uniform(-0.9, 0.9, (B_SMALL, ACTION_DIM)).astype(np.float32)
    batch["rewards"] = rng.normal(size=B_SMALL).astype(np.float32)
    batch["masks"] = np.ones(B_SMALL, np.float32) if masks is None else np.asarray(masks, np.float32)
    return batch


@pytest.mark.parametrize("module", [cql, calql], ids=["cql", "calql"])
def test_cql_penalty_is_the_importance_sampled_log_sum_exp_by_hand(module):
    """Per critic: T * log sum_j exp(w_j / T) - Q(s, a_data), batch-mean, over n uniform actions
    (w = Q(s, a) - log 0.5^|A|), n policy actions at s and n policy actions at s' (all scored at
    s; w = Q - log pi); Cal-QL floors the two policy kinds at the return-to-go first."""
    n, temperature, alpha = 3, 2.5, 5.0
    args, config, agent = form_setup(module, None, cql_n_actions=n, cql_temperature=temperature, cql_alpha=alpha,
                                     cql_lagrange=False, cql_importance_sample=True)
    critic_params, actor_params = perturbed(agent.critic.params, 1, 0.5), perturbed(agent.actor.params, 2, 0.3)
    batch = small_batch(3)
    observations, next_observations = batch["observations"], batch["next_observations"]
    key = jax.random.PRNGKey(11)
    random_key, policy_key, next_key = jax.random.split(key, 3)  # the draws ood_q_values makes
    random_actions = np.asarray(jax.random.uniform(random_key, (n, B_SMALL, ACTION_DIM), minval=-1.0, maxval=1.0))
    policy_noise = np.asarray(jax.random.normal(policy_key, (n, B_SMALL, ACTION_DIM)), np.float64)
    next_noise = np.asarray(jax.random.normal(next_key, (n, B_SMALL, ACTION_DIM)), np.float64)

    policy_actions, policy_log_probs = numpy_tanh_normal(*numpy_actor(actor_params, observations), policy_noise)
    next_actions, next_log_probs = numpy_tanh_normal(*numpy_actor(actor_params, next_observations), next_noise)
    q_random = numpy_critics(critic_params, observations, random_actions)  # (critics, n, B)
    q_policy = numpy_critics(critic_params, observations, policy_actions)
    q_next = numpy_critics(critic_params, observations, next_actions)  # next-policy actions, scored at s
    if module is calql:
        batch["mc_returns"] = np.median(q_policy, axis=(0, 1)).astype(np.float32)
        assert 0 < (q_policy < batch["mc_returns"]).sum() < q_policy.size  # the floor acts on some samples
        q_policy = np.maximum(q_policy, batch["mc_returns"])
        q_next = np.maximum(q_next, batch["mc_returns"])
    weighted = np.concatenate([q_random - ACTION_DIM * np.log(0.5), q_next - next_log_probs,
                               q_policy - policy_log_probs], axis=1)
    q_data = numpy_critics(critic_params, observations, batch["actions"])
    expected_gap = (temperature * numpy_logsumexp(weighted / temperature, axis=1) - q_data).mean(-1)
    target_q = np.random.default_rng(4).normal(size=B_SMALL)
    td_loss = ((q_data - target_q) ** 2).mean(-1).sum()

    batch = {name: jnp.asarray(value) for name, value in batch.items()}
    loss, (gap, info) = module.critic_loss(critic_params, key, batch, jnp.asarray(target_q, jnp.float32),
                                           actor_params, 1.0, config)
    np.testing.assert_allclose(gap, expected_gap, rtol=1e-4, atol=1e-4)
    assert float(info["td_loss"]) == pytest.approx(td_loss, rel=1e-4)
    assert float(loss) == pytest.approx(td_loss + alpha * expected_gap.sum(), rel=1e-4, abs=1e-4)


@pytest.mark.parametrize("backup_entropy", [False, True], ids=["plain", "entropy"])
@pytest.mark.parametrize("module", [cql, calql], ids=["cql", "calql"])
def test_td_target_by_hand(module, backup_entropy):
    """r + gamma * mask * (min over target critics of Q(s', a') [- alpha * log pi(a'|s')]), a' ~ pi(s')."""
    args, config, agent = form_setup(module, None, max_target_backup=False, backup_entropy=backup_entropy,
                                     discount=0.9)
    target_params, actor_params = perturbed(agent.target_critic_params, 4, 0.5), perturbed(agent.actor.params, 5, 0.3)
    batch = small_batch(6, masks=[1, 0, 1, 1, 0, 1])
    key = jax.random.PRNGKey(12)
    action_key, _ = jax.random.split(key)
    noise = np.asarray(jax.random.normal(action_key, (B_SMALL, ACTION_DIM)), np.float64)
    next_actions, log_probs = numpy_tanh_normal(*numpy_actor(actor_params, batch["next_observations"]), noise)
    next_q = numpy_critics(target_params, batch["next_observations"], next_actions).min(0)
    if backup_entropy:
        next_q = next_q - 0.3 * log_probs
    expected = batch["rewards"] + 0.9 * batch["masks"] * next_q
    got = module.td_target(key, {k: jnp.asarray(v) for k, v in batch.items()}, actor_params, target_params, 0.3,
                           config)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("module, recipe", FORMS, ids=FORM_IDS)
def test_max_target_backup_is_each_files_own_by_hand(module, recipe):
    """rlkit's CQL: min over critics of each critic's max over the n next actions; Cal-QL (and
    JaxCQL): max over the n actions of the min over critics, with the log pi of that action."""
    n = 4
    args, config, agent = form_setup(module, recipe, max_target_backup=True, backup_entropy=False, cql_n_actions=n,
                                     discount=0.9)
    target_params, actor_params = perturbed(agent.target_critic_params, 7, 0.5), perturbed(agent.actor.params, 8, 0.3)
    batch = small_batch(9)
    key = jax.random.PRNGKey(13)
    action_key, _ = jax.random.split(key)
    noise = np.asarray(jax.random.normal(action_key, (n, B_SMALL, ACTION_DIM)), np.float64)
    mean, log_std = numpy_actor(actor_params, batch["next_observations"])
    next_actions, log_probs = numpy_tanh_normal(mean, log_std, noise)  # (n, B, |A|), (n, B)
    qs = numpy_critics(target_params, batch["next_observations"], next_actions)  # (critics, n, B)
    min_of_max, max_of_min = qs.max(1).min(0), qs.min(0).max(0)
    assert np.abs(min_of_max - max_of_min).max() > 0.05  # the two rules disagree on this data
    own, other = (min_of_max, max_of_min) if rlkit_form(module, recipe) else (max_of_min, min_of_max)
    jbatch = {k: jnp.asarray(v) for k, v in batch.items()}
    got = np.asarray(module.td_target(key, jbatch, actor_params, target_params, 0.3, config))
    np.testing.assert_allclose(got, batch["rewards"] + 0.9 * own, rtol=1e-4, atol=1e-4)
    assert not np.allclose(got, batch["rewards"] + 0.9 * other, rtol=1e-4, atol=1e-4)
    if not rlkit_form(module, recipe):  # the entropy term takes the log pi of the chosen action
        best = qs.min(0).argmax(0)
        got = module.td_target(key, jbatch, actor_params, target_params, 0.3, config.replace(backup_entropy=True))
        expected = batch["rewards"] + 0.9 * (max_of_min - 0.3 * log_probs[best, np.arange(B_SMALL)])
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("module, recipe", FORMS, ids=FORM_IDS)
def test_lagrange_multiplier_start_and_penalty_form(module, recipe):
    """rlkit's CQL: log alpha' from 0 (alpha' = 1), penalty alpha' (alpha gap - threshold);
    Cal-QL and JaxCQL: log alpha' from 1 (alpha' = e), penalty alpha' alpha (gap - target gap)."""
    args, config, agent = form_setup(module, recipe, cql_lagrange=True, cql_alpha=5.0, lagrange_threshold=3.0,
                                     cql_target_action_gap=0.6, cql_n_actions=3)
    log_start = 0.0 if rlkit_form(module, recipe) else 1.0
    assert float(agent.alpha_prime.params["log_value"]) == pytest.approx(log_start, abs=1e-6)
    assert float(module.scalar_value(agent.alpha_prime)) == pytest.approx(np.exp(log_start), rel=1e-6)

    critic_params = perturbed(agent.critic.params, 10, 0.5)
    batch = {k: jnp.asarray(v) for k, v in small_batch(11).items()}
    batch["mc_returns"] = jnp.full(B_SMALL, -1e3)  # Cal-QL's floor inactive
    key, target_q = jax.random.PRNGKey(14), jnp.zeros(B_SMALL)
    loss, (gap, info) = module.critic_loss(critic_params, key, batch, target_q, agent.actor.params, 1.7, config)
    gap = np.asarray(gap, np.float64)
    if rlkit_form(module, recipe):
        penalty = 1.7 * (5.0 * gap - 3.0)
    else:
        penalty = 1.7 * 5.0 * (gap - 0.6)
    assert float(loss) == pytest.approx(float(info["td_loss"]) + penalty.sum(), rel=1e-5, abs=1e-4)
    # The first update weighs the penalty with the starting alpha'.
    _, info = module.update(agent, batch if module is calql else {k: v for k, v in batch.items() if k != "mc_returns"},
                            config)
    assert float(info["alpha_prime"]) == pytest.approx(np.exp(log_start), rel=1e-6)


def test_calql_failure_rule_gives_r_fail_over_one_minus_gamma_on_antmaze_rows(monkeypatch):
    """AntMaze-labelled data (reward = terminal = 1 at the goal) through Cal-QL's preset 10 r - 5:
    a trajectory that never reaches the goal gets -5 / (1 - 0.99) = -500 on every step, offline and
    online; a successful one the discounted sum up to its terminal, and what follows a terminal
    within the same episode is a trajectory of its own."""
    import gymnasium as gym

    from common import datasets

    args = calql.apply_preset(calql.Args(), "antmaze")
    assert (args.reward_scale, args.reward_bias, args.discount) == (10.0, -5.0, 0.99)
    task = datasets.Task("antmaze-test", "local/antmaze/test-v0", None, "antmaze")
    # Episode 1: 5 steps, never at the goal, ends by time limit. Episode 2: the goal at its 3rd
    # step (a terminal), then 2 more steps away from it until the time limit.
    rewards = np.array([0, 0, 0, 0, 0, 0, 0, 1, 0, 0], np.float32)
    terminated = rewards == 1
    episode_ends = np.zeros(10, bool)
    episode_ends[[4, 9]] = True
    observations = np.arange(11, dtype=np.float32)[:, None].repeat(OBSERVATION_DIM, 1)
    transitions = {"observations": np.delete(observations, 5, 0)[:10], "actions": np.zeros((10, ACTION_DIM), np.float32),
                   "rewards": rewards, "terminated": terminated, "truncated": episode_ends.copy(),
                   "episode_ends": episode_ends}
    transitions["next_observations"] = transitions["observations"] + 1
    for name in ("dataset_transitions", "episodes_to_transitions"):  # whichever the loader calls: the
        monkeypatch.setattr(datasets, name, lambda *args, **kwargs: transitions, raising=False)  # labels as given

    class Dataset:
        def iterate_episodes(self):
            return iter(())

    rows = calql.load_offline_data(task, Dataset(), gym.spaces.Box(-1.0, 1.0, (ACTION_DIM,)), args)
    np.testing.assert_array_equal(rows["rewards"], 10 * rewards - 5)
    success = [-5 + 0.99 * (-5 + 0.99 * 5), -5 + 0.99 * 5, 5]
    np.testing.assert_allclose(rows["mc_returns"], [-500] * 5 + success + [-500] * 2, rtol=1e-5)
    np.testing.assert_array_equal(rows["masks"], 1 - terminated)

    def online(step_rewards, masks):
        trajectory = {"observations": [np.zeros(OBSERVATION_DIM)] * len(step_rewards),
                      "actions": [np.zeros(ACTION_DIM)] * len(step_rewards), "rewards": step_rewards,
                      "next_observations": [np.zeros(OBSERVATION_DIM)] * len(step_rewards), "masks": masks}
        return calql.trajectory_rows(trajectory, args, task)["mc_returns"]

    np.testing.assert_allclose(online([-5.0] * 4, [1.0] * 4), [-500] * 4, rtol=1e-5)
    np.testing.assert_allclose(online([-5.0, -5.0, 5.0], [1.0, 1.0, 0.0]), success, rtol=1e-5)


@pytest.mark.parametrize("module", [cql, calql], ids=["cql", "calql"])
def test_each_online_trajectory_is_followed_by_utd_times_its_length_updates(module, tmp_path):
    """Trajectories of 4 (terminated), 3 (truncated) and 2 steps (cut by the budget of 9), utd 3:
    the agent's step counters advance by 12, 9 and 6, after each trajectory is in the buffer."""
    from common import datasets
    from tests.conftest import RecordingEvaluator, ScriptedEnv, quiet_session, strong_types

    args, config, agent = form_setup(module, None, actor_hidden_dims=(8,), critic_hidden_dims=(8,), cql_n_actions=2,
                                     batch_size=4, utd=3, offline_steps=0, online_steps=9, eval_every=1000,
                                     log_every=1000, checkpoint_every=10**9, checkpoint_minutes=1e9)
    agent = strong_types(agent)
    script = [(0.0, False, False)] * 9
    script[3], script[6] = (1.0, True, False), (0.0, False, True)
    offline_rows = toy_batch(16, mc_returns=0.0 if module is calql else None)
    offline = buffers.from_arrays(offline_rows)
    online = buffers.empty_like({key: value[0] for key, value in offline_rows.items()}, args.online_steps)
    train_offline, train_online, act = module.make_step_functions(args, config)
    calls = []

    def recording_train(agent, offline, online, n):
        before = int(agent.critic.step)
        agent, info = train_online(agent, offline, online, n)
        calls.append((int(n), int(online.size), int(agent.critic.step) - before, int(agent.actor.step) - before))
        return agent, info

    task = datasets.Task("locomotion-test", "local/test-v0", None, "locomotion")
    session = quiet_session(module.ALGORITHM, args, tmp_path, RecordingEvaluator(np.zeros((1, OBSERVATION_DIM))))
    run = module.Run(args=args, task=task, session=session, env=ScriptedEnv(script, OBSERVATION_DIM, ACTION_DIM),
                     offline=offline, online=online, agent=agent, policy=module.deterministic_policy(config),
                     train_offline=train_offline, train_online=recording_train, act=act)
    module.online_phase(run)
    assert all(n == critic == actor <= module.STOP_CHECK_UPDATES for n, _, critic, actor in calls)  # in pieces
    per_trajectory = {}
    for n, size, _, _ in calls:  # the online buffer's size tells which trajectory a piece follows
        per_trajectory[size] = per_trajectory.get(size, 0) + n
    assert per_trajectory == {4: 12, 7: 9, 9: 6}
    assert [size for _, size, _, _ in calls] == sorted(size for _, size, _, _ in calls)
    assert int(run.agent.critic.step) == args.utd * args.online_steps
    np.testing.assert_array_equal(buffers.filled_rows(run.online)["masks"], [1, 1, 1, 0, 1, 1, 1, 1, 1])


@pytest.mark.parametrize("module", [cql, calql], ids=lambda module: module.ALGORITHM)
def test_critic_ensemble_is_the_vmapped_ensemble_evaluated_member_by_member(module):
    """The ensemble keeps the parameter layout of one vmapped critic (stacked on a leading axis:
    old checkpoints load) and gives, for every member, what that vmapped call gives, for rows of
    any batch shape and observations broadcast over the sampled actions."""
    import flax.linen as nn

    ensemble = module.CriticEnsemble((16, 16), 3, layer_norm=True)
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    observations = jax.random.normal(keys[0], (5, 6))
    actions = jax.random.uniform(keys[1], (4, 5, 2), minval=-1.0, maxval=1.0)
    params = ensemble.init(keys[2], observations, actions[0])["params"]
    vmapped = nn.vmap(module.Critic, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=None,
                      out_axes=0, axis_size=3)((16, 16), True)
    (name,) = params
    repeated = jnp.broadcast_to(observations, (4, 5, 6))
    expected = vmapped.apply({"params": params[name]}, repeated, actions)
    values = ensemble.apply({"params": params}, observations, actions)
    assert values.shape == (3, 4, 5)
    np.testing.assert_allclose(values, expected, rtol=1e-5, atol=1e-6)
    assert len({float(v) for v in values[:, 0, 0]}) == 3  # three different critics
