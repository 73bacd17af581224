"""The domain presets of every script against the documented preset tables.

The tables below are the documentation contract: they repeat, value for value, the preset tables
of the README, docs/algorithms/*.md and the docstrings (each row names the official file it
comes from there). Each script has one table-driven test: for every domain, `apply_preset` on a
default `Args` must give exactly the row, fill exactly the row's [preset] fields, and leave every
explicitly given flag alone.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from algorithms import calql, cql, iql, off2on, rlpd, wsrl

M = 1_000_000
X256, X512 = (256, 256), (512, 512)
DOMAINS = ("locomotion", "antmaze", "adroit", "kitchen", "pointmaze")  # every domain common.datasets names

# RLPD: ikostrikov/rlpd README.md commands, configs/rlpd_config.py; kitchen: the official defaults.
RLPD = {
    "locomotion": dict(hidden_dims=X256, num_min_qs=2, backup_entropy=True, utd=20, online_steps=250_000,
                       start_training=5000, eval_episodes=10),
    "antmaze": dict(hidden_dims=(256,) * 3, num_min_qs=1, backup_entropy=False, utd=20, online_steps=300_000,
                    start_training=5000, eval_episodes=10),
    "adroit": dict(hidden_dims=(256,) * 3, num_min_qs=2, backup_entropy=False, utd=20, online_steps=M,
                   start_training=5000, eval_episodes=10),
    "kitchen": dict(hidden_dims=X256, num_min_qs=2, backup_entropy=True, utd=20, online_steps=M, start_training=10_000, eval_episodes=10),
    # ours: the no-argument run, sized for about 10 minutes on a 2-core CPU
    "pointmaze": dict(hidden_dims=(64, 64), num_min_qs=2, backup_entropy=True, utd=10, online_steps=15_000,
                      start_training=1000, eval_episodes=20),
}

# IQL: ikostrikov/implicit_q_learning configs/*.py and README commands. Fine-tuning (constant lr)
# only on AntMaze; the others offline only with the cosine schedule.
_IQL_EVAL = dict(eval_every=5000, eval_episodes=10)
IQL = {
    "locomotion": dict(expectile=0.7, beta=3.0, dropout_rate=0.0, offline_steps=M, online_steps=0,
                       actor_lr_schedule="cosine", **_IQL_EVAL),
    "antmaze": dict(expectile=0.9, beta=10.0, dropout_rate=0.0, offline_steps=M, online_steps=M,
                    actor_lr_schedule="constant", eval_every=100_000, eval_episodes=100),
    "adroit": dict(expectile=0.7, beta=0.5, dropout_rate=0.1, offline_steps=M, online_steps=0,
                   actor_lr_schedule="cosine", **_IQL_EVAL),
    "kitchen": dict(expectile=0.7, beta=0.5, dropout_rate=0.1, offline_steps=M, online_steps=0,
                    actor_lr_schedule="cosine", **_IQL_EVAL),
    # ours: the no-argument run, sized for about 10 minutes on a 2-core CPU
    "pointmaze": dict(expectile=0.7, beta=3.0, dropout_rate=0.0, offline_steps=40_000, online_steps=40_000,
                      actor_lr_schedule="constant", eval_every=5000, eval_episodes=20),
}

# CQL, keyed by (domain, explicit --recipe or None). rlkit: aviralkumar2907/CQL's
# cql_{mujoco,antmaze}_new.py with the README's commands; jaxcql: nakamotoo/Cal-QL's scripts
# with --enable_calql=False; adroit: CORL configs/finetune/cql/*/cloned_v1.yaml.
_RLKIT = dict(recipe="rlkit", actor_hidden_dims=(256,) * 3, critic_hidden_dims=(256,) * 3, max_target_backup=False,
              bc_steps=40_000, actor_lr=1e-4, reward_scale=1.0, reward_bias=0.0, offline_steps=M, offline_ratio=0.5,
              cql_importance_sample=True, lagrange_threshold=5.0, cql_target_action_gap=0.8, eval_episodes=10)
_JAXCQL = dict(recipe="jaxcql", actor_hidden_dims=X256, critic_hidden_dims=X256, max_target_backup=True, bc_steps=0,
               actor_lr=1e-4, reward_scale=1.0, reward_bias=0.0, offline_steps=M, offline_ratio=0.5,
               cql_importance_sample=True, lagrange_threshold=5.0, cql_target_action_gap=0.8, eval_episodes=10)
CQL = {
    ("locomotion", None): dict(_RLKIT, cql_alpha=5.0, cql_lagrange=False, online_steps=0),
    ("antmaze", None): dict(_JAXCQL, critic_hidden_dims=(256,) * 4, cql_alpha=5.0, cql_lagrange=True,
                            reward_scale=10.0, reward_bias=-5.0, online_steps=M),
    ("antmaze", "rlkit"): dict(_RLKIT, cql_alpha=5.0, cql_lagrange=True, reward_scale=4.0, reward_bias=-2.0,
                               online_steps=0),
    ("kitchen", None): dict(_JAXCQL, actor_hidden_dims=(512,) * 3, critic_hidden_dims=(512,) * 3, cql_alpha=5.0,
                            cql_lagrange=False, cql_importance_sample=False, offline_steps=500_000,
                            online_steps=1_500_000, offline_ratio=0.25),
    ("adroit", None): dict(_JAXCQL, actor_hidden_dims=(256,) * 3, critic_hidden_dims=(256,) * 3, cql_alpha=1.0,
                           cql_lagrange=False, online_steps=M),
    # ours: the no-argument run, sized for about 10 minutes on a 2-core CPU
    ("pointmaze", None): dict(_JAXCQL, actor_hidden_dims=(64, 64), critic_hidden_dims=(64, 64), cql_alpha=5.0,
                              cql_lagrange=False, offline_steps=20_000, online_steps=20_000, reward_scale=10.0,
                              reward_bias=-5.0, eval_episodes=20),
}
# An explicit --recipe equal to the domain's own gives the same preset.
CQL[("antmaze", "jaxcql")] = CQL[("antmaze", None)]
CQL[("locomotion", "rlkit")] = CQL[("locomotion", None)]

# Cal-QL: nakamotoo/Cal-QL scripts/run_antmaze.sh, run_kitchen.sh (commit c510025), the code's
# defaults for locomotion; dense Adroit: CORL configs/finetune/cal_ql/*/cloned_v1.yaml.
_CALQL = dict(actor_hidden_dims=X256, critic_hidden_dims=X256, cql_alpha=5.0, cql_lagrange=False,
              cql_target_action_gap=0.8, max_target_backup=True, actor_lr=1e-4, bc_steps=0, reward_scale=1.0,
              reward_bias=0.0, offline_steps=M, offline_ratio=0.5, cql_importance_sample=True, eval_episodes=10)
CALQL = {
    "locomotion": dict(_CALQL, online_steps=0),
    "antmaze": dict(_CALQL, critic_hidden_dims=(256,) * 4, cql_lagrange=True, reward_scale=10.0, reward_bias=-5.0,
                    online_steps=M),
    "adroit": dict(_CALQL, actor_hidden_dims=(256,) * 3, critic_hidden_dims=(256,) * 3, cql_alpha=1.0, online_steps=M),
    "kitchen": dict(_CALQL, actor_hidden_dims=(512,) * 3, critic_hidden_dims=(512,) * 3,
                    cql_importance_sample=False, offline_steps=500_000, online_steps=1_500_000, offline_ratio=0.25),
    # ours: the no-argument run, sized for about 10 minutes on a 2-core CPU
    "pointmaze": dict(_CALQL, actor_hidden_dims=(64, 64), critic_hidden_dims=(64, 64), offline_steps=20_000,
                      online_steps=20_000, reward_scale=10.0, reward_bias=-5.0, eval_episodes=20),
}

# WSRL (docs/algorithms/wsrl.md), zhouzypaul/wsrl (891ee35). Pre-training: experiments/scripts/
# */launch_{calql,cql}_finetune.sh (steps, reward transform, agent), experiments/configs/
# train_config.py *_cql (widths, std, alpha, Lagrange, log-sum-exp, kernel_scale_final 1e-2) over
# cql_config.py's defaults (alpha 5, importance sampling, no Lagrange, gap 1). Fine-tuning:
# launch_wsrl_finetune.sh (500k steps, warmup 5000, batch 1024, UTD 4), sac_config.py (learning
# rates), finetune.py (eval_interval 20k), train_config.py antmaze_wsrl (max-target backup).
_WSRL = dict(pretraining="calql", cql_alpha=5.0, cql_lagrange=False, cql_target_action_gap=1.0,
             cql_importance_sample=True, state_independent_std=False, last_hidden_gain=1e-2, reward_scale=1.0,
             reward_bias=0.0, online_steps=500_000, warmup_steps=5000, eval_every=20_000, max_target_backup=False,
             batch_size=1024, utd=4, actor_lr=1e-4, critic_lr=3e-4, temp_lr=1e-4)
WSRL = {
    # antmaze launch_calql_finetune.sh (1M, 10 r - 5), antmaze_cql (4x256 / 2x256, "uniform" std, gap 0.8)
    "antmaze": dict(_WSRL, offline_steps=M, critic_hidden_dims=(256,) * 4, actor_hidden_dims=X256,
                    state_independent_std=True, reward_scale=10.0, reward_bias=-5.0, cql_lagrange=True,
                    cql_target_action_gap=0.8, max_target_backup=True),
    # adroit launch_calql_finetune.sh (20k), adroit_cql (3x512 / 2x512, alpha 1); raw reward (a deviation)
    "adroit": dict(_WSRL, offline_steps=20_000, critic_hidden_dims=(512,) * 3, actor_hidden_dims=X512, cql_alpha=1.0),
    # kitchen launch_calql_finetune.sh (250k, r - 4), kitchen_cql (3x512 both, gain sqrt 2, plain log-sum-exp)
    "kitchen": dict(_WSRL, offline_steps=250_000, critic_hidden_dims=(512,) * 3, actor_hidden_dims=(512,) * 3,
                    last_hidden_gain=float(np.sqrt(2.0)), cql_importance_sample=False, reward_bias=-4.0),
    # locomotion launch_cql_finetune.sh (CQL, 250k, raw reward), locomotion_cql (2x256 both, alpha 5)
    "locomotion": dict(_WSRL, pretraining="cql", offline_steps=250_000, critic_hidden_dims=X256,
                       actor_hidden_dims=X256),
    # ours: the no-argument run, sized for minutes on a CPU
    "pointmaze": dict(_WSRL, offline_steps=2000, critic_hidden_dims=(64, 64), actor_hidden_dims=(64, 64),
                      online_steps=6000, warmup_steps=1000, eval_every=2000, reward_scale=10.0, reward_bias=-5.0,
                      max_target_backup=True),
}

# Off2On (docs/algorithms/off2on.md), shlee94/Off2OnRL (6f298fa): rlkit/examples/ours.py (2x256
# members and weight net, batch 256, 1000 steps and 1000 updates per epoch, an evaluation of 5
# episodes each epoch, 250 epochs, CQL checkpoints at 1M steps, lr 3e-4, tau 5e-3) and the README
# command (--first_epoch_multiplier 5 --init_online_fraction 0.75); pre-training: aviralkumar2907/CQL
# README MuJoCo command (min_q_weight 5, no Lagrange, policy_eval_start 40000, policy_lr 1e-4).
_OFF2ON = dict(actor_hidden_dims=X256, critic_hidden_dims=X256, density_hidden_dims=X256, offline_steps=M,
               online_steps=250_000, epoch_steps=1000, utd=1, first_epoch_multiplier=5, eval_every=1000,
               eval_episodes=5, cql_alpha=5.0, cql_lagrange=False, bc_steps=40_000, pretrain_actor_lr=1e-4,
               reward_scale=1.0, reward_bias=0.0, batch_size=256, density_batch_size=256, actor_lr=3e-4,
               critic_lr=3e-4, temp_lr=3e-4, density_lr=3e-4, tau=5e-3, discount=0.99, priority_temperature=5.0,
               init_online_fraction=0.75, online_buffer_size=250_000)
OFF2ON = {  # keyed by (domain, dataset id or None)
    ("locomotion", None): _OFF2ON,
    # the paper's Appendix D.1: 3-layer MLPs for the CQL agents of halfcheetah-medium-expert
    ("locomotion", "local/halfcheetah/ours-medium-expert-v0"): dict(_OFF2ON, actor_hidden_dims=(256,) * 3,
                                                                  critic_hidden_dims=(256,) * 3),
    # CQL README AntMaze command (cql_antmaze_new.py): with_lagrange, lagrange_thresh 5; rewards 4 (r - 0.5)
    ("antmaze", None): dict(_OFF2ON, cql_lagrange=True, reward_scale=4.0, reward_bias=-2.0),
    # the paper has no other domain: the locomotion settings
    ("adroit", None): _OFF2ON,
    ("kitchen", None): _OFF2ON,
    # ours: the no-argument run, sized for a CPU
    ("pointmaze", None): dict(_OFF2ON, actor_hidden_dims=(64, 64), critic_hidden_dims=(64, 64),
                              density_hidden_dims=(64, 64), offline_steps=5000, online_steps=10_000, eval_every=2000,
                              eval_episodes=20, bc_steps=1000, reward_scale=4.0,
                              reward_bias=-2.0),
}


OTHER_CHOICE = {"rlkit": "jaxcql", "jaxcql": "rlkit", "cosine": "constant", "constant": "cosine", "calql": "cql",
                "cql": "calql"}


def different(value):
    """A value of the same type as `value` that differs from it."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1 if isinstance(value, int) else value + 0.25
    if isinstance(value, tuple):
        return (value[0] + 7,)
    return OTHER_CHOICE[value]


def check_against_table(module, row: dict, domain: str, *preset_args, **explicit):
    """The resolved config equals the row; the preset fills exactly the row's [preset] fields (those
    whose default is None); every explicitly given [preset] field survives the preset.
    `preset_args` follow the domain in `apply_preset` (off2on.py: the dataset id)."""
    apply_preset = functools.partial(module.apply_preset, domain=domain) if not preset_args else (
        lambda args: module.apply_preset(args, domain, *preset_args))
    default = module.Args(**explicit)
    resolved = apply_preset(default)
    assert {name: getattr(resolved, name) for name in row} == row
    filled = {field.name for field in dataclasses.fields(default)
              if getattr(default, field.name) is None and getattr(resolved, field.name) is not None}
    documented = {name for name in row if getattr(default, name) is None}
    assert filled == documented, f"preset fills {sorted(filled)}, the table documents {sorted(documented)}"
    preset_fields = {name for name in row if getattr(module.Args(), name) is None}
    flags = {name: different(row[name]) for name in preset_fields}
    overridden = apply_preset(module.Args(**flags))
    assert {name: getattr(overridden, name) for name in flags} == flags  # an explicit flag always wins


@pytest.mark.parametrize("domain", DOMAINS)
def test_rlpd_presets_match_the_table(domain):
    check_against_table(rlpd, RLPD[domain], domain)


@pytest.mark.parametrize("domain", DOMAINS)
def test_iql_presets_match_the_table(domain):
    check_against_table(iql, IQL[domain], domain)


def test_iql_fine_tuning_and_offline_only_stay_one_flag_away():
    finetune = iql.apply_preset(iql.Args(online_steps=M), "locomotion")
    assert (finetune.online_steps, finetune.actor_lr_schedule) == (M, "constant")
    offline = iql.apply_preset(iql.Args(online_steps=0), "antmaze")
    assert (offline.online_steps, offline.actor_lr_schedule, offline.expectile) == (0, "cosine", 0.9)


@pytest.mark.parametrize("domain, recipe", list(CQL), ids=[f"{d}-{r}" for d, r in CQL])
def test_cql_presets_match_the_table(domain, recipe):
    explicit = {} if recipe is None else {"recipe": recipe}
    check_against_table(cql, CQL[(domain, recipe)], domain, **explicit)


def test_cql_recipe_elsewhere_switches_only_the_recipe():
    locomotion = cql.apply_preset(cql.Args(recipe="jaxcql"), "locomotion")
    assert dataclasses.replace(locomotion, recipe="rlkit") == cql.apply_preset(cql.Args(), "locomotion")


@pytest.mark.parametrize("domain", DOMAINS)
def test_calql_presets_match_the_table(domain):
    check_against_table(calql, CALQL[domain], domain)


@pytest.mark.parametrize("domain", DOMAINS)
def test_wsrl_presets_match_the_table(domain):
    check_against_table(wsrl, WSRL[domain], domain)


@pytest.mark.parametrize("domain, dataset_id", list(OFF2ON), ids=[f"{d}-{i}" for d, i in OFF2ON])
def test_off2on_presets_match_the_table(domain, dataset_id):
    check_against_table(off2on, OFF2ON[(domain, dataset_id)], domain, dataset_id)


@pytest.mark.slow  # outside CI's 20-minute budget; `pytest -m slow` runs it
def test_cql_antmaze_preset_is_calql_without_calibration():
    """cql.py's AntMaze preset (--recipe jaxcql) computes what calql.py computes with the calibration
    off: the same alpha' start, TD target (max backup), Lagrange penalty and whole update; the rlkit
    recipe does not."""
    observation_dim, action_dim, n = 3, 2, 32
    small = dict(actor_hidden_dims=(16, 16), critic_hidden_dims=(16, 16, 16), cql_n_actions=4,
                 target_entropy=-float(action_dim))
    rng = np.random.default_rng(0)
    batch = {"observations": rng.normal(size=(n, observation_dim)), "next_observations": rng.normal(size=(n, observation_dim)),
             "actions": rng.uniform(-0.9, 0.9, (n, action_dim)), "rewards": rng.normal(size=n),
             "masks": np.ones(n), "mc_returns": rng.normal(size=n)}
    batch = {key: jnp.asarray(value, jnp.float32) for key, value in batch.items()}

    def one_update(module, args, **config_changes):
        config = module.make_config(args, action_dim).replace(**config_changes)
        agent = module.create_agent(args, config, observation_dim, action_dim)
        perturbed = jax.tree_util.tree_map(  # make the two target critics disagree
            lambda leaf: leaf + jax.random.normal(jax.random.PRNGKey(1), leaf.shape), agent.target_critic_params)
        agent = agent.replace(target_critic_params=perturbed)
        target = jax.jit(functools.partial(module.td_target, config=config))(
            jax.random.PRNGKey(2), batch, agent.actor.params, perturbed, 1.0)
        gap = jnp.array([0.3, 1.7])
        prime = jax.grad(module.alpha_prime_loss)(agent.alpha_prime.params, gap, agent.alpha_prime.apply_fn, config)
        updated = jax.jit(functools.partial(module.update, config=config))(agent, batch)[0]
        return float(module.scalar_value(agent.alpha_prime)), target, prime, updated

    cql_args = dataclasses.replace(cql.apply_preset(cql.Args(), "antmaze"), **small)
    calql_args = dataclasses.replace(calql.apply_preset(calql.Args(), "antmaze"), **small)
    ours, theirs = one_update(cql, cql_args), one_update(calql, calql_args, calibration=False)
    assert ours[0] == pytest.approx(np.e) and theirs[0] == pytest.approx(np.e)
    np.testing.assert_allclose(ours[1], theirs[1], rtol=1e-6)
    np.testing.assert_allclose(ours[2]["log_value"], theirs[2]["log_value"], rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(ours[3]), jax.tree_util.tree_leaves(theirs[3])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

    rlkit = one_update(cql, dataclasses.replace(cql_args, recipe="rlkit"))
    assert rlkit[0] == pytest.approx(1.0)
    # rlkit's max backup takes each critic's own max first: min_c max_a >= max_a min_c, here strictly
    difference = np.asarray(rlkit[1] - ours[1])
    assert difference.min() >= -1e-5 and difference.max() > 1e-3


@pytest.mark.parametrize("module", [rlpd, iql, cql, calql, wsrl, off2on], ids=lambda module: module.ALGORITHM)
def test_our_own_presets_say_so_and_paper_presets_stay_silent(module):
    """Every preset that is not a paper's (pointmaze) has a note, printed at the start of a new
    run; the paper domains have none."""
    assert set(module.PRESET_NOTES) == {"pointmaze"}
    assert "ours, not a paper's" in module.PRESET_NOTES["pointmaze"]
