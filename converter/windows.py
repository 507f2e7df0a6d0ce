"""Sliding windows from builtin ops: padding, im2col, pooling gradients.

Every window offset ``(i, j)`` is a strided slice of the (padded) input, so
convolutions become im2col (one GATHER) + BATCH_MATMUL and the pooling gradients
(MaxPoolGrad/AvgPoolGrad are Flex ops in TFLite) are built from
STRIDED_SLICE, EQUAL, PACK, RESHAPE and PAD only.
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


def im2col(xp: tf.Tensor, window: tuple[int, int], strides: tuple[int, int], out_hw) -> tf.Tensor:
    """Patches of a padded input as a matrix ``[batch*out_h*out_w, kh*kw*channels]``.

    One GATHER along the flattened spatial axis with a constant
    ``[out_h*out_w, kh*kw]`` index: measured faster than concatenating
    ``kh*kw`` strided slices, and without their transient copies.
    Column order is (i, j, channel), matching a ``[kh, kw, cin, cout]``
    kernel reshaped to ``[kh*kw*cin, cout]``.
    """
    (kh, kw), (sh, sw), (ho, wo) = window, strides, out_hw
    batch, hp, wp, channels = xp.shape
    rows = np.arange(ho)[:, None] * sh + np.arange(kh)[None, :]  # [ho, kh]
    cols = np.arange(wo)[:, None] * sw + np.arange(kw)[None, :]  # [wo, kw]
    index = rows[:, None, :, None] * wp + cols[None, :, None, :]  # [ho, wo, kh, kw]
    flat = tf.reshape(xp, [batch, hp * wp, channels])
    patches = tf.gather(flat, index.reshape(ho * wo, kh * kw).astype(np.int32), axis=1)
    return tf.reshape(patches, [batch * ho * wo, kh * kw * channels])


# Largest im2col matrix built at once. The batch is split into chunks under
# this size so LiteRT's arena can reuse one chunk's buffer for the next.
PATCH_BUDGET_BYTES = 4 * 2**20


def batch_chunks(batch: int, bytes_per_example: int, budget: int | None = None) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` covering ``range(batch)`` within the byte budget."""
    budget = PATCH_BUDGET_BYTES if budget is None else budget
    size = max(1, min(batch, budget // max(bytes_per_example, 1)))
    return [(start, min(start + size, batch)) for start in range(0, batch, size)]


def correlate(xp: tf.Tensor, kernel: tf.Tensor, strides: tuple[int, int], out_hw) -> tf.Tensor:
    """Valid cross-correlation of a padded input with a runtime kernel,
    ``[batch, out_h, out_w, cout]``, im2col chunk by chunk over the batch."""
    kh, kw, cin, cout = kernel.shape
    flat_kernel = tf.reshape(kernel, [kh * kw * cin, cout])
    outputs = [
        tf.reshape(
            tf.matmul(im2col(xp[start:stop], (kh, kw), strides, out_hw), flat_kernel), [stop - start, *out_hw, cout]
        )
        for start, stop in batch_chunks(xp.shape[0], out_hw[0] * out_hw[1] * kh * kw * cin * 4)
    ]
    return tf.concat(outputs, axis=0) if len(outputs) > 1 else outputs[0]


def correlate_kernel_grad(xp: tf.Tensor, dy: tf.Tensor, kernel_shape, strides: tuple[int, int]) -> tf.Tensor:
    """Gradient of :func:`correlate` w.r.t. its kernel: the sum over batch chunks
    of patches^T @ dy. The patches are rebuilt rather than kept from the
    forward pass: keeping them held ~19 MB of the MNIST CNN's arena through
    the whole backward pass, for ~1 ms of gathering saved."""
    kh, kw, cin, cout = kernel_shape
    out_hw = tuple(dy.shape[1:3])
    total = None
    for start, stop in batch_chunks(xp.shape[0], out_hw[0] * out_hw[1] * kh * kw * cin * 4):
        patches = im2col(xp[start:stop], (kh, kw), strides, out_hw)
        part = tf.matmul(patches, tf.reshape(dy[start:stop], [-1, cout]), transpose_a=True)
        total = part if total is None else total + part
    return tf.reshape(total, kernel_shape)


def _interleave_zeros(v: tf.Tensor, stride: int, axis: int) -> tf.Tensor:
    """Insert ``stride - 1`` zeros after every element along ``axis`` (1 or 2)."""
    if stride == 1:
        return v
    stacked = tf.stack([v] + [tf.zeros_like(v)] * (stride - 1), axis=axis + 1)
    shape = v.shape.as_list()
    shape[axis] *= stride
    return tf.reshape(stacked, shape)


def scatter_windows(parts, strides, padded_hw) -> tf.Tensor:
    """Sum per-offset window gradients back onto the padded input grid (overlapping windows).

    ``parts[(i, j)]`` has the output's shape; element (ho, wo) belongs to
    input position (i + sh*ho, j + sw*wo).
    """
    (sh, sw), (hp, wp) = strides, padded_hw
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
    return same_padding(hw[0], window[0], strides[0]), same_padding(hw[1], window[1], strides[1])


def pad_input(x: tf.Tensor, window, strides, padding: str, value: float) -> tuple[tf.Tensor, tuple]:
    """Pad ``x`` as TensorFlow does for ``padding``; return it and the pads."""
    pads = padding_amounts(tuple(x.shape[1:3]), window, strides, padding)
    if pads == ((0, 0), (0, 0)):
        return x, pads
    return tf.pad(x, [[0, 0], list(pads[0]), list(pads[1]), [0, 0]], constant_values=value), pads


def crop(xp: tf.Tensor, pads, hw) -> tf.Tensor:
    (top, _), (left, _) = pads
    return xp[:, top : top + hw[0], left : left + hw[1], :]


def _upsample(t: tf.Tensor, factor: tuple[int, int]) -> tf.Tensor:
    """Repeat every element ``factor`` times along H and W (RESIZE_NEAREST_NEIGHBOR).

    For integer factors nearest-neighbour resizing is an exact repeat; it
    measured 12x faster in LiteRT than BROADCAST_TO + RESHAPE.
    """
    return tf.image.resize(t, [t.shape[1] * factor[0], t.shape[2] * factor[1]], method="nearest")


def _tiled_pads(hw, pool, padding) -> tuple[tuple[int, int], tuple[int, int]]:
    """Pads that make non-overlapping windows tile the input exactly.

    Negative "after" values mean rows/columns that no window covers (valid
    padding of a size that is not a multiple of the pool).
    """
    pads = padding_amounts(hw, pool, pool, padding)
    out = [output_size(hw[a], pool[a], pool[a], padding) for a in (0, 1)]
    rows, cols = ((pads[a][0], out[a] * pool[a] - hw[a] - pads[a][0]) for a in (0, 1))
    return rows, cols


def _to_tiles(x: tf.Tensor, pads, value: float) -> tf.Tensor:
    (top, bottom), (left, right) = pads
    x = x[:, : x.shape[1] + min(bottom, 0), : x.shape[2] + min(right, 0), :]
    pad = [[0, 0], [top, max(bottom, 0)], [left, max(right, 0)], [0, 0]]
    return tf.pad(x, pad, constant_values=value) if any(any(p) for p in pad) else x


def _from_tiles(g: tf.Tensor, pads, hw) -> tf.Tensor:
    (top, bottom), (left, right) = pads
    g = g[:, top : top + hw[0] + min(bottom, 0), left : left + hw[1] + min(right, 0), :]
    pad = [[0, 0], [0, max(-bottom, 0)], [0, max(-right, 0)], [0, 0]]
    return tf.pad(g, pad) if any(any(p) for p in pad) else g


def max_pool_grad(x, y, dy, pool, strides, padding) -> tf.Tensor:
    """Gradient of max pooling, routed to the first maximum of each window.

    "First" is row-major order inside the window, as TensorFlow's CPU
    MaxPoolGrad does, so ties (common after ReLU) match it exactly.
    """
    if tuple(strides) == tuple(pool):
        return _max_pool_grad_tiled(x, y, dy, tuple(pool), padding)
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
    grad = scatter_windows(parts, strides, tuple(xp.shape[1:3]))
    return crop(grad, pads, tuple(x.shape[1:3]))


def _max_pool_grad_tiled(x, y, dy, pool, padding) -> tf.Tensor:
    """Non-overlapping windows: mark the maxima, give each window position a
    distinct key (first position highest), max-pool the keys to find the first
    maximum, and send the upsampled gradient there. Measured 3x faster than
    slicing out every window offset."""
    pads = _tiled_pads(tuple(x.shape[1:3]), pool, padding)
    xt = _to_tiles(x, pads, np.finfo(np.float32).min)
    hits = tf.cast(tf.equal(xt, _upsample(y, pool)), x.dtype)
    order = np.arange(pool[0] * pool[1], 0, -1, dtype=np.float32).reshape(pool)
    keys = hits * tf.constant(np.tile(order, (y.shape[1], y.shape[2]))[None, :, :, None])
    first = tf.equal(keys, _upsample(tf.nn.max_pool2d(keys, pool, pool, "VALID"), pool))
    return _from_tiles(tf.cast(first, dy.dtype) * _upsample(dy, pool), pads, tuple(x.shape[1:3]))


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
    if tuple(strides) == tuple(pool):
        pads = _tiled_pads(hw, tuple(pool), padding)
        return _from_tiles(_upsample(share, tuple(pool)), pads, hw)
    pads = padding_amounts(hw, pool, strides, padding)
    padded_hw = (hw[0] + sum(pads[0]), hw[1] + sum(pads[1]))
    parts = {(i, j): share for i in range(pool[0]) for j in range(pool[1])}
    grad = scatter_windows(parts, strides, padded_hw)
    return crop(grad, pads, hw)
