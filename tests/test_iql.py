"""iql.py: expectile loss, capped AWR weights, update order, presets, reward scale; end-to-end
smoke run, resume after SIGKILL, bad input; and a learning check (slow)."""

import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tyro

from algorithms import iql
from common.logger import CHECKPOINT_FILE, read_evaluations
from tests.conftest import kill_after_checkpoint, random_policy_return, run_script, scalar_steps, scores

OBS, ACT, B = 5, 2, 32
TINY = ["--hidden-dims", "64", "64", "--batch-size", "64", "--eval-episodes", "2", "--log-every", "50", "--progress", "False"]


def setup(expectile=0.7, beta=3.0, seed=0):
    args = dataclasses.replace(iql.Args(), hidden_dims=(32, 32), expectile=expectile, beta=beta, dropout_rate=0.0,
                               offline_steps=100, online_steps=0, actor_lr_schedule="constant", seed=seed)
    config = iql.make_config(args, ACT)
    return args, config, iql.create_agent(args, config, OBS, ACT)


def batch(key=0):
    keys = jax.random.split(jax.random.PRNGKey(key), 4)
    return {"observations": jax.random.normal(keys[0], (B, OBS)),
            "actions": jax.random.uniform(keys[1], (B, ACT), minval=-1, maxval=1),
            "rewards": jax.random.normal(keys[2], (B,)), "next_observations": jax.random.normal(keys[3], (B, OBS)),
            "masks": (jnp.arange(B) % 4 != 0).astype(jnp.float32)}


def numeric_expectile(sample, expectile):
    """The m with expectile * E[(X - m)+] = (1 - expectile) * E[(m - X)+], by bisection."""
    low, high = float(sample.min()), float(sample.max())
    for _ in range(100):
        m = (low + high) / 2
        excess = expectile * np.maximum(sample - m, 0).mean() - (1 - expectile) * np.maximum(m - sample, 0).mean()
        low, high = (m, high) if excess > 0 else (low, m)
    return (low + high) / 2


def test_expectile_loss_weights_positive_errors_by_the_expectile():
    # u = Q - V > 0 (V below its target) gets weight `expectile`: V is pushed up, towards an upper expectile.
    np.testing.assert_allclose(iql.expectile_loss(jnp.array([1.0, -1.0, 2.0, -2.0]), 0.9), [0.9, 0.1, 3.6, 0.4],
                               rtol=1e-6)
    np.testing.assert_allclose(iql.expectile_loss(jnp.array([1.0, -1.0]), 0.5), [0.5, 0.5])


def test_expectile_loss_minimiser_is_the_expectile_of_a_skewed_sample():
    sample = np.random.default_rng(0).exponential(1.0, 2000).astype(np.float32)
    grid = jnp.linspace(0.0, 4.0, 8001)
    for expectile in (0.9, 0.7, 0.1):
        losses = jax.vmap(lambda v: iql.expectile_loss(jnp.asarray(sample) - v, expectile).mean())(grid)
        minimiser = float(grid[jnp.argmin(losses)])
        assert minimiser == pytest.approx(numeric_expectile(sample, expectile), abs=1e-3)
    assert numeric_expectile(sample, 0.9) > sample.mean() + 0.5  # the upper expectile is well above the mean


def test_value_network_regresses_to_the_upper_expectile_of_its_targets():
    """The real value_loss, minimised by Adam for one state with a skewed spread of target Qs."""
    _, config, agent = setup(expectile=0.9)
    targets = jnp.asarray(np.random.default_rng(1).exponential(1.0, 256), jnp.float32)
    data = {"observations": jnp.ones((256, OBS))}
    tx = optax.adam(1e-2)

    def step(carry, _):
        params, opt_state = carry
        grads = jax.grad(lambda p: iql.value_loss(p, data, targets, config)[0])(params)
        updates, opt_state = tx.update(grads, opt_state)
        return (optax.apply_updates(params, updates), opt_state), None

    (params, _), _ = jax.jit(lambda p: jax.lax.scan(step, (p, tx.init(p)), None, length=1500))(agent.value.params)
    v = float(config.value.apply({"params": params}, data["observations"][:1])[0])
    assert v == pytest.approx(numeric_expectile(np.asarray(targets), 0.9), abs=0.03)


def test_awr_weights_are_capped_at_100():
    _, config, agent = setup(beta=3.0)
    data = batch()
    mean, log_std = config.actor.apply({"params": agent.actor.params}, data["observations"])
    log_probs = jax.scipy.stats.norm.logpdf(data["actions"], mean, jnp.exp(log_std)).sum(-1)  # no tanh squashing

    huge = jnp.full(B, 1e3)  # exp(3000) overflows: only the cap keeps it finite
    loss, _ = iql.actor_loss(agent.actor.params, jax.random.PRNGKey(0), data, huge, config)
    assert float(loss) == pytest.approx(float(-(100.0 * log_probs).mean()), rel=1e-5)
    np.testing.assert_array_equal(iql.awr_weights(huge, 3.0), 100.0)

    small = jnp.linspace(-1.0, 1.0, B)  # below the cap: exp(beta * A) exactly
    loss, _ = iql.actor_loss(agent.actor.params, jax.random.PRNGKey(0), data, small, config)
    assert float(loss) == pytest.approx(float(-(jnp.exp(3.0 * small) * log_probs).mean()), rel=1e-5)


def test_policy_is_a_gaussian_around_tanh_mean_with_state_independent_std():
    _, config, agent = setup()
    mean, log_std = config.actor.apply({"params": agent.actor.params}, batch()["observations"])
    assert float(jnp.abs(mean).max()) <= 1.0
    np.testing.assert_array_equal(log_std, 0.0)  # zero init, the same for every state
    params = dict(agent.actor.params, log_stds=jnp.array([-9.0, 5.0]))
    _, log_std = config.actor.apply({"params": params}, batch()["observations"])
    np.testing.assert_array_equal(log_std[0], [-5.0, 2.0])  # clipped to [-5, 2]


def test_update_order_value_on_target_min_then_actor_and_critic_on_the_new_value():
    _, config, agent = setup()
    agent = agent.replace(target_critic_params=jax.tree_util.tree_map(
        lambda p: p + 0.1 * jax.random.normal(jax.random.PRNGKey(3), p.shape), agent.target_critic_params))
    data = batch()
    new, info = jax.jit(lambda a, b: iql.update(a, b, config))(agent, data)
    target_q = config.critic.apply({"params": agent.target_critic_params}, data["observations"], data["actions"]).min(0)
    v_loss, _ = iql.value_loss(agent.value.params, data, target_q, config)
    assert float(info["value_loss"]) == pytest.approx(float(v_loss), rel=1e-5)
    new_v = lambda obs: config.value.apply({"params": new.value.params}, obs)  # noqa: E731
    assert float(info["advantage"]) == pytest.approx(float((target_q - new_v(data["observations"])).mean()), abs=1e-5)
    td = data["rewards"] + 0.99 * data["masks"] * new_v(data["next_observations"])
    c_loss, _ = iql.critic_loss(agent.critic.params, data, td, config)
    assert float(info["critic_loss"]) == pytest.approx(float(c_loss), rel=1e-5)
    expected_target = optax.incremental_update(new.critic.params, agent.target_critic_params, 0.005)
    for a, b in zip(jax.tree_util.tree_leaves(new.target_critic_params), jax.tree_util.tree_leaves(expected_target)):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    assert jax.tree_util.tree_leaves(new.critic.params)[0].shape[0] == 2  # the vmapped twins


def test_presets_fill_only_unset_fields_and_pick_the_lr_schedule():
    args = iql.apply_preset(iql.Args(expectile=0.8), "antmaze")
    assert (args.expectile, args.beta, args.eval_episodes, args.eval_every) == (0.8, 10.0, 100, 100_000)
    assert args.online_steps == 1_000_000 and args.actor_lr_schedule == "constant"  # fine-tuning: no decay
    kitchen = iql.apply_preset(iql.Args(), "kitchen")
    assert (kitchen.expectile, kitchen.beta, kitchen.dropout_rate) == (0.7, 0.5, 0.1)
    offline_only = iql.apply_preset(iql.Args(online_steps=0), "locomotion")
    assert (offline_only.expectile, offline_only.beta, offline_only.actor_lr_schedule) == (0.7, 3.0, "cosine")
    schedule = iql.actor_learning_rate(offline_only)
    assert float(schedule(0)) == pytest.approx(3e-4) and float(schedule(1_000_000)) == pytest.approx(0.0, abs=1e-12)
    # An explicit cosine with an online phase decays over the whole run: online lr is never 0.
    both = iql.apply_preset(iql.Args(offline_steps=1000, online_steps=1000, actor_lr_schedule="cosine"), "pointmaze")
    assert float(iql.actor_learning_rate(both)(1000)) == pytest.approx(1.5e-4, rel=1e-3)


def test_locomotion_reward_scale_uses_trajectory_returns():
    # Three trajectories: split by a terminal (row 1), an episode end (row 3) and an observation jump (row 4).
    observations = np.array([[0.0], [1.0], [2.0], [3.0], [9.0], [5.0]], np.float32)
    next_observations = np.array([[1.0], [1.5], [3.0], [3.5], [10.0], [6.0]], np.float32)
    transitions = {"rewards": np.array([1.0, 2.0, 4.0, 4.0, 0.5, 0.5], np.float32),
                   "terminated": np.array([0, 1, 0, 0, 0, 0], bool), "episode_ends": np.array([0, 0, 0, 1, 0, 1], bool),
                   "observations": observations, "next_observations": next_observations}
    # returns 3, 8, 0.5, 0.5 -> 1000 / 7.5
    assert iql.dataset_reward_scale(transitions) == pytest.approx(1000 / 7.5)
    args = iql.resolve_reward_transform(iql.Args(), "locomotion", transitions)
    assert (args.reward_scale, args.reward_bias) == (pytest.approx(1000 / 7.5), 0.0)
    args = iql.resolve_reward_transform(iql.Args(), "antmaze", transitions)
    assert (args.reward_scale, args.reward_bias) == (1.0, -1.0)
    np.testing.assert_array_equal(iql.transform_rewards(np.array([0.0, 1.0]), args), [-1.0, 0.0])
    assert iql.resolve_reward_transform(iql.Args(reward_scale=2.0), "locomotion", transitions).reward_scale == 2.0


def test_every_flag_has_a_docstring():
    import ast
    import inspect

    body = ast.parse(inspect.getsource(iql.Args)).body[0].body
    documented = {node.target.id for node, following in zip(body, body[1:])
                  if isinstance(node, ast.AnnAssign) and isinstance(following, ast.Expr)}
    assert {field.name for field in dataclasses.fields(iql.Args)} <= documented


# ---------------------------------------------------------------------------------------------
# End to end


def test_smoke_run_offline_then_online(tiny_pointmaze, tmp_path):
    result = run_script("iql.py", "--env", tiny_pointmaze, "--offline-steps", "200", "--online-steps", "200",
                        "--eval-every", "100", "--log-dir", str(tmp_path), *TINY)
    assert result.returncode == 0, result.stderr
    (run_dir,) = tmp_path.iterdir()
    assert run_dir.name.startswith("iql__local-pointmaze-umaze-dense-v0__0__")
    config = json.loads((run_dir / "config.json").read_text())
    assert config["algorithm"] == "iql" and (config["expectile"], config["beta"]) == (0.7, 3.0)
    assert config["actor_lr_schedule"] == "constant" and (config["reward_scale"], config["reward_bias"]) == (1.0, 0.0)
    records = read_evaluations(run_dir)
    assert [(r["step"], r["phase"]) for r in records] == [(0, "offline"), (100, "offline"), (200, "offline"),
                                                         (300, "online"), (400, "online")]
    assert {"return", "normalized_score", "success_rate", "wall_time"} <= set(records[-1])
    assert (run_dir / CHECKPOINT_FILE).is_file()
    for tag in ("train/value_loss", "train/critic_loss", "train/actor_loss", "eval/return", "time/sps"):
        assert scalar_steps(run_dir, tag), tag
    assert max(step for step, _ in scalar_steps(run_dir, "train/critic_loss")) == 400  # online updates logged
    policy = iql.load_policy(str(run_dir))
    actions = policy(np.zeros((3, config["observation_dim"]), np.float32))
    assert actions.shape == (3, 2) and np.abs(actions).max() <= 1.0


def test_resume_after_sigkill_in_the_online_phase_matches_uninterrupted_run(tiny_pointmaze, tmp_path):
    # Checkpoints: offline step 150; online at the episode ends (300 env steps) after 450 and 750.
    flags = ["--env", tiny_pointmaze, "--offline-steps", "300", "--online-steps", "900", "--checkpoint-every", "150",
             "--eval-every", "150", *TINY]
    reference_dir = iql.main(tyro.cli(iql.Args, args=[*flags, "--log-dir", str(tmp_path / "full")]))

    run_dir = kill_after_checkpoint("iql.py", flags, tmp_path / "killed",
                                    ready=lambda payload: payload["progress"]["online_step"] > 0)
    assert len(scores(run_dir)) < len(scores(reference_dir))

    iql.main(iql.Args(resume=str(run_dir)))
    assert scores(run_dir) == scores(reference_dir)
    assert scalar_steps(run_dir, "eval/return") == scalar_steps(reference_dir, "eval/return")


@pytest.mark.parametrize("flags, message", [
    (["--expectile", "1.0"], "--expectile must lie strictly between 0 and 1"),
    (["--beta", "-1"], "--beta must be >= 0"),
    (["--env", "Hopper-v5"], "IQL learns from one"),
])
def test_bad_input_gets_one_message_and_exit_2(flags, message, tmp_path):
    start = time.time()
    result = run_script("iql.py", "--log-dir", str(tmp_path), *flags)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len([line for line in result.stderr.splitlines() if line.startswith("error:")]) == 1
    assert time.time() - start < 30
    assert not list(tmp_path.iterdir())  # nothing was started


@pytest.mark.slow
def test_iql_learns_pointmaze_offline(learning_pointmaze, tmp_path):
    """50k real PointMaze UMaze steps, 20k offline updates of 2x64 networks (~20 s). Measured on
    seeds 0-4 of exactly this run: final return 110-122, success rate 1.0; the uniform random
    policy: return 33-68 (52 with the seed used below), success rate 0-0.2."""
    run_dir = iql.main(iql.Args(env=learning_pointmaze, offline_steps=20_000, online_steps=0, hidden_dims=(64, 64),
                                eval_every=20_000, eval_episodes=10, log_dir=str(tmp_path), progress=False))
    first, final = read_evaluations(run_dir)[0], read_evaluations(run_dir)[-1]
    random_return = random_policy_return(learning_pointmaze, 10, seed=0)
    assert final["step"] == 20_000 and final["return"] > first["return"]
    assert final["return"] >= max(1.8 * random_return, random_return + 45), (final, random_return)
    assert final["success_rate"] >= 0.8


# ---------------------------------------------------------------------------------------------
# Actor dropout, the fine-tuning buffer's sampling, and the online rows (issue 7)


def test_actor_dropout_only_while_training():
    """With dropout 0.5: the evaluation policy and exploration use the whole network (the same
    output every call, equal to the dropout-free network's); the AWR loss draws a dropout mask
    from its key (different keys, different losses)."""
    args = dataclasses.replace(setup()[0], dropout_rate=0.5)
    config = iql.make_config(args, ACT)
    agent = iql.create_agent(args, config, OBS, ACT)
    no_dropout = iql.make_config(dataclasses.replace(args, dropout_rate=0.0), ACT)
    data = batch()
    mean, log_std = no_dropout.actor.apply({"params": agent.actor.params}, data["observations"])

    policy = iql.deterministic_policy(config)
    np.testing.assert_array_equal(policy(agent.actor.params, data["observations"]), mean)
    np.testing.assert_array_equal(policy(agent.actor.params, data["observations"]), mean)
    _, action = iql.act(agent, data["observations"], config)
    _, action_key = jax.random.split(agent.key)
    expected = jnp.clip(mean + jnp.exp(log_std) * jax.random.normal(action_key, mean.shape), -1.0, 1.0)
    np.testing.assert_allclose(action, expected, rtol=1e-6, atol=1e-6)

    advantages = jnp.linspace(-0.5, 0.5, B)
    losses = [float(iql.actor_loss(agent.actor.params, jax.random.PRNGKey(k), data, advantages, config)[0])
              for k in (0, 0, 1, 2)]
    assert losses[0] == losses[1]  # the key alone decides the mask
    assert len({round(loss, 6) for loss in losses[1:]}) == 3
    plain = float(iql.actor_loss(agent.actor.params, jax.random.PRNGKey(0), data, advantages, no_dropout)[0])
    assert all(abs(loss - plain) > 1e-4 for loss in losses)


@pytest.mark.parametrize("n_first, n_second", [(300, 100), (50, 450)])
def test_sample_union_draws_offline_and_online_rows_in_proportion_to_their_counts(n_first, n_second):
    """200k rows from a full offline buffer and an online buffer filled to a fraction of its
    capacity: the online share is n_second / (n_first + n_second) within 0.006 (5 binomial standard
    deviations; a share from capacities, or half and half, is 0.15 or more away), every filled row
    is drawn, no unfilled row is."""
    from common import buffers

    first = buffers.from_arrays({"source": np.full(n_first, 1.0, np.float32),
                                 "index": np.arange(n_first, dtype=np.float32)})
    second = buffers.empty_like({"source": np.float32(0), "index": np.float32(0)}, 1000)
    second = buffers.insert_rows(second, {"source": np.full(n_second, 2.0, np.float32),
                                          "index": np.arange(n_second, dtype=np.float32)})
    rows = jax.jit(buffers.sample_union, static_argnums=3)(jax.random.PRNGKey(0), first, second, (200_000,))
    source, index = np.asarray(rows["source"]), np.asarray(rows["index"])
    assert set(np.unique(source)) == {1.0, 2.0}  # never an unfilled row (source 0)
    share = float((source == 2.0).mean())
    assert abs(share - n_second / (n_first + n_second)) < 0.006, share
    assert set(np.unique(index[source == 1.0])) == set(range(n_first))
    assert set(np.unique(index[source == 2.0])) == set(range(n_second))


def test_online_rows_get_the_dataset_reward_transform_and_masks_from_terminations(tmp_path):
    """Eight online steps whose raw rewards are those of a small locomotion dataset: each online
    row's reward equals the dataset row's after IQL's transform (1000 / return span, here with an
    explicit bias -1 too), and the mask is 0 only at the termination (step 3), not at the
    time-limit truncation (step 6)."""
    import gymnasium as gym

    from common import buffers, datasets
    from tests.conftest import RecordingEvaluator, ScriptedEnv, quiet_session, strong_types

    raw = np.array([0.5, 1.0, 2.0, 0.25, 3.0, 1.5, 0.75, 2.5], np.float32)
    terminated = np.array([0, 0, 1, 0, 0, 0, 0, 0], bool)
    episode_ends = np.array([0, 0, 1, 0, 0, 1, 0, 1], bool)
    observations = np.arange(8, dtype=np.float32)[:, None].repeat(OBS, 1)
    transitions = {"observations": observations, "actions": np.zeros((8, ACT), np.float32), "rewards": raw,
                   "next_observations": observations + 1, "terminated": terminated, "truncated": episode_ends & ~terminated,
                   "episode_ends": episode_ends}
    args = dataclasses.replace(setup()[0], hidden_dims=(8,), batch_size=4, utd=1, offline_steps=0, online_steps=8,
                               eval_every=1000, log_every=1000, checkpoint_every=10**9, checkpoint_minutes=1e9,
                               reward_bias=-1.0)
    args = iql.resolve_reward_transform(args, "locomotion", transitions)
    assert args.reward_scale == pytest.approx(1000 / (4.75 - 3.25)) and args.reward_bias == -1.0  # returns 3.5, 4.75, 3.25
    rows = iql.offline_rows(transitions, gym.spaces.Box(-1.0, 1.0, (ACT,)), args)

    config = iql.make_config(args, ACT)
    agent = strong_types(iql.create_agent(args, config, OBS, ACT))
    offline = buffers.from_arrays(rows)
    online = buffers.empty_like({key: value[0] for key, value in rows.items()}, args.online_steps)
    script = [(float(r), bool(t), bool(e and not t)) for r, t, e in zip(raw, terminated, episode_ends)]
    task = datasets.Task("locomotion-test", "local/test-v0", None, "locomotion")
    online_step, offline_chunk, first_action = iql.make_step_functions(args, config)
    session = quiet_session(iql.ALGORITHM, args, tmp_path, RecordingEvaluator(np.zeros((1, OBS))))
    run = iql.Run(args=args, task=task, session=session, env=ScriptedEnv(script, OBS, ACT), offline=offline,
                  online=online, agent=agent, action=None, policy=iql.deterministic_policy(config),
                  online_step=online_step, offline_chunk=offline_chunk, first_action=first_action)
    iql.online_phase(run)
    online_rows = buffers.filled_rows(run.online)
    np.testing.assert_array_equal(online_rows["observations"][:, 0], np.arange(8))
    np.testing.assert_allclose(online_rows["rewards"], rows["rewards"], rtol=1e-6)
    np.testing.assert_array_equal(online_rows["masks"], [1, 1, 0, 1, 1, 1, 1, 1])
    np.testing.assert_array_equal(online_rows["masks"], rows["masks"])
