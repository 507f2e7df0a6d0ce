"""Turn a Keras model into a flat list of :mod:`converter.ops`.

Anything outside the supported set is refused here, with the layer's name
and the list of what is supported, so no half-working model is written.

Transfer learning: the frozen part below the lowest trainable layer becomes one
:class:`converter.frozen.FrozenPrefix` (inference only, constant weights);
frozen layers above it become :class:`converter.ops.Frozen` ops (constant
weights, input gradient only); trainable nested models are flattened.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import numpy as np

from converter import activations, normalization, ops, recurrent, spatial
from converter.activations import with_activation
from converter.errors import UnsupportedModelError
from converter.frozen import FROZEN_LAYERS, FrozenPrefix, leaf_layers
from converter.layers import check_plain, unsupported, with_params


def _lower_dense(layer) -> list[ops.Op]:
    if len(layer.input.shape) != 2:
        raise unsupported(layer, "Dense is supported on (batch, features) inputs; add a Flatten")
    return with_activation(layer, with_params(layer, ops.Dense(layer.name)))


def _lower_dropout(layer) -> list[ops.Op]:
    if layer.noise_shape is not None:
        raise unsupported(layer, "Dropout with noise_shape is not supported")
    return [ops.Dropout(layer.name, rate=float(layer.rate))]


def _lower_rescaling(layer) -> list[ops.Op]:
    scale = np.asarray(layer.scale, np.float32)
    offset = np.asarray(layer.offset, np.float32)
    return [ops.Rescale(layer.name, scale=scale, offset=offset)]


_LOWERINGS: dict[str, Callable[[keras.layers.Layer], list[ops.Op]]] = {
    "InputLayer": lambda layer: [],
    "Dense": _lower_dense,
    "Flatten": lambda layer: [ops.Reshape(layer.name, target=(-1,))],
    "Reshape": lambda layer: [ops.Reshape(layer.name, target=tuple(layer.target_shape))],
    "Dropout": _lower_dropout,
    "Rescaling": _lower_rescaling,
    **spatial.LOWERINGS,
    **activations.LOWERINGS,
    **normalization.LOWERINGS,
    **recurrent.LOWERINGS,
}

SUPPORTED_LAYERS: tuple[str, ...] = tuple(_LOWERINGS)
"""The Keras layer types litefed lowers, read from the lowering table so the two cannot drift apart."""


def lower_model(model: keras.Model) -> list[ops.Op]:
    """Lower every layer of ``model`` or raise :class:`UnsupportedModelError`.

    The layers from the model's input to the lowest trainable layer become
    one :class:`FrozenPrefix` when they hold frozen weights (transfer learning);
    the layers above it are lowered one by one, frozen ones with constant weights.
    """
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise UnsupportedModelError("only models with one input and one output are supported")
    blocks = chain_blocks(model)
    first = next((i for i, b in enumerate(blocks) if _is_trainable_layer(b)), None)
    if first is None:
        frozen = " (all its layers are frozen: set trainable=True on the layers to train)" if model.weights else ""
        raise UnsupportedModelError(f"the model has no trainable Dense or Conv2D layer{frozen}")
    frozen_top = max((i for i in range(first) if _is_frozen_block(blocks[i])), default=-1)
    while frozen_top >= 0 and frozen_top + 1 < first and _runs_frozen(blocks[frozen_top + 1]):
        frozen_top += 1  # e.g. the ReLU6 and pooling on top of a base: fused and run as inference too
    result: list[ops.Op] = [FrozenPrefix.of(blocks[: frozen_top + 1])] if frozen_top >= 0 else []
    for block in blocks[frozen_top + 1 :]:
        for layer in _frozen_chain(block) if isinstance(block, keras.Model) else [block]:
            result.extend(_lower_layer(layer))
    if not any(op.params for op in result):
        raise UnsupportedModelError("the model has no trainable Dense or Conv2D layer")
    return result


def _lower_layer(layer: keras.layers.Layer) -> list[ops.Op]:
    kind = type(layer).__name__
    if kind not in _LOWERINGS:
        raise unsupported(layer, "this layer type is not supported")
    check_plain(layer)
    return _LOWERINGS[kind](layer)


def _is_trainable_layer(block: keras.layers.Layer) -> bool:
    return not isinstance(block, keras.Model) and bool(block.trainable_weights)


def _is_frozen_block(block: keras.layers.Layer) -> bool:
    """A frozen model or sub-graph, or a layer whose weights are all frozen."""
    return isinstance(block, keras.Model) or bool(block.weights)


def _runs_frozen(layer: keras.layers.Layer) -> bool:
    """A weightless layer the frozen part can take in (Dropout stays out: it must train as Dropout)."""
    kind = type(layer).__name__
    return not isinstance(layer, keras.Model) and kind in FROZEN_LAYERS and kind != "Dropout"


def _frozen_chain(block: keras.Model) -> list[keras.layers.Layer]:
    """A frozen nested model above the lowest trainable layer: its layers, lowered with constant weights."""
    layers: list[keras.layers.Layer] = []
    for layer in chain_blocks(block):
        if layer.name.endswith("_frozen_part"):  # cut out of a functional graph by _functional_chain
            raise UnsupportedModelError(
                f"the frozen model {block.name!r} branches and sits above the lowest trainable layer, which "
                "would need its backward pass; litefed supports branches only below the lowest trainable layer"
            )
        layers.extend(_frozen_chain(layer) if isinstance(layer, keras.Model) else [layer])
    return layers


def chain_blocks(model: keras.Model) -> list[keras.layers.Layer]:
    """The model as a chain of blocks from its input to its output.

    A block is a layer; a frozen nested model (kept whole); or a frozen
    ``keras.Model`` cut out of a functional graph below the chain, where
    branches merge. Trainable nested models are flattened into their layers.
    Refuses trainable layers inside branches.
    """
    if isinstance(model, keras.Sequential):
        bottom, layers = None, [layer for layer in model.layers if type(layer).__name__ != "InputLayer"]
    else:
        bottom, layers = _functional_chain(model)
    blocks: list[keras.layers.Layer] = [bottom] if bottom is not None else []
    for layer in layers:
        if isinstance(layer, keras.Model) and layer.trainable_weights:
            blocks.extend(chain_blocks(layer))
        else:
            blocks.append(layer)
    return blocks


def _functional_chain(model: keras.Model) -> tuple[keras.Model | None, list[keras.layers.Layer]]:
    """Walk back from the output through single-input layers; what is left below is one frozen block."""
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise UnsupportedModelError(f"model {model.name!r}: only models with one input and one output are supported")
    layers: list[keras.layers.Layer] = []
    tensor = model.outputs[0]
    while tensor is not model.inputs[0]:
        layer, node = _producer(tensor)
        if len(node.input_tensors) != 1 or len(layer._inbound_nodes) != 1:
            break
        layers.insert(0, layer)
        tensor = node.input_tensors[0]
    if tensor is model.inputs[0]:
        return None, layers
    bottom = keras.Model(model.inputs, tensor, name=f"{model.name}_frozen_part")  # the name _frozen_chain checks
    if bottom.trainable_weights:
        merge = _producer(tensor)[0]
        trainable = sorted({layer.name for layer in leaf_layers(bottom) if layer.trainable_weights})
        raise UnsupportedModelError(
            f"layer {merge.name!r} ({type(merge).__name__}) joins branches (or reuses a layer) below the trainable "
            f"layers {', '.join(trainable)}; litefed supports sequential chains of trainable layers, with branches, "
            "skips and merges only in a frozen part below them (freeze those layers: trainable=False)"
        )
    return bottom, layers


def _producer(tensor) -> tuple[keras.layers.Layer, Any]:
    """The layer that computed a symbolic tensor, and the call (node) that did."""
    history = tensor._keras_history
    return history.operation, history.operation._inbound_nodes[history.node_index]
