"""Element-wise activations: the op, and the lowering of activation layers and arguments.

Every activation has a hand-written derivative; ``forward`` caches what the
derivative needs (the output for sigmoid/tanh/softmax, the slope for ReLUs).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import keras
import tensorflow as tf

from converter.layers import unsupported
from converter.ops import Op

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


def activation_op(layer: keras.layers.Layer, fn: Callable, name: str) -> Activation:
    """The op for a Keras activation function (``relu6`` and ``leaky_relu`` are parametrised ReLUs)."""
    kind = getattr(fn, "__name__", type(fn).__name__)
    if kind not in ACTIVATIONS:
        raise unsupported(layer, f"activation {kind!r} is not supported")
    if kind == "relu6":
        return Activation(name, kind="relu", max_value=6.0)
    if kind == "leaky_relu":  # keras.activations.leaky_relu's default slope
        return Activation(name, kind="relu", negative_slope=0.2)
    return Activation(name, kind=kind)


def with_activation(layer: keras.layers.Layer, op: Op) -> list[Op]:
    """``op`` followed by the layer's ``activation`` argument, unless it is linear."""
    act = activation_op(layer, layer.activation, layer.name)
    return [op] if act.kind == "linear" else [op, act]


def _lower_relu(layer) -> list[Op]:
    if float(layer.negative_slope) != 0 or float(layer.threshold) != 0:
        raise unsupported(layer, "ReLU with negative_slope or threshold is not supported; use LeakyReLU")
    max_value = None if layer.max_value is None else float(layer.max_value)
    return [Activation(layer.name, kind="relu", max_value=max_value)]


def _lower_softmax(layer) -> list[Op]:
    if layer.axis not in (-1, len(layer.input.shape) - 1):
        raise unsupported(layer, "softmax is supported over the last axis only")
    return [Activation(layer.name, kind="softmax")]


LOWERINGS: dict[str, Callable[[keras.layers.Layer], list[Op]]] = {
    "Activation": lambda layer: [activation_op(layer, layer.activation, layer.name)],
    "ReLU": _lower_relu,
    "LeakyReLU": lambda layer: [Activation(layer.name, kind="relu", negative_slope=float(layer.negative_slope))],
    "Softmax": _lower_softmax,
}
"""Activation layer types and their lowerings (merged into :data:`converter.lowering.SUPPORTED_LAYERS`)."""
