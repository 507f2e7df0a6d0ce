"""The builtin-only pooling gradients equal TensorFlow's own gradient kernels.

Checked in TensorFlow (no conversion), over paddings, odd sizes, overlapping
and tiled windows, and inputs full of ties, where "which maximum gets the
gradient" matters. The LiteRT side is covered by the parity tests.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import tensorflow as tf

from converter import windows

SIZES = [(8, 8), (7, 9), (5, 5)]
POOLS = [(2, 2), (3, 3), (2, 3)]
STRIDES = ["pool", (1, 1), (2, 1)]
CASES = [
    (hw, pool, stride, padding, ties)
    for hw, pool, stride, padding, ties in itertools.product(SIZES, POOLS, STRIDES, ["valid", "same"], [False, True])
    if padding == "same" or (hw[0] >= pool[0] and hw[1] >= pool[1])
]


@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize(("hw", "pool", "stride", "padding", "ties"), CASES)
def test_pool_gradient_matches_tensorflow(kind, hw, pool, stride, padding, ties):
    rng = np.random.default_rng(hash((hw, pool, str(stride), padding, ties)) % 2**32)
    strides = pool if stride == "pool" else stride
    shape = (2, *hw, 3)
    x = rng.integers(0, 3, shape) if ties else rng.normal(size=shape)
    xt = tf.constant(x.astype(np.float32))
    pool_fn = tf.nn.max_pool2d if kind == "max" else tf.nn.avg_pool2d
    with tf.GradientTape() as tape:
        tape.watch(xt)
        y = pool_fn(xt, pool, strides, padding.upper())
    dy = tf.constant(rng.normal(size=y.shape).astype(np.float32))
    expected = tape.gradient(y, xt, output_gradients=dy).numpy()
    if kind == "max":
        got = windows.max_pool_grad(xt, y, dy, pool, strides, padding)
    else:
        got = windows.avg_pool_grad(xt, dy, pool, strides, padding)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-5)


def test_ties_really_occur_in_the_tie_cases():
    """More inputs equal their window's maximum than there are windows."""
    x = tf.constant(np.random.default_rng(0).integers(0, 3, (2, 8, 8, 3)).astype(np.float32))
    pooled = tf.nn.max_pool2d(x, 2, 2, "VALID")
    hits = tf.equal(x, tf.image.resize(pooled, [8, 8], method="nearest"))
    assert int(tf.reduce_sum(tf.cast(hits, tf.int32))) > pooled.shape.num_elements()


@pytest.mark.parametrize(("batch", "per_example", "budget"), [(32, 1_000_000, 4_000_000), (5, 10, 4), (3, 100, 10**9)])
def test_batch_chunks_cover_the_batch_within_budget(batch, per_example, budget):
    chunks = windows.batch_chunks(batch, per_example, budget)
    assert [i for start, stop in chunks for i in range(start, stop)] == list(range(batch))
    assert all((stop - start) * per_example <= budget or stop - start == 1 for start, stop in chunks)
