"""common/buffers.py: on-device ring buffer and the mixed-ratio sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import buffers


def marked(source: float, n: int) -> buffers.Buffer:
    return buffers.from_arrays({"source": np.full(n, source, np.float32), "index": np.arange(n, dtype=np.float32)})


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_every_minibatch_holds_the_offline_share(ratio):
    offline, online = marked(1.0, 1000), marked(0.0, 50)
    batch = jax.jit(buffers.sample_mixed, static_argnums=(3, 4, 5))(
        jax.random.PRNGKey(0), offline, online, 5, 64, ratio)
    assert batch["source"].shape == (5, 64)
    np.testing.assert_array_equal(batch["source"].sum(axis=1), [round(64 * ratio)] * 5)


def test_sampling_covers_only_filled_rows():
    online = buffers.empty_like({"source": np.float32(0), "index": np.float32(0)}, 100)
    for i in range(10):
        online = buffers.insert(online, {"source": jnp.float32(0), "index": jnp.float32(i)})
    rows = buffers.sample(online, jax.random.PRNGKey(1), (2000,))["index"]
    assert set(np.unique(rows)) == set(range(10))


def test_ring_overwrites_oldest_and_checkpoint_round_trip():
    buffer = buffers.empty_like({"x": np.float32(0)}, 4)
    insert = jax.jit(buffers.insert, donate_argnums=0)
    for value in range(6):
        buffer = insert(buffer, {"x": jnp.float32(value)})
    assert int(buffer.size) == 4 and int(buffer.cursor) == 2
    np.testing.assert_array_equal(buffer.data["x"], [4, 5, 2, 3])
    rows = buffers.filled_rows(buffer)
    restored = buffers.restore_rows(buffers.empty_like({"x": np.float32(0)}, 4), rows, int(buffer.cursor))
    np.testing.assert_array_equal(restored.data["x"], buffer.data["x"])
    assert int(restored.size) == 4 and int(restored.cursor) == 2


def test_gather_union_reads_the_second_buffer_after_the_first():
    first, second = marked(1.0, 5), marked(0.0, 3)
    rows = buffers.gather_union(first, second, jnp.array([0, 4, 5, 7]))
    np.testing.assert_array_equal(rows["source"], [1, 1, 0, 0])
    np.testing.assert_array_equal(rows["index"], [0, 4, 0, 2])


def test_sample_newest_draws_only_the_newest_rows_of_the_ring():
    ring = buffers.empty_like({"x": np.float32(0)}, 8)
    for value in range(11):  # the ring holds 3..10, the newest at row 2
        ring = buffers.insert(ring, {"x": jnp.float32(value)})
    rows = buffers.sample_newest(ring, jax.random.PRNGKey(0), 2000, 4)["x"]
    assert set(np.unique(rows)) == {7, 8, 9, 10}
    assert set(np.unique(buffers.sample_newest(ring, jax.random.PRNGKey(0), 2000, 100)["x"])) == set(range(3, 11))
