"""common/priorities.py: the sum tree behind Off2On's balanced replay."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from common import priorities


def tree_of(values, rows=None, max_priority=1.0):
    return priorities.from_priorities(np.asarray(values, np.float32), rows, max_priority)


def assert_consistent(tree):
    """Every inner node equals the sum of its children."""
    nodes = np.asarray(tree.nodes)
    inner = np.arange(1, tree.capacity)
    np.testing.assert_allclose(nodes[inner], nodes[2 * inner] + nodes[2 * inner + 1], rtol=1e-6, atol=1e-6)


def test_sampling_frequencies_follow_priorities_chi_square():
    weights = np.array([1.0, 0.0, 3.0, 0.5, 6.0, 2.0, 0.0, 7.5, 1.0, 4.0], np.float32)  # 10 rows, capacity 16
    tree = tree_of(weights)
    draw = jax.jit(jax.vmap(functools.partial(priorities.sample, batch_size=64), in_axes=(None, 0)))
    indices, probabilities = draw(tree, jax.random.split(jax.random.PRNGKey(0), 500))
    counts = np.bincount(np.asarray(indices).ravel(), minlength=tree.capacity)
    assert counts[1] == counts[6] == 0 and counts[10:].sum() == 0  # zero priority and empty leaves never drawn
    expected = weights / weights.sum() * counts.sum()
    positive = weights > 0
    statistic, p_value = stats.chisquare(counts[:10][positive], expected[positive])
    assert p_value > 0.01, (counts, expected)
    np.testing.assert_allclose(np.asarray(probabilities)[0], weights[np.asarray(indices)[0]] / weights.sum(), rtol=1e-5)


def test_sampling_is_stratified():
    """One draw per segment of the total: with equal priorities, B draws over B rows hit each once."""
    tree = tree_of(np.ones(64))
    indices, _ = priorities.sample(tree, jax.random.PRNGKey(3), 64)
    assert sorted(np.asarray(indices).tolist()) == list(range(64))


def test_update_changes_the_sums_and_raises_the_running_max():
    tree = tree_of(np.ones(100), max_priority=2.0)
    assert float(tree.total) == 100.0
    tree = jax.jit(priorities.update)(tree, jnp.array([3, 50, 99]), jnp.array([5.0, 0.5, 1.5]))
    assert float(tree.total) == 100.0 + 4.0 - 0.5 + 0.5
    np.testing.assert_array_equal(np.asarray(tree.leaves)[[3, 50, 99, 4]], [5.0, 0.5, 1.5, 1.0])
    assert float(tree.max_priority) == 5.0
    assert_consistent(tree)
    tree = priorities.update(tree, jnp.array([3]), jnp.array([0.1]))
    assert float(tree.max_priority) == 5.0  # never decreases
    np.testing.assert_allclose(float(tree.total), 99.1, rtol=1e-6)
    assert_consistent(tree)


def test_duplicate_indices_in_one_update_keep_the_tree_consistent():
    tree = tree_of(np.ones(32))
    tree = priorities.update(tree, jnp.array([7, 7, 7, 8]), jnp.array([2.0, 2.0, 2.0, 3.0]))
    np.testing.assert_allclose(float(tree.total), 32.0 + 1.0 + 2.0)
    assert_consistent(tree)


def test_insert_gives_fresh_rows_the_running_max_and_skips_invalid_entries():
    tree = priorities.from_priorities(np.ones(10, np.float32), rows=20, max_priority=7.0)
    assert float(tree.total) == 10.0
    valid = jnp.array([True, True, False, True])
    tree = jax.jit(priorities.insert)(tree, jnp.array([10, 11, 12, 13]), valid)
    leaves = np.asarray(tree.leaves)
    np.testing.assert_array_equal(leaves[10:14], [7.0, 7.0, 0.0, 7.0])
    assert float(tree.total) == 10.0 + 21.0
    assert_consistent(tree)


def test_fresh_rows_after_an_update_get_the_raised_max():
    tree = priorities.from_priorities(np.ones(4, np.float32), rows=8, max_priority=1.0)
    tree = priorities.update(tree, jnp.array([0]), jnp.array([9.0]))
    tree = priorities.insert(tree, jnp.array([4, 5]))
    np.testing.assert_array_equal(np.asarray(tree.leaves)[4:6], [9.0, 9.0])


def test_from_priorities_builds_the_sums_and_matches_incremental_writes():
    values = np.random.default_rng(0).uniform(0, 2, 37).astype(np.float32)
    built = tree_of(values)
    incremental = priorities.set_priorities(priorities.create(37), jnp.arange(37), jnp.asarray(values))
    assert built.capacity == 64
    np.testing.assert_allclose(np.asarray(built.nodes), np.asarray(incremental.nodes), rtol=1e-5)
    np.testing.assert_allclose(float(built.total), values.sum(), rtol=1e-5)
    assert_consistent(built)
