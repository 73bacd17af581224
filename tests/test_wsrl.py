"""WSRL: its network (one critic head shared by every member), its pre-training losses, the
returns-to-go and Kitchen terminals of its data, the fine-tuning losses and batch split against
hand computations, one run that pre-trains then fine-tunes, exact resume after a SIGKILL in
either phase, `--pretrained`, and one clear message for bad input."""

from __future__ import annotations

import dataclasses
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tyro

from algorithms import wsrl
from common import buffers, datasets
from common.cli import UserError
from tests.conftest import kill_after_checkpoint, run_script, scores

OBSERVATION_DIM, ACTION_DIM, ROWS = 6, 2, 8
TINY = ["--offline-steps", "200", "--offline-batch-size", "64", "--actor-hidden-dims", "32", "32",
        "--critic-hidden-dims", "32", "32", "--ensemble-size", "4", "--cql-n-actions", "4", "--batch-size", "64",
        "--warmup-steps", "100", "--online-steps", "700", "--eval-every", "350", "--eval-episodes", "2",
        "--log-every", "50", "--checkpoint-every", "50", "--progress", "False"]


def tiny_args(**overrides) -> wsrl.Args:
    args = wsrl.apply_preset(wsrl.Args(actor_hidden_dims=(16, 16), critic_hidden_dims=(16, 16), ensemble_size=10,
                                       cql_n_actions=3, batch_size=ROWS, utd=2), "pointmaze")
    return dataclasses.replace(args, **overrides)


def fresh(**overrides):
    args = tiny_args(**overrides)
    config = wsrl.make_config(args, ACTION_DIM)
    return args, config, wsrl.create_agent(args, config, OBSERVATION_DIM, ACTION_DIM)


def random_batch(seed=0):
    rng = np.random.default_rng(seed)
    return {"observations": jnp.asarray(rng.normal(size=(ROWS, OBSERVATION_DIM)), jnp.float32),
            "actions": jnp.asarray(rng.uniform(-0.9, 0.9, (ROWS, ACTION_DIM)), jnp.float32),
            "rewards": jnp.asarray(rng.normal(size=ROWS), jnp.float32),
            "next_observations": jnp.asarray(rng.normal(size=(ROWS, OBSERVATION_DIM)), jnp.float32),
            "masks": jnp.ones(ROWS, jnp.float32), "mc_returns": jnp.full(ROWS, -1e3, jnp.float32)}


# ---------------------------------------------------------------------------------------------
# The network


@pytest.mark.parametrize("ensemble_size", [2, 10])
def test_the_critic_has_one_head_shared_by_every_member(ensemble_size):
    _, config, agent = fresh(ensemble_size=ensemble_size)
    params = agent.critic.params
    one_wide = [leaf.shape for path, leaf in jax.tree_util.tree_leaves_with_path(params)
                if path[-1].key == "kernel" and leaf.shape[-1] == 1]
    assert one_wide == [(16, 1)]  # a single (H, 1) kernel, not one per member
    assert params["trunks"]["Dense_0"]["kernel"].shape[0] == ensemble_size
    batch = random_batch()

    def member_0(params):  # a loss on member 0 alone
        return config.critic.apply({"params": params}, batch["observations"], batch["actions"])[0].mean()

    head_grad = jax.grad(member_0)(params)["head"]
    stepped = {**params, "head": jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, params["head"], head_grad)}
    before = config.critic.apply({"params": params}, batch["observations"], batch["actions"])
    after = config.critic.apply({"params": stepped}, batch["observations"], batch["actions"])
    assert np.all(np.abs(np.asarray(after - before)).max(axis=1) > 1e-6)  # every member's Q moved


def test_actor_std_heads_and_their_range():
    _, config, agent = fresh()
    observations = random_batch()["observations"]
    _, log_std = config.actor.apply({"params": agent.actor.params}, observations)
    assert np.ptp(np.asarray(log_std)[:, 0]) > 1e-6  # its own head: depends on the state
    huge = jax.tree_util.tree_map(lambda leaf: leaf * 1e4, agent.actor.params)
    _, log_std = config.actor.apply({"params": huge}, observations)
    assert np.log(1e-5) - 1e-5 <= np.asarray(log_std).min() and np.asarray(log_std).max() <= np.log(10.0) + 1e-5
    assert np.isclose(np.asarray(log_std).min(), np.log(1e-5)) or np.isclose(np.asarray(log_std).max(), np.log(10))
    _, config, agent = fresh(state_independent_std=True)  # AntMaze's "uniform"
    assert agent.actor.params["log_std"].shape == (ACTION_DIM,)
    _, log_std = config.actor.apply({"params": agent.actor.params}, observations)
    np.testing.assert_array_equal(np.asarray(log_std), 0.0)


@pytest.mark.parametrize("domain, gain", [("antmaze", 1e-2), ("kitchen", np.sqrt(2.0))])
def test_the_last_hidden_layer_gain_and_softplus_scalars_at_one(domain, gain):
    args = dataclasses.replace(wsrl.apply_preset(wsrl.Args(), domain), actor_hidden_dims=(8, 8),
                               critic_hidden_dims=(8, 8))
    config = wsrl.make_config(args, ACTION_DIM)
    agent = wsrl.create_agent(args, config, OBSERVATION_DIM, ACTION_DIM)
    last = np.asarray(agent.critic.params["trunks"]["Dense_1"]["kernel"][0], np.float64)
    first = np.asarray(agent.critic.params["trunks"]["Dense_0"]["kernel"][0], np.float64)
    np.testing.assert_allclose(np.linalg.svd(last, compute_uv=False), gain, rtol=1e-4)  # orthogonal x gain
    np.testing.assert_allclose(np.linalg.svd(first, compute_uv=False), np.sqrt(2.0), rtol=1e-4)
    assert float(wsrl.scalar_value(agent.temperature)) == pytest.approx(1.0)
    assert float(wsrl.scalar_value(agent.alpha_prime)) == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------
# Data: returns-to-go and terminals


def test_returns_to_go_are_finite_horizon_sums_on_kitchen():
    """env_common.py calc_return_to_go with infinite_horizon False: no r / (1 - gamma) tail after
    a trajectory that did not terminate."""
    args = dataclasses.replace(wsrl.apply_preset(wsrl.Args(), "kitchen"), reward_bias=0.0)
    task = datasets.Task(name="kitchen-mixed", domain="kitchen", dataset_id="D4RL/kitchen/mixed-v2", env_id=None)
    rewards = np.array([1.0, 2.0, 3.0], np.float32)
    ends, terminated = np.array([False, False, True]), np.zeros(3, bool)
    returns = wsrl.monte_carlo_returns(rewards, ends, terminated, args, task)
    np.testing.assert_allclose(returns, [1 + 0.99 * 2 + 0.99**2 * 3, 2 + 0.99 * 3, 3.0], rtol=1e-6)


def test_a_failed_sparse_trajectory_is_worth_failing_forever():
    args = wsrl.apply_preset(wsrl.Args(), "antmaze")  # reward 10 r - 5: failure -5
    task = datasets.Task(name="antmaze-large", domain="antmaze", dataset_id="D4RL/antmaze/large-diverse-v1",
                         env_id=None)
    returns = wsrl.monte_carlo_returns(np.full(3, -5.0, np.float32), np.array([False, False, True]),
                                       np.zeros(3, bool), args, task)
    np.testing.assert_allclose(returns, -5.0 / 0.01, rtol=1e-5)


def test_kitchen_terminals_are_where_the_raw_reward_is_four():
    rewards, terminated = np.array([0.0, 3.0, 4.0, 4.0, 2.0]), np.array([False, False, False, False, True])
    np.testing.assert_array_equal(wsrl.kitchen_terminals(rewards, terminated, "kitchen"),
                                  [False, False, True, True, True])
    np.testing.assert_array_equal(wsrl.kitchen_terminals(rewards, terminated, "locomotion"), terminated)


def test_twenty_evaluation_episodes_by_default():
    assert wsrl.Args().eval_episodes == 20  # finetune.py n_eval_trajs


# ---------------------------------------------------------------------------------------------
# Pre-training losses (wsrl/agents/cql.py)


def critic_loss_of(config, agent, batch, target_q, alpha_prime=1.0, key=0):
    return wsrl.pretraining_critic_loss(agent.critic.params, jax.random.PRNGKey(key), batch, target_q,
                                        agent.actor.params, alpha_prime, config)


def test_the_td_loss_is_averaged_over_critics():
    _, config, agent = fresh(cql_alpha=0.0)
    batch = random_batch()
    loss, _ = critic_loss_of(config, agent, batch, jnp.zeros(ROWS))
    q = config.critic.apply({"params": agent.critic.params}, batch["observations"], batch["actions"])
    np.testing.assert_allclose(loss, (q**2).mean(), rtol=1e-5)


def test_the_penalty_trains_only_critics_drawn_with_replacement():
    _, config, agent = fresh(ensemble_size=10, num_min_qs=2)
    batch = random_batch()
    target_q = config.critic.apply({"params": agent.critic.params}, batch["observations"], batch["actions"])
    drawn_counts = set()
    for seed in range(12):  # the TD error is 0, so only the penalty has gradients
        grads = jax.grad(lambda p: wsrl.pretraining_critic_loss(
            p, jax.random.PRNGKey(seed), batch, target_q, agent.actor.params, 1.0, config)[0])(agent.critic.params)
        trunk = np.abs(np.asarray(grads["trunks"]["Dense_0"]["kernel"])).reshape(10, -1).max(1)
        members = set(np.flatnonzero(trunk > 0).tolist())
        subset_key = jax.random.split(jax.random.PRNGKey(seed), 4)[3]
        assert members == set(np.asarray(wsrl.draw_critics(subset_key, config)).tolist())
        drawn_counts.add(len(members))
    assert drawn_counts == {1, 2}  # with replacement: sometimes the same critic twice


def test_the_lagrange_weight_is_the_multiplier_alone():
    _, config, agent = fresh(cql_lagrange=True, cql_alpha=5.0, cql_target_action_gap=0.8)
    batch = random_batch()
    loss_1, info = critic_loss_of(config, agent, batch, jnp.zeros(ROWS), alpha_prime=1.0)
    loss_2, _ = critic_loss_of(config, agent, batch, jnp.zeros(ROWS), alpha_prime=2.0)
    np.testing.assert_allclose(loss_2 - loss_1, info["cql_gap"] - 0.8, rtol=1e-4, atol=1e-5)


def test_the_temperature_learns_from_the_next_observations_entropy():
    _, config, agent = fresh()
    batch = random_batch()
    update = jax.jit(lambda agent, batch: wsrl.pretraining_update(agent, batch, config)[1]["temperature_loss"])
    reference = update(agent, batch)
    other_states = {**batch, "observations": batch["observations"] + 3.0}
    other_next = {**batch, "next_observations": batch["next_observations"] + 3.0}
    assert float(update(agent, other_states)) == pytest.approx(float(reference), rel=1e-6)
    assert abs(float(update(agent, other_next)) - float(reference)) > 1e-4


# ---------------------------------------------------------------------------------------------
# Fine-tuning losses, batch split, warmup (wsrl/agents/sac.py, finetune.py)


class TableCritic:
    """A stand-in critic whose Q-values are a fixed table (ensemble_size, *batch_shape)."""

    def __init__(self, table):
        self.table = table

    def apply(self, variables, observations, actions):
        return self.table


class ZeroActor:
    """A stand-in actor: mean 0, log-std 0 for every row."""

    action_dim = ACTION_DIM

    def apply(self, variables, observations):
        return jnp.zeros((observations.shape[0], ACTION_DIM)), jnp.zeros((observations.shape[0], ACTION_DIM))


def stand_in_config(table, **overrides):
    _, config, _ = fresh()
    return config.replace(actor=ZeroActor(), critic=TableCritic(table), ensemble_size=table.shape[0], **overrides)


def test_target_is_min_over_a_randint_subset_then_max_over_next_actions():
    ensemble, n = 5, 3
    table = jax.random.normal(jax.random.PRNGKey(1), (ensemble, n, 4))
    config = stand_in_config(table, discount=0.9)
    batch = {"next_observations": jnp.zeros((4, OBSERVATION_DIM)), "rewards": jnp.arange(4, dtype=jnp.float32),
             "masks": jnp.array([1.0, 0.0, 1.0, 1.0])}

    def members_of(key):
        return wsrl.draw_critics(jax.random.split(key)[1], config)

    key = next(key for key in map(jax.random.PRNGKey, range(100)) if len(set(members_of(key).tolist())) == 2)
    target = wsrl.td_target(key, batch, None, None, config, n)
    expected = batch["rewards"] + 0.9 * batch["masks"] * table[members_of(key)].min(0).max(0)
    np.testing.assert_allclose(target, expected, rtol=1e-6)


def test_actor_loss_takes_the_min_over_all_critics():
    table = jax.random.normal(jax.random.PRNGKey(2), (5, 4))
    config = stand_in_config(table)
    batch = {"observations": jnp.zeros((4, OBSERVATION_DIM))}
    key = jax.random.PRNGKey(0)
    _, log_probs = wsrl.sample_actions(key, None, batch["observations"], config)
    loss, _ = wsrl.actor_loss(None, key, batch, None, 0.3, config)
    np.testing.assert_allclose(loss, (0.3 * log_probs - table.min(0)).mean(), rtol=1e-6)


def test_the_batch_splits_into_consecutive_minibatches_online_rows_first():
    online = buffers.from_arrays({"x": np.arange(8, dtype=np.float32)})
    offline = buffers.from_arrays({"x": np.arange(100, 108, dtype=np.float32)})
    batch = wsrl.sample_batch(jax.random.PRNGKey(0), online, offline, wsrl.Args(batch_size=8, offline_ratio=0.5))
    minibatches = wsrl.split_minibatches(batch, 4)["x"]
    assert minibatches.shape == (4, 2)
    assert (minibatches[:2] < 100).all() and (minibatches[2:] >= 100).all()  # all-online, then all-offline
    shuffled = wsrl.sample_batch(jax.random.PRNGKey(0), online, offline,
                                 wsrl.Args(batch_size=8, offline_ratio=0.5, shuffle_split=True))
    assert sorted(np.asarray(shuffled["x"])) == sorted(np.asarray(batch["x"]))
    assert not np.array_equal(shuffled["x"], batch["x"])
    for seed in range(3):  # ratio 0: no offline row
        rows = wsrl.sample_batch(jax.random.PRNGKey(seed), online, offline, wsrl.Args(batch_size=64))
        assert (np.asarray(rows["x"]) < 100).all()


@pytest.mark.parametrize("batch_size, ratio, expected", [(100, 0.29, 28), (1024, 0.15, 153), (1024, 0.5, 512),
                                                          (8, 0.1, 0)])
def test_the_offline_share_is_rounded_down_as_officially(batch_size, ratio, expected):
    # finetune.py: batch_size_offline = int(batch_size * offline_data_ratio); 100 x 0.29 = 28.999999999999996
    assert wsrl.offline_rows_per_batch(wsrl.Args(batch_size=batch_size, offline_ratio=ratio)) == expected
    online = buffers.from_arrays({"x": np.zeros(4, np.float32)})
    offline = buffers.from_arrays({"x": np.ones(4, np.float32)})
    batch = wsrl.sample_batch(jax.random.PRNGKey(0), online, offline,
                              wsrl.Args(batch_size=batch_size, offline_ratio=ratio))
    assert batch["x"].shape == (batch_size,) and int(batch["x"].sum()) == expected
    wsrl.validate(wsrl.Args(batch_size=batch_size, offline_ratio=ratio, utd=1))  # any ratio in [0, 1] is taken


def test_warmup_follows_the_official_rule():
    # finetune.py: no update while online step <= max(warmup, batch x (1 - ratio))
    assert wsrl.warmup_length(wsrl.Args(warmup_steps=5000, batch_size=1024)) == 5001
    assert wsrl.warmup_length(wsrl.Args(warmup_steps=0, batch_size=1024)) == 1025
    assert wsrl.warmup_length(wsrl.Args(warmup_steps=0, batch_size=1024, offline_ratio=0.5)) == 513


@pytest.mark.parametrize("idle", [True, False])
def test_the_actor_moves_during_critic_steps_only_with_idle_optimizer_steps(idle):
    args, config, agent = fresh(idle_optimizer_steps=idle)
    batch = random_batch()
    agent, _ = jax.jit(lambda agent: wsrl.pretraining_update(agent, batch, config))(agent)  # non-zero Adam moments
    after, _ = jax.jit(lambda agent: wsrl.update_critic(agent, batch, config))(agent)
    moved = jax.tree_util.tree_map(lambda a, b: bool(jnp.any(a != b)), agent.actor.params, after.actor.params)
    assert any(jax.tree_util.tree_leaves(moved)) == idle
    assert int(after.actor.step) == int(agent.actor.step) + int(idle)


# ---------------------------------------------------------------------------------------------
# Runs


@pytest.fixture(scope="module")
def reference_run(tiny_pointmaze, tmp_path_factory) -> str:
    """An uninterrupted tiny run: 200 pre-training updates, then 700 online steps."""
    log_dir = tmp_path_factory.mktemp("reference")
    return wsrl.main(tyro.cli(wsrl.Args, args=["--env", tiny_pointmaze, *TINY, "--log-dir", str(log_dir)]))


def test_one_run_pretrains_then_fine_tunes(reference_run):
    evaluations = scores(reference_run)
    assert [(record["phase"], record["step"]) for record in evaluations] == [
        ("offline", 0), ("offline", 200), ("online", 550), ("online", 900)]
    assert os.path.isfile(os.path.join(reference_run, wsrl.PRETRAINED_FILE))


def test_the_same_seed_gives_the_same_evaluations(reference_run, tiny_pointmaze, tmp_path):
    again = wsrl.main(tyro.cli(wsrl.Args, args=["--env", tiny_pointmaze, *TINY, "--log-dir", str(tmp_path)]))
    assert scores(again) == scores(reference_run)


@pytest.mark.parametrize("phase, ready", [
    ("pre-training", lambda payload: 0 < payload["progress"]["offline_step"] < 200),
    ("fine-tuning", lambda payload: payload["progress"]["online_step"] > 0),
])
def test_resume_after_sigkill_matches_uninterrupted_run(phase, ready, reference_run, tiny_pointmaze, tmp_path):
    killed = kill_after_checkpoint("wsrl.py", ["--env", tiny_pointmaze, *TINY], tmp_path, ready=ready)
    resumed = wsrl.main(tyro.cli(wsrl.Args, args=["--resume", str(killed)]))
    assert scores(resumed) == scores(reference_run)


def test_pretrained_fine_tunes_the_whole_pretrained_state(reference_run, tmp_path):
    args = wsrl.read_pretrained(reference_run, wsrl.Args(seed=3))
    config = wsrl.make_config(args, ACTION_DIM)
    template = wsrl.create_agent(args, config, OBSERVATION_DIM, ACTION_DIM)
    pre_agent = wsrl.load_pretrained_agent(reference_run, template)
    agent = wsrl.fine_tuning_agent(pre_agent, args)
    assert int(agent.actor.step) == 200
    for a, b in zip(jax.tree_util.tree_leaves((pre_agent.actor, pre_agent.critic, pre_agent.temperature,
                                               pre_agent.target_critic_params)),
                    jax.tree_util.tree_leaves((agent.actor, agent.critic, agent.temperature,
                                               agent.target_critic_params))):
        np.testing.assert_array_equal(a, b)  # parameters, Adam moments, step counts, targets
    run_dir = wsrl.main(tyro.cli(wsrl.Args, args=["--pretrained", reference_run, "--seed", "3", "--online-steps", "300",
                                                  "--warmup-steps", "100", "--batch-size", "64", "--eval-every",
                                                  "300", "--eval-episodes", "2", "--progress", "False",
                                                  "--log-dir", str(tmp_path)]))
    assert [record["step"] for record in scores(run_dir)] == [200, 500]
    with open(os.path.join(run_dir, "config.json")) as file:
        config = json.load(file)
    assert config["pretrained"] == reference_run and config["ensemble_size"] == 4 and config["seed"] == 3


@pytest.mark.parametrize("flags, message", [
    (["--pretrained", "/nonexistent/run"], "no such folder"),
    (["--utd", "3"], "must split into --utd 3"),
    (["--offline-ratio", "1.5"], "--offline-ratio must lie in [0, 1]"),
    (["--offline-steps", "0"], "--offline-steps must be >= 1"),
])
def test_bad_input_ends_in_one_message(flags, message, tmp_path):
    result = run_script("wsrl.py", *flags, "--log-dir", str(tmp_path), timeout=60)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not any(tmp_path.iterdir())  # nothing was started


@pytest.mark.parametrize("flags, message", [
    (["--ensemble-size", "6"], "--ensemble-size 6 differs from the --pretrained run's 4: drop it."),
    (["--critic-hidden-dims", "64", "64"], "--critic-hidden-dims (64, 64) differs from the --pretrained run's (32, 32)"),
    (["--offline-steps", "50"], "--offline-steps 50 differs from the --pretrained run's 200"),
    (["--pretraining", "cql"], "--pretraining cql differs from the --pretrained run's calql"),
])
def test_pretrained_refuses_a_conflicting_network_or_pretraining_flag(flags, message, reference_run, tmp_path):
    """The pre-trained agent fixes its network and pre-training: a flag that says otherwise is an
    error, not silently replaced (a flag equal to that run's, or not given, is fine)."""
    with pytest.raises(UserError, match=re.escape(message)):
        wsrl.read_pretrained(reference_run, tyro.cli(wsrl.Args, args=["--pretrained", reference_run, *flags]))
    same = wsrl.read_pretrained(reference_run, wsrl.Args(ensemble_size=4, critic_hidden_dims=(32, 32), seed=3))
    assert (same.ensemble_size, same.critic_hidden_dims, same.seed) == (4, (32, 32), 3)
    if flags[0] == "--ensemble-size":  # from the command line: one message, nothing started
        result = run_script("wsrl.py", "--pretrained", reference_run, *flags, "--log-dir", str(tmp_path), timeout=60)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
        assert not any(tmp_path.iterdir())


def write_config(folder, record) -> str:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(record))
    return str(folder)


def test_pretrained_takes_only_a_finished_wsrl_pretraining(reference_run, tmp_path):
    with open(os.path.join(reference_run, "config.json")) as file:
        record = json.load(file)
    calql_run = write_config(tmp_path / "calql_run", {**record, "algorithm": "calql"})
    unfinished = write_config(tmp_path / "unfinished", record)
    for folder, message in ((calql_run, "calql.py and cql.py runs are not WSRL's pre-training"),
                            (unfinished, "its pre-training has not finished")):
        result = run_script("wsrl.py", "--pretrained", folder, "--log-dir", str(tmp_path / "runs"), timeout=60)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_an_older_wsrl_run_folder_gets_one_message(reference_run, tmp_path):
    with open(os.path.join(reference_run, "config.json")) as file:
        record = json.load(file)
    old = write_config(tmp_path / "old", {**record, "pretrained_algorithm": "calql"})
    result = run_script("wsrl.py", "--resume", old, timeout=60)
    assert result.returncode == 2 and "older wsrl.py" in result.stderr and "Traceback" not in result.stderr


MARGIN = 20.0  # normalized-score points, below the smallest gain measured over seeds 0-2
# The dense UMaze set (the no-argument data before it became a sparse maze) with the raw rewards and
# plain backup this check was measured with.
DENSE_UMAZE = ["--env", "local/pointmaze/umaze-dense-v0", "--reward-scale", "1", "--reward-bias", "0",
               "--max-target-backup", "False"]


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fine_tuning_improves_a_briefly_pretrained_policy(seed, tmp_path):
    """The dense UMaze dataset (DENSE_UMAZE), built fresh; a short WSRL pre-training
    (1000 Cal-QL updates, 10 critics) leaves a policy that rarely reaches the goal; 4000 online
    steps (1000 of warmup) of WSRL fine-tuning raise its normalized score by more than MARGIN."""
    env = {**os.environ, "MINARI_DATASETS_PATH": str(tmp_path / "datasets")}
    result = run_script("wsrl.py", *DENSE_UMAZE, "--offline-steps", "1000", "--online-steps", "4000", "--warmup-steps", "1000",
                        "--eval-every", "2000", "--eval-episodes", "5", "--seed", str(seed), "--progress", "False",
                        "--log-dir", str(tmp_path / "runs"), timeout=3600, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    evaluations = scores(run_dir)
    assert [record["step"] for record in evaluations] == [0, 1000, 3000, 5000]
    start, end = evaluations[1]["normalized_score"], evaluations[-1]["normalized_score"]
    assert end - start > MARGIN, (start, end)
