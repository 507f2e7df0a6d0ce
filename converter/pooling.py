"""Builtin-only backward passes for 2-D pooling.

TensorFlow's MaxPoolGrad/AvgPoolGrad become Flex ops in TFLite. Here every
window offset ``(i, j)`` is a strided slice of the (padded) input, so the
gradient is built from STRIDED_SLICE, EQUAL, PACK, RESHAPE and PAD only.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow's SAME padding (before, after) along one axis."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def output_size(size: int, kernel: int, stride: int, padding: str) -> int:
    if padding == "same":
        return -(-size // stride)
    return (size - kernel) // stride + 1


def window_slices(xp: tf.Tensor, pool: tuple[int, int], strides: tuple[int, int], out_hw):
    """Yield ``((i, j), slice)``: the input element at offset (i, j) of every window."""
    (ph, pw), (sh, sw), (ho, wo) = pool, strides, out_hw
    for i in range(ph):
        for j in range(pw):
            yield (i, j), xp[:, i : i + sh * (ho - 1) + 1 : sh, j : j + sw * (wo - 1) + 1 : sw, :]


def _interleave_zeros(v: tf.Tensor, stride: int, axis: int) -> tf.Tensor:
    """Insert ``stride - 1`` zeros after every element along ``axis`` (1 or 2)."""
    if stride == 1:
        return v
    stacked = tf.stack([v] + [tf.zeros_like(v)] * (stride - 1), axis=axis + 1)
    shape = v.shape.as_list()
    shape[axis] *= stride
    return tf.reshape(stacked, shape)


def scatter_windows(parts, pool, strides, padded_hw, out_hw) -> tf.Tensor:
    """Sum per-offset window gradients back onto the padded input grid.

    ``parts[(i, j)]`` has the output's shape; element (ho, wo) belongs to
    input position (i + sh*ho, j + sw*wo).
    """
    (ph, pw), (sh, sw), (hp, wp), (ho, wo) = pool, strides, padded_hw, out_hw
    if (sh, sw) == (ph, pw) and (hp, wp) == (ho * sh, wo * sw):
        # Non-overlapping windows tiling the input exactly: interleave, no zeros.
        rows = [tf.stack([parts[(i, j)] for j in range(pw)], axis=3) for i in range(ph)]
        rows = [tf.reshape(r, [r.shape[0], ho, wo * pw, r.shape[-1]]) for r in rows]
        full = tf.stack(rows, axis=2)
        return tf.reshape(full, [full.shape[0], ho * ph, wo * pw, full.shape[-1]])
    total = None
    for (i, j), part in parts.items():
        up = _interleave_zeros(_interleave_zeros(part, sh, 1), sw, 2)
        up = up[:, : min(up.shape[1], hp - i), : min(up.shape[2], wp - j), :]
        up = tf.pad(up, [[0, 0], [i, hp - i - up.shape[1]], [j, wp - j - up.shape[2]], [0, 0]])
        total = up if total is None else total + up
    return total


def padding_amounts(hw, window, strides, padding: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """((top, bottom), (left, right)) that TensorFlow pads for ``padding``."""
    if padding != "same":
        return (0, 0), (0, 0)
    return tuple(same_padding(hw[a], window[a], strides[a]) for a in (0, 1))


def pad_input(x: tf.Tensor, window, strides, padding: str, value: float) -> tuple[tf.Tensor, tuple]:
    """Pad ``x`` as TensorFlow does for ``padding``; return it and the pads."""
    pads = padding_amounts(tuple(x.shape[1:3]), window, strides, padding)
    if pads == ((0, 0), (0, 0)):
        return x, pads
    return tf.pad(x, [[0, 0], list(pads[0]), list(pads[1]), [0, 0]], constant_values=value), pads


def crop(xp: tf.Tensor, pads, hw) -> tf.Tensor:
    (top, _), (left, _) = pads
    return xp[:, top : top + hw[0], left : left + hw[1], :]


def max_pool_grad(x, y, dy, pool, strides, padding) -> tf.Tensor:
    """Gradient of max pooling, routed to the first maximum of each window.

    "First" is row-major order inside the window, as TensorFlow's CPU
    MaxPoolGrad does, so ties (common after ReLU) match it exactly.
    """
    xp, pads = pad_input(x, pool, strides, padding, value=np.finfo(np.float32).min)
    out_hw = tuple(y.shape[1:3])
    taken = None
    parts = {}
    for offset, window in window_slices(xp, pool, strides, out_hw):
        hit = tf.equal(window, y)
        if taken is not None:
            hit = tf.logical_and(hit, tf.logical_not(taken))
        taken = hit if taken is None else tf.logical_or(taken, hit)
        parts[offset] = dy * tf.cast(hit, dy.dtype)
    grad = scatter_windows(parts, pool, strides, tuple(xp.shape[1:3]), out_hw)
    return crop(grad, pads, tuple(x.shape[1:3]))


def avg_pool_counts(hw, pool, strides, padding) -> np.ndarray:
    """How many real (non-padding) inputs each output window averages."""
    ones = np.pad(np.ones(hw, np.float32), padding_amounts(hw, pool, strides, padding))
    out = [output_size(hw[a], pool[a], strides[a], padding) for a in (0, 1)]
    counts = np.zeros(out, np.float32)
    for i in range(pool[0]):
        for j in range(pool[1]):
            counts += ones[
                i : i + strides[0] * (out[0] - 1) + 1 : strides[0], j : j + strides[1] * (out[1] - 1) + 1 : strides[1]
            ]
    return counts


def avg_pool_grad(x, dy, pool, strides, padding) -> tf.Tensor:
    """Gradient of average pooling (padding excluded from the mean, as in TF)."""
    hw = tuple(x.shape[1:3])
    counts = avg_pool_counts(hw, pool, strides, padding)
    share = dy / tf.constant(counts[None, :, :, None])
    pads = padding_amounts(hw, pool, strides, padding)
    padded_hw = (hw[0] + sum(pads[0]), hw[1] + sum(pads[1]))
    parts = {(i, j): share for i in range(pool[0]) for j in range(pool[1])}
    grad = scatter_windows(parts, pool, strides, padded_hw, tuple(dy.shape[1:3]))
    return crop(grad, pads, hw)
