"""Convolutions, pooling and other spatial layers: ops and their lowerings.

Convolutions with a trainable kernel are im2col + BATCH_MATMUL
(:mod:`converter.windows`): LiteRT cannot pre-pack a runtime filter, and
its CONV_2D with one is slower than the matmul.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from converter import windows
from converter.activations import with_activation
from converter.layers import unsupported, with_params
from converter.ops import Op


@dataclass
class Conv2D(Op):
    """Convolution as im2col + BATCH_MATMUL (see :func:`windows.correlate`).

    The kernel is a variable, so LiteRT cannot pre-pack it: a CONV_2D with a
    runtime filter measured 16 ms on the MNIST CNN's second layer where
    im2col + BATCH_MATMUL took 6 ms.
    """

    strides: tuple[int, int] = (1, 1)
    padding: str = "valid"

    def forward(self, x, params, training):
        kernel = params[0]
        xp, _ = windows.pad_input(x, kernel.shape[:2], self.strides, self.padding, value=0.0)
        out_hw = tuple(
            windows.output_size(x.shape[a], kernel.shape[a - 1], self.strides[a - 1], self.padding) for a in (1, 2)
        )
        y = windows.correlate(xp, kernel, self.strides, out_hw)
        return (y + params[1] if len(params) > 1 else y), (x.shape, xp)

    def backward(self, dy, cache, params, need_dx):
        x_shape, xp = cache
        kernel = params[0]
        grads = [windows.correlate_kernel_grad(xp, dy, kernel.shape, self.strides)]
        if len(params) > 1:
            grads.append(tf.reduce_sum(dy, axis=[0, 1, 2]))
        dx = self._input_grad(dy, kernel, x_shape) if need_dx else None
        return dx, grads

    def _input_grad(self, dy, kernel, x_shape):
        """The transpose of the convolution.

        Stride 1: the zero-padded output gradient correlated with the spatially
        flipped kernel, in/out channels swapped (measured 8.8 ms against 15 ms
        for TRANSPOSE_CONV with a runtime kernel). Other strides: TRANSPOSE_CONV.
        """
        if self.strides != (1, 1):
            return tf.nn.conv2d_transpose(dy, kernel, x_shape, self.strides, self.padding.upper())
        kh, kw = kernel.shape[0], kernel.shape[1]
        (top, bottom), (left, right) = windows.padding_amounts(tuple(x_shape[1:3]), (kh, kw), (1, 1), self.padding)
        dyp = tf.pad(dy, [[0, 0], [kh - 1 - top, kh - 1 - bottom], [kw - 1 - left, kw - 1 - right], [0, 0]])
        flipped = tf.transpose(tf.reverse(kernel, axis=[0, 1]), [0, 1, 3, 2])
        return windows.correlate(dyp, flipped, (1, 1), tuple(x_shape[1:3]))


@dataclass
class MaxPool2D(Op):
    pool: tuple[int, int] = (2, 2)
    strides: tuple[int, int] = (2, 2)
    padding: str = "valid"

    def forward(self, x, params, training):
        y = tf.nn.max_pool2d(x, self.pool, self.strides, self.padding.upper())
        return y, (x, y)

    def backward(self, dy, cache, params, need_dx):
        x, y = cache
        return windows.max_pool_grad(x, y, dy, self.pool, self.strides, self.padding), []


@dataclass
class AvgPool2D(Op):
    pool: tuple[int, int] = (2, 2)
    strides: tuple[int, int] = (2, 2)
    padding: str = "valid"

    def forward(self, x, params, training):
        return tf.nn.avg_pool2d(x, self.pool, self.strides, self.padding.upper()), x

    def backward(self, dy, x, params, need_dx):
        return windows.avg_pool_grad(x, dy, self.pool, self.strides, self.padding), []


@dataclass
class GlobalPool2D(Op):
    """GlobalAveragePooling2D (``mean``) and GlobalMaxPooling2D (``max``) over H and W."""

    kind: str = "mean"
    keepdims: bool = False

    def forward(self, x, params, training):
        reduce = tf.reduce_mean if self.kind == "mean" else tf.reduce_max
        y = reduce(x, axis=[1, 2], keepdims=True)
        return (y if self.keepdims else tf.reshape(y, [x.shape[0], x.shape[3]])), (x, y)

    def backward(self, dy, cache, params, need_dx):
        x, y = cache
        dy = tf.reshape(dy, [x.shape[0], 1, 1, x.shape[3]])
        if self.kind == "mean":
            # A broadcasting MUL by a constant 1/(H*W) spreads the gradient over H x W.
            share = tf.constant(np.full((1, x.shape[1], x.shape[2], 1), 1.0 / (x.shape[1] * x.shape[2]), np.float32))
            return dy * share, []
        # TensorFlow's reduce_max gradient: ties share the gradient equally.
        hits = tf.cast(tf.equal(x, y), x.dtype)
        return hits * (dy / tf.reduce_sum(hits, axis=[1, 2], keepdims=True)), []


def _lower_conv(layer) -> list[Op]:
    if tuple(layer.dilation_rate) != (1, 1) or layer.groups != 1:
        raise unsupported(layer, "dilated or grouped convolutions are not supported")
    if layer.padding not in ("valid", "same"):
        raise unsupported(layer, f"padding {layer.padding!r} is not supported")
    op = Conv2D(layer.name, strides=tuple(layer.strides), padding=layer.padding)
    return with_activation(layer, with_params(layer, op))


def _lower_pool(layer, cls) -> list[Op]:
    strides = tuple(layer.strides) if layer.strides is not None else tuple(layer.pool_size)
    return [cls(layer.name, pool=tuple(layer.pool_size), strides=strides, padding=layer.padding)]


def _lower_global_pool(layer, kind: str) -> list[Op]:
    return [GlobalPool2D(layer.name, kind=kind, keepdims=bool(layer.keepdims))]


LOWERINGS: dict[str, Callable[[keras.layers.Layer], list[Op]]] = {
    "Conv2D": _lower_conv,
    "MaxPooling2D": lambda layer: _lower_pool(layer, MaxPool2D),
    "AveragePooling2D": lambda layer: _lower_pool(layer, AvgPool2D),
    "GlobalAveragePooling2D": lambda layer: _lower_global_pool(layer, "mean"),
    "GlobalMaxPooling2D": lambda layer: _lower_global_pool(layer, "max"),
}
"""Spatial layer types and their lowerings (merged into :data:`converter.lowering.SUPPORTED_LAYERS`)."""
