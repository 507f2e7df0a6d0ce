"""Forward and hand-written backward passes of every supported layer.

Each op maps a static-shape input to an output (``forward``) and an output
gradient to the input gradient and parameter gradients (``backward``),
using only TensorFlow ops that lower to TFLite builtins. TensorFlow's own
gradient kernels (ReluGrad, Conv2DBackpropFilter, MaxPoolGrad, ...) are
never traced, which is what keeps Flex ops out of the converted graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tensorflow as tf

from converter import pooling

Cache = Any


@dataclass
class Param:
    """A trainable tensor: its stable name (``layer/kernel``) and initial value."""

    name: str
    initial: np.ndarray


@dataclass
class Op:
    """Base op: no parameters, identity forward."""

    layer: str
    params: list[Param] = field(default_factory=list)

    def forward(self, x: tf.Tensor, params: list[tf.Tensor], training: bool) -> tuple[tf.Tensor, Cache]:
        raise NotImplementedError

    def backward(self, dy: tf.Tensor, cache: Cache, params: list[tf.Tensor], need_dx: bool):
        """Return ``(dx or None, [grad per param])``."""
        raise NotImplementedError


@dataclass
class Dense(Op):
    def forward(self, x, params, training):
        y = tf.matmul(x, params[0])
        return (y + params[1] if len(params) > 1 else y), x

    def backward(self, dy, x, params, need_dx):
        grads = [tf.matmul(x, dy, transpose_a=True)]
        if len(params) > 1:
            grads.append(tf.reduce_sum(dy, axis=0))
        dx = tf.matmul(dy, params[0], transpose_b=True) if need_dx else None
        return dx, grads


@dataclass
class Conv2D(Op):
    strides: tuple[int, int] = (1, 1)
    padding: str = "valid"

    def forward(self, x, params, training):
        y = tf.nn.conv2d(x, params[0], self.strides, self.padding.upper())
        return (y + params[1] if len(params) > 1 else y), x

    def backward(self, dy, x, params, need_dx):
        kernel = params[0]
        grads = [self._kernel_grad(x, dy, kernel.shape)]
        if len(params) > 1:
            grads.append(tf.reduce_sum(dy, axis=[0, 1, 2]))
        dx = self._input_grad(dy, kernel, x.shape) if need_dx else None
        return dx, grads

    def _input_grad(self, dy, kernel, x_shape):
        """The transpose of the convolution.

        Stride 1: a plain CONV_2D of the zero-padded output gradient with the
        spatially flipped kernel (in/out channels swapped); measured 2.5x
        faster in LiteRT than TRANSPOSE_CONV with a runtime kernel.
        Other strides: TRANSPOSE_CONV.
        """
        if self.strides != (1, 1):
            return tf.nn.conv2d_transpose(dy, kernel, x_shape, self.strides, self.padding.upper())
        kh, kw = kernel.shape[0], kernel.shape[1]
        (top, bottom), (left, right) = pooling.padding_amounts(tuple(x_shape[1:3]), (kh, kw), (1, 1), self.padding)
        pads = [[0, 0], [kh - 1 - top, kh - 1 - bottom], [kw - 1 - left, kw - 1 - right], [0, 0]]
        flipped = tf.transpose(tf.reverse(kernel, axis=[0, 1]), [0, 1, 3, 2])
        return tf.nn.conv2d(tf.pad(dy, pads), flipped, 1, "VALID")

    def _kernel_grad(self, x, dy, kernel_shape):
        """Filter gradient as im2col + one matmul: patches^T @ dy."""
        kh, kw, cin, cout = kernel_shape
        xp, _ = pooling.pad_input(x, (kh, kw), self.strides, self.padding, value=0.0)
        out_hw = tuple(dy.shape[1:3])
        cols = [w for _, w in pooling.window_slices(xp, (kh, kw), self.strides, out_hw)]
        rows = dy.shape[0] * out_hw[0] * out_hw[1]
        patches = tf.reshape(tf.concat(cols, axis=-1) if len(cols) > 1 else cols[0], [rows, kh * kw * cin])
        grad = tf.matmul(patches, tf.reshape(dy, [rows, cout]), transpose_a=True)
        return tf.reshape(grad, [kh, kw, cin, cout])


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
        return pooling.max_pool_grad(x, y, dy, self.pool, self.strides, self.padding), []


@dataclass
class AvgPool2D(Op):
    pool: tuple[int, int] = (2, 2)
    strides: tuple[int, int] = (2, 2)
    padding: str = "valid"

    def forward(self, x, params, training):
        return tf.nn.avg_pool2d(x, self.pool, self.strides, self.padding.upper()), x

    def backward(self, dy, x, params, need_dx):
        return pooling.avg_pool_grad(x, dy, self.pool, self.strides, self.padding), []


@dataclass
class Reshape(Op):
    """Flatten and Reshape: ``target`` excludes the batch dimension."""

    target: tuple[int, ...] = (-1,)

    def forward(self, x, params, training):
        return tf.reshape(x, [x.shape[0], *self.target]), x.shape

    def backward(self, dy, in_shape, params, need_dx):
        return tf.reshape(dy, in_shape), []


@dataclass
class Dropout(Op):
    rate: float = 0.5
    active: bool = True  # False builds a deterministic twin for verification

    def forward(self, x, params, training):
        if not (training and self.active and self.rate > 0):
            return x, None
        keep = tf.cast(tf.random.uniform(x.shape) >= self.rate, x.dtype) / (1.0 - self.rate)
        return x * keep, keep

    def backward(self, dy, keep, params, need_dx):
        return (dy if keep is None else dy * keep), []


@dataclass
class Rescale(Op):
    scale: Any = 1.0
    offset: Any = 0.0

    def forward(self, x, params, training):
        return x * tf.constant(self.scale, x.dtype) + tf.constant(self.offset, x.dtype), None

    def backward(self, dy, cache, params, need_dx):
        return dy * tf.constant(self.scale, dy.dtype), []


ACTIVATIONS = ("linear", "relu", "sigmoid", "tanh", "softmax")


@dataclass
class Activation(Op):
    kind: str = "linear"

    def forward(self, x, params, training):
        fn = {
            "linear": tf.identity,
            "relu": tf.nn.relu,
            "sigmoid": tf.sigmoid,
            "tanh": tf.tanh,
            "softmax": tf.nn.softmax,
        }[self.kind]
        y = fn(x)
        return y, (x, y)

    def backward(self, dy, cache, params, need_dx):
        x, y = cache
        if self.kind == "relu":
            dx = dy * tf.cast(x > 0, dy.dtype)
        elif self.kind == "sigmoid":
            dx = dy * y * (1.0 - y)
        elif self.kind == "tanh":
            dx = dy * (1.0 - y * y)
        elif self.kind == "softmax":
            dx = y * (dy - tf.reduce_sum(dy * y, axis=-1, keepdims=True))
        else:
            dx = dy
        return dx, []
