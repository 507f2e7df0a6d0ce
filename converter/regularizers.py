"""Keras' L1/L2 weight penalties, added to the loss of ``train``.

Until they are lowered, any regularizer is refused at conversion.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from converter.ops import Param


def check_supported(layer: keras.layers.Layer) -> None:
    """Refuse regularizers litefed does not add to the loss."""
    from converter.layers import unsupported  # late: layers imports this module

    for attr in ("kernel_regularizer", "bias_regularizer", "activity_regularizer"):
        if getattr(layer, attr, None) is not None:
            raise unsupported(layer, f"{attr} is not supported; remove it")


def regularizer_of(layer: keras.layers.Layer, weight: str) -> tuple[float, float] | None:
    """The ``(l1, l2)`` penalty Keras adds to the loss for ``layer``'s ``weight`` (``kernel``, ``bias``...)."""
    return None


def apply(specs: list[Param], params: list[tf.Tensor], grads: list[tf.Tensor]) -> tuple[tf.Tensor, list[tf.Tensor]]:
    """The penalty to add to the loss, and ``grads`` with the penalty's gradient added."""
    return tf.constant(0.0), grads
