"""Turn a Keras model into a flat list of :mod:`converter.ops`.

Anything outside the supported set is refused here, with the layer's name
and the list of what is supported, so no half-working model is written.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import numpy as np

from converter import ops
from converter.errors import UnsupportedModelError


def _unsupported(layer: keras.layers.Layer, why: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"layer {layer.name!r} ({type(layer).__name__}): {why}. "
        f"litefed supports the layers {', '.join(SUPPORTED_LAYERS)} "
        f"with activations {', '.join(ops.ACTIVATIONS)}."
    )


def activation_name(layer: keras.layers.Layer, fn: Callable) -> str:
    name = getattr(fn, "__name__", type(fn).__name__)
    if name not in ops.ACTIVATIONS:
        raise _unsupported(layer, f"activation {name!r} is not supported")
    return name


def _check_plain(layer: keras.layers.Layer) -> None:
    """Refuse options that would change training in ways we do not lower."""
    for attr in ("kernel_regularizer", "bias_regularizer", "activity_regularizer"):
        if getattr(layer, attr, None) is not None:
            raise _unsupported(layer, f"{attr} is not supported; remove it")
    for attr in ("kernel_constraint", "bias_constraint"):
        if getattr(layer, attr, None) is not None:
            raise _unsupported(layer, f"{attr} is not supported; remove it")
    if getattr(layer, "data_format", "channels_last") != "channels_last":
        raise _unsupported(layer, "only data_format='channels_last' is supported")
    if getattr(layer, "lora_enabled", False):
        raise _unsupported(layer, "LoRA layers are not supported")


def _params(layer: keras.layers.Layer) -> list[ops.Param]:
    names = ["kernel", "bias"] if getattr(layer, "use_bias", False) else ["kernel"]
    values = [np.asarray(keras.ops.convert_to_numpy(v), np.float32) for v in layer.trainable_weights]
    if len(values) != len(names):
        raise _unsupported(layer, f"expected weights {names}, found {len(values)} tensors")
    return [ops.Param(f"{layer.name}/{n}", v) for n, v in zip(names, values, strict=True)]


def _with_activation(layer, op: ops.Op) -> list[ops.Op]:
    kind = activation_name(layer, layer.activation)
    return [op] if kind == "linear" else [op, ops.Activation(layer.name, kind=kind)]


def _lower_dense(layer) -> list[ops.Op]:
    if len(layer.input.shape) != 2:
        raise _unsupported(layer, "Dense is supported on (batch, features) inputs; add a Flatten")
    return _with_activation(layer, ops.Dense(layer.name, params=_params(layer)))


def _lower_conv(layer) -> list[ops.Op]:
    if tuple(layer.dilation_rate) != (1, 1) or layer.groups != 1:
        raise _unsupported(layer, "dilated or grouped convolutions are not supported")
    if layer.padding not in ("valid", "same"):
        raise _unsupported(layer, f"padding {layer.padding!r} is not supported")
    op = ops.Conv2D(layer.name, params=_params(layer), strides=tuple(layer.strides), padding=layer.padding)
    return _with_activation(layer, op)


def _lower_pool(layer, cls) -> list[ops.Op]:
    strides = tuple(layer.strides) if layer.strides is not None else tuple(layer.pool_size)
    return [cls(layer.name, pool=tuple(layer.pool_size), strides=strides, padding=layer.padding)]


def _lower_relu(layer) -> list[ops.Op]:
    if layer.max_value is not None or float(layer.negative_slope) != 0 or float(layer.threshold) != 0:
        raise _unsupported(layer, "only plain ReLU (no max_value, negative_slope, threshold)")
    return [ops.Activation(layer.name, kind="relu")]


def _lower_softmax(layer) -> list[ops.Op]:
    if layer.axis not in (-1, len(layer.input.shape) - 1):
        raise _unsupported(layer, "softmax is supported over the last axis only")
    return [ops.Activation(layer.name, kind="softmax")]


def _lower_dropout(layer) -> list[ops.Op]:
    if layer.noise_shape is not None:
        raise _unsupported(layer, "Dropout with noise_shape is not supported")
    return [ops.Dropout(layer.name, rate=float(layer.rate))]


def _lower_rescaling(layer) -> list[ops.Op]:
    scale = np.asarray(layer.scale, np.float32)
    offset = np.asarray(layer.offset, np.float32)
    return [ops.Rescale(layer.name, scale=scale, offset=offset)]


_LOWERINGS: dict[str, Callable[[keras.layers.Layer], list[ops.Op]]] = {
    "InputLayer": lambda layer: [],
    "Dense": _lower_dense,
    "Conv2D": _lower_conv,
    "MaxPooling2D": lambda layer: _lower_pool(layer, ops.MaxPool2D),
    "AveragePooling2D": lambda layer: _lower_pool(layer, ops.AvgPool2D),
    "Flatten": lambda layer: [ops.Reshape(layer.name, target=(-1,))],
    "Reshape": lambda layer: [ops.Reshape(layer.name, target=tuple(layer.target_shape))],
    "Dropout": _lower_dropout,
    "Rescaling": _lower_rescaling,
    "Activation": lambda layer: [ops.Activation(layer.name, kind=activation_name(layer, layer.activation))],
    "ReLU": _lower_relu,
    "Softmax": _lower_softmax,
}

SUPPORTED_LAYERS: tuple[str, ...] = tuple(_LOWERINGS)
"""The Keras layer types litefed lowers, read from the lowering table so the two cannot drift apart."""


def sequential_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """The model's layers in order, if it is a single chain; else a clear error."""
    if isinstance(model, keras.Sequential):
        return list(model.layers)
    layers = [layer for layer in model.layers if type(layer).__name__ != "InputLayer"]
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise UnsupportedModelError("only models with one input and one output are supported")
    previous = model.inputs[0]
    for layer in layers:
        if layer.input is not previous:
            raise UnsupportedModelError(
                f"layer {layer.name!r} does not simply follow the previous layer; "
                "litefed supports sequential chains of layers (no branches or skips)"
            )
        previous = layer.output
    return layers


def lower_model(model: keras.Model) -> list[ops.Op]:
    """Lower every layer of ``model`` or raise :class:`UnsupportedModelError`."""
    result: list[ops.Op] = []
    for layer in sequential_layers(model):
        kind = type(layer).__name__
        if kind not in _LOWERINGS:
            raise _unsupported(layer, "this layer type is not supported")
        _check_plain(layer)
        result.extend(_LOWERINGS[kind](layer))
    if not any(op.params for op in result):
        raise UnsupportedModelError("the model has no trainable Dense or Conv2D layer")
    return result
