"""On-device replay buffers and the sampling that runs inside the jitted update.

A buffer is a pytree: a dict of arrays with a leading capacity axis, plus `size` and `cursor`
scalars. Offline data is a full buffer that never changes; the online buffer is a ring that is
written one transition at a time inside the jitted environment step (donated, so no copy).
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

Batch = dict[str, jax.Array]


class Buffer(struct.PyTreeNode):
    data: Batch  # each array has shape (capacity, ...)
    size: jax.Array  # int32 scalar: rows filled
    cursor: jax.Array  # int32 scalar: next row to write

    @property
    def capacity(self) -> int:
        return next(iter(self.data.values())).shape[0]


def from_arrays(arrays: Mapping[str, np.ndarray]) -> Buffer:
    """A full buffer holding `arrays` (e.g. the offline dataset), moved to the default device."""
    data = {key: jnp.asarray(value) for key, value in arrays.items()}
    size = next(iter(data.values())).shape[0]
    return Buffer(data, jnp.int32(size), jnp.int32(0))


def empty_like(example: Mapping[str, np.ndarray], capacity: int) -> Buffer:
    """An empty ring buffer with rows shaped like one `example` transition."""
    data = {key: jnp.zeros((capacity, *np.shape(value)), np.asarray(value).dtype) for key, value in example.items()}
    return Buffer(data, jnp.int32(0), jnp.int32(0))


def insert(buffer: Buffer, transition: Mapping[str, jax.Array]) -> Buffer:
    """Write one transition at the cursor (overwriting the oldest row when full). Jittable."""
    data = {key: buffer.data[key].at[buffer.cursor].set(transition[key]) for key in buffer.data}
    return buffer.replace(data=data, size=jnp.minimum(buffer.size + 1, buffer.capacity),
                          cursor=(buffer.cursor + 1) % buffer.capacity)


def sample(buffer: Buffer, key: jax.Array, shape: tuple[int, ...]) -> Batch:
    """Rows drawn uniformly with replacement from the filled part, arranged in `shape`."""
    rows = jax.random.randint(key, shape, 0, jnp.maximum(buffer.size, 1))
    return {name: array[rows] for name, array in buffer.data.items()}


def offline_count(batch_size: int, offline_ratio: float) -> int:
    """How many rows of each minibatch come from the offline data."""
    return int(round(batch_size * offline_ratio))


def sample_mixed(key: jax.Array, offline: Buffer | None, online: Buffer | None, num_batches: int,
                 batch_size: int, offline_ratio: float) -> Batch:
    """G x B rows where every one of the G minibatches holds exactly round(B * ratio) offline rows.

    This is RLPD's symmetric sampling generalised to any ratio in [0, 1]: the official code
    interleaves offline and online rows so that each minibatch slice is half of each.
    """
    n_offline = offline_count(batch_size, offline_ratio)
    parts = []
    offline_key, online_key = jax.random.split(key)
    if n_offline > 0:
        parts.append(sample(offline, offline_key, (num_batches, n_offline)))
    if n_offline < batch_size:
        parts.append(sample(online, online_key, (num_batches, batch_size - n_offline)))
    if len(parts) == 1:
        return parts[0]
    return {name: jnp.concatenate([part[name] for part in parts], axis=1) for name in parts[0]}


def filled_rows(buffer: Buffer) -> dict[str, np.ndarray]:
    """The filled rows as numpy arrays, in storage order (for checkpoints; keep `cursor` too)."""
    size = int(buffer.size)
    return {key: np.asarray(value[:size]) for key, value in buffer.data.items()}


def restore_rows(buffer: Buffer, rows: Mapping[str, np.ndarray], cursor: int) -> Buffer:
    """Refill an empty buffer with rows saved by `filled_rows` and the saved cursor."""
    size = len(next(iter(rows.values())))
    data = {key: buffer.data[key].at[:size].set(jnp.asarray(rows[key])) for key in buffer.data}
    return buffer.replace(data=data, size=jnp.int32(size), cursor=jnp.int32(cursor))


INSERT_BLOCK = 256  # rows written per jitted call of `insert_rows`; one compilation for any count


def _insert_block(buffer: Buffer, block: Batch, count: jax.Array) -> Buffer:
    """Write the first `count` rows of `block` at the cursor, wrapping around; the rest is dropped."""
    offsets = jnp.arange(INSERT_BLOCK)
    rows = jnp.where(offsets < count, (buffer.cursor + offsets) % buffer.capacity, buffer.capacity)
    data = {key: buffer.data[key].at[rows].set(block[key], mode="drop") for key in buffer.data}
    return buffer.replace(data=data, size=jnp.minimum(buffer.size + count, buffer.capacity),
                          cursor=(buffer.cursor + count) % buffer.capacity)


_insert_block_jit = jax.jit(_insert_block, donate_argnums=0)


def insert_rows(buffer: Buffer, rows: Mapping[str, np.ndarray]) -> Buffer:
    """Append host rows (e.g. a finished trajectory) in fixed-size blocks; returns the new buffer."""
    count = len(next(iter(rows.values())))
    for start in range(0, count, INSERT_BLOCK):
        n = min(INSERT_BLOCK, count - start)
        block = {key: np.zeros((INSERT_BLOCK, *value.shape[1:]), value.dtype) for key, value in buffer.data.items()}
        for key in block:
            block[key][:n] = rows[key][start:start + n]
        buffer = _insert_block_jit(buffer, block, jnp.int32(n))
    return buffer


def gather_union(first: Buffer, second: Buffer, index: jax.Array) -> Batch:
    """Rows of both buffers as if they were one pre-filled with `first`: index < first.size is a
    row of `first`, the rest row index - first.size of `second`."""
    in_second = index >= first.size
    first_rows = jnp.minimum(index, first.capacity - 1)
    second_rows = jnp.clip(index - first.size, 0, second.capacity - 1)
    return {name: jnp.where(in_second.reshape(index.shape + (1,) * (first.data[name].ndim - 1)),
                            second.data[name][second_rows], first.data[name][first_rows])
            for name in first.data}


def sample_union(key: jax.Array, first: Buffer, second: Buffer, shape: tuple[int, ...]) -> Batch:
    """Rows drawn uniformly from the filled rows of both buffers together, as if they were one
    buffer pre-filled with `first` (IQL's fine-tuning buffer, without copying the offline data)."""
    total = first.size + second.size
    return gather_union(first, second, jax.random.randint(key, shape, 0, jnp.maximum(total, 1)))


def sample_newest(buffer: Buffer, key: jax.Array, count: int, window: int) -> Batch:
    """`count` rows drawn uniformly from the newest min(size, window) rows of a ring buffer."""
    newest = jnp.maximum(jnp.minimum(buffer.size, window), 1)
    rows = (buffer.cursor - 1 - jax.random.randint(key, (count,), 0, newest)) % buffer.capacity
    return {name: array[rows] for name, array in buffer.data.items()}
