"""Reading a Keras layer for its lowering: its weights, its refusals.

Shared by the lowering modules (:mod:`converter.lowering` and the per-family
modules whose ``LOWERINGS`` tables it merges).
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np

from converter import ops, regularizers
from converter.errors import UnsupportedModelError


def unsupported(layer: keras.layers.Layer, why: str) -> UnsupportedModelError:
    """The refusal of ``layer``: its name and type, why, and everything litefed supports."""
    from converter.activations import ACTIVATIONS  # late: the lowering tables import this module
    from converter.lowering import SUPPORTED_LAYERS

    return UnsupportedModelError(
        f"layer {layer.name!r} ({type(layer).__name__}): {why}. "
        f"litefed supports the layers {', '.join(SUPPORTED_LAYERS)} "
        f"with activations {', '.join(ACTIVATIONS)}."
    )


def check_plain(layer: keras.layers.Layer) -> None:
    """Refuse options that would change training in ways we do not lower."""
    regularizers.check_supported(layer)
    for attr in ("kernel_constraint", "bias_constraint"):
        if getattr(layer, attr, None) is not None:
            raise unsupported(layer, f"{attr} is not supported; remove it")
    if getattr(layer, "data_format", "channels_last") != "channels_last":
        raise unsupported(layer, "only data_format='channels_last' is supported")
    if getattr(layer, "lora_enabled", False):
        raise unsupported(layer, "LoRA layers are not supported")


def weight_values(layer: keras.layers.Layer) -> list[np.ndarray]:
    """The layer's weights (trainable or not) as float32 arrays, in ``layer.weights`` order."""
    return [np.asarray(keras.ops.convert_to_numpy(v), np.float32) for v in layer.weights]


def params_of(layer: keras.layers.Layer, names: list[str] | None = None) -> list[ops.Param]:
    """The layer's weights as named params: ``kernel`` (and ``bias`` with ``use_bias``) unless ``names`` are given."""
    if names is None:
        names = ["kernel", "bias"] if getattr(layer, "use_bias", False) else ["kernel"]
    values = weight_values(layer)
    if len(values) != len(names):
        raise unsupported(layer, f"expected weights {names}, found {len(values)} tensors")
    return [
        ops.Param(f"{layer.name}/{n}", v, regularizer=regularizers.regularizer_of(layer, n))
        for n, v in zip(names, values, strict=True)
    ]


def with_params(layer: keras.layers.Layer, op: ops.Op, names: list[str] | None = None) -> ops.Op:
    """``op`` training the layer's weights, or, for a frozen layer, holding them as constants."""
    params = params_of(layer, names)  # checks the weights are what the op expects
    if layer.trainable_weights:
        return dataclasses.replace(op, params=params)
    return ops.Frozen(layer.name, inner=op, values=tuple(p.initial for p in params))
