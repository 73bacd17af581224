"""A sum tree for prioritized sampling, as pure functions on jnp arrays (usable inside jit).

The tree is one flat array of 2C floats for a capacity C (a power of two): node 1 is the root,
node n has children 2n and 2n + 1, and the C leaves (nodes C .. 2C - 1) hold the priorities of
rows 0 .. C - 1 (node 0 is unused). Every write recomputes the written leaves' ancestors from
their children, level by level (log2 C scatters of the batch's size), so sums never drift and
duplicate indices are harmless. Sampling is stratified as in Off2OnRL's
`rlkit/data_management/prioritized_replay_buffer.py` (after Kaixhin/Rainbow): the total is
cut into B equal segments and one point is drawn uniformly in each, then found by descending
the tree (right when the point exceeds the left child's sum).

`max_priority` is a running maximum that never decreases: `update` raises it to the largest
priority written, and `insert` gives fresh rows that value (new experience is sampled soon).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct


class SumTree(struct.PyTreeNode):
    nodes: jax.Array  # (2C,) float32: node 0 unused, node 1 the root, leaves at C .. 2C - 1
    max_priority: jax.Array  # float32 scalar, never decreasing

    @property
    def capacity(self) -> int:
        return self.nodes.shape[0] // 2

    @property
    def depth(self) -> int:
        return self.capacity.bit_length() - 1

    @property
    def total(self) -> jax.Array:
        return self.nodes[1]

    @property
    def leaves(self) -> jax.Array:
        return self.nodes[self.capacity:]


def capacity_for(rows: int) -> int:
    """The smallest power of two holding `rows` leaves (at least 2)."""
    return max(2, 1 << (max(rows, 1) - 1).bit_length())


def from_priorities(priorities, rows: int | None = None, max_priority: float = 1.0) -> SumTree:
    """A tree whose first len(priorities) leaves hold `priorities`, for at least `rows` leaves
    (the rest 0), with the running maximum at `max_priority`."""
    priorities = np.asarray(priorities, np.float32)
    capacity = capacity_for(max(len(priorities), rows or 0))
    level = np.zeros(capacity, np.float32)
    level[:len(priorities)] = priorities
    levels = [level]
    while len(level) > 1:
        level = level.reshape(-1, 2).sum(1, dtype=np.float32)
        levels.append(level)
    nodes = np.concatenate([np.zeros(1, np.float32), *levels[::-1]])
    return SumTree(jnp.asarray(nodes), jnp.float32(max_priority))


def create(rows: int, max_priority: float = 1.0) -> SumTree:
    """An empty tree (all priorities 0) for `rows` rows."""
    return from_priorities(np.zeros(0, np.float32), rows, max_priority)


def _propagate(nodes: jax.Array, depth: int, leaf_nodes: jax.Array) -> jax.Array:
    """Recompute every ancestor of `leaf_nodes` from its children, bottom up."""
    def level(_, carry):
        nodes, parents = carry
        parents = parents // 2
        return nodes.at[parents].set(nodes[2 * parents] + nodes[2 * parents + 1]), parents

    return jax.lax.fori_loop(0, depth, level, (nodes, leaf_nodes))[0]


def set_priorities(tree: SumTree, indices: jax.Array, priorities: jax.Array, valid: jax.Array | None = None) -> SumTree:
    """Write `priorities` at rows `indices` (entries where `valid` is False are skipped); the
    running maximum is unchanged."""
    indices = jnp.asarray(indices, jnp.int32)
    leaf_nodes = tree.capacity + indices
    targets = leaf_nodes if valid is None else jnp.where(valid, leaf_nodes, tree.nodes.shape[0])
    nodes = tree.nodes.at[targets].set(jnp.asarray(priorities, jnp.float32), mode="drop")
    if valid is not None:  # recomputing any node from its children is harmless: send skipped ones to leaf 0
        leaf_nodes = jnp.where(valid, leaf_nodes, tree.capacity)
    return tree.replace(nodes=_propagate(nodes, tree.depth, leaf_nodes))


def update(tree: SumTree, indices: jax.Array, priorities: jax.Array) -> SumTree:
    """Write new priorities of sampled rows and raise the running maximum to their largest."""
    tree = set_priorities(tree, indices, priorities)
    return tree.replace(max_priority=jnp.maximum(tree.max_priority, jnp.max(priorities)))


def insert(tree: SumTree, indices: jax.Array, valid: jax.Array | None = None) -> SumTree:
    """Give fresh rows `indices` (where `valid`) the running maximum priority."""
    return set_priorities(tree, indices, jnp.full(jnp.shape(indices), tree.max_priority), valid)


def sample(tree: SumTree, key: jax.Array, batch_size: int) -> tuple[jax.Array, jax.Array]:
    """`batch_size` row indices drawn with probability proportional to priority, one from each of
    `batch_size` equal segments of the total (stratified); and each one's probability
    priority / total. Never returns a row of priority 0 while the total is positive."""
    segment = tree.total / batch_size
    points = (jnp.arange(batch_size) + jax.random.uniform(key, (batch_size,))) * segment

    def descend(_, carry):
        node, points = carry
        left, right = tree.nodes[2 * node], tree.nodes[2 * node + 1]
        # right when the point lies past the left sum; rounding must never lead into an empty subtree
        go_right = jnp.where(left <= 0, True, (points > left) & (right > 0))
        return 2 * node + go_right.astype(jnp.int32), jnp.where(go_right, points - left, points)

    node, _ = jax.lax.fori_loop(0, tree.depth, descend, (jnp.ones(batch_size, jnp.int32), points))
    return node - tree.capacity, tree.nodes[node] / tree.total
