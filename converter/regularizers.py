"""Keras' L1/L2 weight penalties, added to the loss and the gradients of ``train``.

Keras 3 adds ``l1 * sum(|w|) + l2 * sum(w^2)`` of every *trainable* weight
with a regularizer to the loss that ``fit``/``train_on_batch`` minimise and
report. Frozen layers (``trainable=False``) add nothing: Keras only looks at
``layer.trainable_weights``, so a regularizer on a frozen layer is ignored
here too (its weights are constants, not params). Activity regularizers
(a penalty on a layer's outputs, added even when the layer is frozen) and
regularizers other than ``L1``, ``L2`` and ``L1L2`` are refused.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from converter.ops import Param

_SUPPORTED = (keras.regularizers.L1, keras.regularizers.L2, keras.regularizers.L1L2)
# The regularizer attribute of each weight Keras names differently from ``<weight>_regularizer``.
_ATTRIBUTES = {
    "depthwise_kernel": "depthwise_regularizer",
    "pointwise_kernel": "pointwise_regularizer",
    "recurrent_kernel": "recurrent_regularizer",
}
_WEIGHT_ATTRIBUTES = (
    "kernel_regularizer",
    "bias_regularizer",
    "depthwise_regularizer",
    "pointwise_regularizer",
    "recurrent_regularizer",
    "embeddings_regularizer",
    "gamma_regularizer",
    "beta_regularizer",
)


def check_supported(layer: keras.layers.Layer) -> None:
    """Refuse regularizers litefed does not add to the loss."""
    from converter.layers import unsupported  # late: layers imports this module

    if getattr(layer, "activity_regularizer", None) is not None:
        raise unsupported(layer, "activity_regularizer (a penalty on the layer's outputs) is not supported; remove it")
    if not layer.trainable_weights:
        return  # Keras ignores the regularizers of frozen weights
    found = {attr: getattr(layer, attr, None) for attr in _WEIGHT_ATTRIBUTES}
    found.update({f"the regularizer of {v.path}": getattr(v, "regularizer", None) for v in layer.trainable_weights})
    for where, regularizer in found.items():
        if regularizer is not None and type(regularizer) not in _SUPPORTED:
            raise unsupported(
                layer,
                f"{where} is a {type(regularizer).__name__}; litefed adds L1, L2 and L1L2 penalties only: "
                "use keras.regularizers.L1, L2 or L1L2 (or 'l1'/'l2'), or remove it",
            )


def regularizer_of(layer: keras.layers.Layer, weight: str) -> tuple[float, float] | None:
    """The ``(l1, l2)`` penalty Keras adds to the loss for ``layer``'s ``weight`` (``kernel``, ``bias``...).

    The weight's own Keras variable says what Keras adds (its ``regularizer``,
    set by ``add_weight``); the layer's ``<weight>_regularizer`` attribute is
    the fallback for a weight the lowering names differently.
    """
    from converter.layers import unsupported  # late: layers imports this module

    variables = [v for v in layer.trainable_weights if v.name == weight]
    if variables:
        regularizer = getattr(variables[0], "regularizer", None)
    elif layer.trainable_weights:
        regularizer = getattr(layer, _ATTRIBUTES.get(weight, f"{weight}_regularizer"), None)
    else:
        return None  # frozen: Keras adds no penalty
    if regularizer is None:
        return None
    if type(regularizer) not in _SUPPORTED:
        raise unsupported(layer, f"the {type(regularizer).__name__} regularizer of {weight} is not supported")
    l1, l2 = float(getattr(regularizer, "l1", 0.0)), float(getattr(regularizer, "l2", 0.0))
    return (l1, l2) if l1 or l2 else None


def apply(specs: list[Param], params: list[tf.Tensor], grads: list[tf.Tensor]) -> tuple[tf.Tensor, list[tf.Tensor]]:
    """The penalty to add to the loss, and ``grads`` with the penalty's gradient added.

    ``params`` are the values the step's forward pass used, so the penalty is
    Keras' (computed before the update). d|w|/dw is ``sign(w)``, 0 at 0 as
    TensorFlow's gradient of ``abs``; d(l2 w^2)/dw is ``2 l2 w``.
    """
    terms: list[tf.Tensor] = []
    out = list(grads)
    for i, (spec, value) in enumerate(zip(specs, params, strict=True)):
        if spec.regularizer is None:
            continue
        l1, l2 = spec.regularizer
        if l1:
            terms.append(l1 * tf.reduce_sum(tf.abs(value)))
            out[i] = out[i] + l1 * tf.sign(value)
        if l2:
            terms.append(l2 * tf.reduce_sum(tf.square(value)))
            out[i] = out[i] + (2.0 * l2) * value
    penalty = tf.add_n(terms) if terms else tf.constant(0.0)
    return penalty, out
