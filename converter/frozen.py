"""The frozen part of a transfer-learning model: everything below the lowest trainable layer.

It runs forward only, in inference mode, through the Keras layers themselves
(``stateless_call``) with their weights passed as graph constants. TFLite
therefore sees an ordinary inference graph with constant filters, lowers it
to builtins (CONV_2D, DEPTHWISE_CONV_2D with BatchNormalization folded, ...)
and XNNPACK pre-packs the filters, so the frozen part runs at inference speed.
No gradient is computed for it: its output is the input of the trainable part.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from converter.errors import UnsupportedModelError
from converter.ops import Op

FROZEN_LAYERS: tuple[str, ...] = (
    "Dense",
    "Conv2D",
    "DepthwiseConv2D",
    "SeparableConv2D",
    "BatchNormalization",
    "ReLU",
    "LeakyReLU",
    "Activation",
    "Softmax",
    "ZeroPadding2D",
    "Cropping2D",
    "MaxPooling2D",
    "AveragePooling2D",
    "GlobalAveragePooling2D",
    "GlobalMaxPooling2D",
    "UpSampling2D",
    "Add",
    "Multiply",
    "Concatenate",
    "Flatten",
    "Reshape",
    "Rescaling",
    "Dropout",
)
"""Keras layer types litefed runs inside a frozen part (inference mode, constant weights)."""

# Dropout at rate 0 and the others need no check; these change what fit computes.
_TRAINING_DEPENDENT = ("Dropout", "BatchNormalization")


def leaf_layers(block: keras.layers.Layer) -> list[keras.layers.Layer]:
    """The non-model layers inside ``block`` (itself if it is not a model), depth first."""
    if not isinstance(block, keras.Model):
        return [block]
    return [leaf for layer in block.layers for leaf in leaf_layers(layer)]


def check_frozen(block: keras.layers.Layer) -> None:
    """Refuse a frozen block whose inference graph would not match Keras' fit or not be builtin-only."""
    for layer in leaf_layers(block):
        kind = type(layer).__name__
        where = f"layer {layer.name!r} ({kind}) in the frozen part below the lowest trainable layer"
        if kind == "InputLayer":
            continue
        if kind not in FROZEN_LAYERS:
            raise UnsupportedModelError(
                f"{where} is not supported; litefed runs these layers frozen: {', '.join(FROZEN_LAYERS)}"
            )
        if kind == "Dropout" and float(layer.rate) > 0:
            raise UnsupportedModelError(
                f"{where}: Keras' fit applies Dropout even in a frozen model (even one called with "
                "training=False), litefed runs the frozen part in inference mode; remove the Dropout "
                "(or set rate=0), or move it above the frozen part"
            )
        if kind == "BatchNormalization" and layer.trainable:
            raise UnsupportedModelError(
                f"{where} is trainable, so Keras would use batch statistics; freeze it (trainable=False)"
            )
        for attr in ("kernel_regularizer", "bias_regularizer", "activity_regularizer"):
            if getattr(layer, attr, None) is not None:
                raise UnsupportedModelError(f"{where}: {attr} adds to Keras' loss and is not supported; remove it")
        if getattr(layer, "data_format", "channels_last") != "channels_last":
            raise UnsupportedModelError(f"{where}: only data_format='channels_last' is supported")


def _frozen_values(block: keras.layers.Layer) -> list[np.ndarray]:
    if block.trainable_variables:
        names = ", ".join(v.path for v in block.trainable_variables)
        raise UnsupportedModelError(f"the frozen part {block.name!r} has trainable weights ({names}); freeze them")
    return [np.asarray(keras.ops.convert_to_numpy(v)) for v in block.non_trainable_variables]


@dataclass
class FrozenPrefix(Op):
    """The frozen blocks (Keras layers or models) applied in order, with constant weights.

    Always the first op, below the first op with parameters, so the graph's
    backward pass never reaches it.
    """

    blocks: tuple[keras.layers.Layer, ...] = ()
    values: tuple[tuple[np.ndarray, ...], ...] = ()

    @classmethod
    def of(cls, blocks: list[keras.layers.Layer]) -> FrozenPrefix:
        for block in blocks:
            check_frozen(block)
        name = blocks[0].name if len(blocks) == 1 else f"{blocks[0].name}..{blocks[-1].name}"
        return cls(name, blocks=tuple(blocks), values=tuple(tuple(_frozen_values(b)) for b in blocks))

    def forward(self, x, params, training):
        # training=False always: a frozen BatchNormalization uses its moving statistics
        # in Keras' fit too, and Dropout (which would not) is refused by check_frozen.
        for block, values in zip(self.blocks, self.values, strict=True):
            kwargs = {"training": False} if "training" in inspect.signature(block.call).parameters else {}
            x, _ = block.stateless_call([], [tf.constant(v) for v in values], x, **kwargs)
        return x, None

    def backward(self, dy, cache, params, need_dx):
        raise AssertionError("the frozen prefix is below the first trainable op and is never back-propagated")
