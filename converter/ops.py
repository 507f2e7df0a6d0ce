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

from converter import windows

Cache = Any


def matmul_transposed_b(a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
    """``a @ b^T`` that stays a BATCH_MATMUL.

    A 2-D ``matmul(..., transpose_b=True)`` becomes FULLY_CONNECTED, which is
    slow with a runtime weight (3.0 ms vs 0.47 ms for the MNIST CNN's
    3136x512 Dense); the rank-3 form keeps BATCH_MATMUL with adj_y.
    """
    out = tf.matmul(tf.reshape(a, [1, *a.shape]), tf.reshape(b, [1, *b.shape]), transpose_b=True)
    return tf.reshape(out, [a.shape[0], b.shape[0]])


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
        dx = matmul_transposed_b(dy, params[0]) if need_dx else None
        return dx, grads


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


ACTIVATIONS = ("linear", "relu", "relu6", "leaky_relu", "sigmoid", "tanh", "softmax")


@dataclass
class Activation(Op):
    """An element-wise activation; ``relu`` also covers ReLU6/``ReLU(max_value)`` and LeakyReLU."""

    kind: str = "linear"
    max_value: float | None = None  # relu only
    negative_slope: float = 0.0  # relu only

    def forward(self, x, params, training):
        if self.kind == "relu":
            return self._relu(x)
        fn = {"linear": tf.identity, "sigmoid": tf.sigmoid, "tanh": tf.tanh, "softmax": tf.nn.softmax}[self.kind]
        y = fn(x)
        return y, y

    def _relu(self, x):
        # x * slope rather than RELU/RELU6/LEAKY_RELU: the TFLite converter fuses a RELU
        # or RELU6 into a preceding bias-free matmul as BATCH_MATMUL, which has no
        # activation slot, and the activation is silently lost. The slope is the backward pass.
        positive = tf.cast(x > 0, x.dtype)
        if self.max_value is None and self.negative_slope == 0:
            return x * positive, positive
        slope = positive
        saturated = None
        if self.max_value is not None:
            saturated = tf.cast(x >= self.max_value, x.dtype)
            slope = positive - saturated  # 1 on (0, max), as Relu6Grad and clip's gradient
        if self.negative_slope:
            slope = slope + self.negative_slope * (1.0 - positive)
        y = x * slope
        return (y if saturated is None else y + self.max_value * saturated), slope

    def backward(self, dy, cache, params, need_dx):
        if self.kind == "relu":
            return dy * cache, []
        y = cache
        if self.kind == "sigmoid":
            dx = dy * y * (1.0 - y)
        elif self.kind == "tanh":
            dx = dy * (1.0 - y * y)
        elif self.kind == "softmax":
            dx = y * (dy - tf.reduce_sum(dy * y, axis=-1, keepdims=True))
        else:
            dx = dy
        return dx, []


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


@dataclass
class Frozen(Op):
    """A layer with frozen weights above the lowest trainable one.

    Its weights are graph constants (not variables, not in ``get_weights``);
    only the input gradient flows through it. The inner op's weight gradients
    are never used, so the TFLite converter drops them as dead code.
    """

    inner: Op | None = None  # always given; a default only because Op's fields have defaults
    values: tuple[np.ndarray, ...] = ()

    def _op(self) -> Op:
        if self.inner is None:
            raise ValueError(f"Frozen op {self.layer!r} has no inner op")
        return self.inner

    def forward(self, x, params, training):
        constants = [tf.constant(v) for v in self.values]
        y, cache = self._op().forward(x, constants, training)
        return y, (cache, constants)

    def backward(self, dy, cache, params, need_dx):
        inner_cache, constants = cache
        dx, _ = self._op().backward(dy, inner_cache, constants, need_dx)
        return dx, []
