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
    """A tensor of the model: its stable name (``layer/kernel``) and initial value.

    ``regularizer`` is Keras' ``(l1, l2)`` penalty on it, added to the loss
    (:mod:`converter.regularizers`); ``None`` for none.
    """

    name: str
    initial: np.ndarray
    regularizer: tuple[float, float] | None = None


@dataclass
class Op:
    """Base op of one input and one output.

    ``params`` are trained (the backward pass returns a gradient for each);
    ``state`` are tensors the op updates itself during ``train`` and that are
    never differentiated (BatchNormalization's moving statistics). Both reach
    ``forward`` and ``backward`` as one list: the params' current values, then
    the state's.
    """

    layer: str
    params: list[Param] = field(default_factory=list)
    state: list[Param] = field(default_factory=list)

    def forward(self, x: tf.Tensor, params: list[tf.Tensor], training: bool) -> tuple[tf.Tensor, Cache]:
        raise NotImplementedError

    def backward(self, dy: tf.Tensor, cache: Cache, params: list[tf.Tensor], need_dx: bool):
        """Return ``(dx or None, [grad per param])``: one gradient per ``params`` entry, none for ``state``."""
        raise NotImplementedError

    def state_updates(self, cache: Cache, params: list[tf.Tensor]) -> list[tf.Tensor]:
        """The new value of every ``state`` tensor after a training forward pass (none by default)."""
        return []


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
