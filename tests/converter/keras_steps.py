"""Keras' own training steps (``train_on_batch`` / ``fit``) beside the converted model's in LiteRT.

Unlike :mod:`converter.reference` this goes through a compiled Keras model,
so the loss reduction, sample weights, clipping and weight decay are Keras'
own code paths, not a re-statement of them.
"""

from __future__ import annotations

import keras
import numpy as np

from converter import ConvertConfig, convert_model
from converter.reference import Batch, named_weights
from edge_client.runtime import TrainableModel
from edge_client.weights import NamedArray

L = keras.layers


def compiled(layers, input_shape, loss, optimizer, seed: int = 0, name: str = "model") -> keras.Model:
    """A Sequential model compiled without XLA (its float rounding would differ from LiteRT's more)."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input(input_shape), *layers], name=name)
    model.compile(loss=loss, optimizer=optimizer, jit_compile=False)
    return model


def keras_twin(model: keras.Model, optimizer: keras.optimizers.Optimizer | None = None) -> keras.Model:
    """A copy of ``model`` with the same weights and a fresh copy of ``optimizer`` (default: the compiled one)."""
    twin = keras.models.clone_model(model)
    twin.set_weights(model.get_weights())
    template = optimizer or model.optimizer
    twin.compile(loss=model.loss, optimizer=type(template).from_config(template.get_config()), jit_compile=False)
    return twin


def keras_train_on_batch(
    model: keras.Model, batches: list[Batch], optimizer: keras.optimizers.Optimizer | None = None
) -> tuple[list[float], dict[str, np.ndarray]]:
    """One ``train_on_batch`` per batch on a twin of ``model``; padding rows (weight 0) are left out."""
    twin = keras_twin(model, optimizer)
    losses = []
    for b in batches:
        real = b.sample_weight > 0
        losses.append(float(twin.train_on_batch(b.x[real], b.y[real], sample_weight=b.sample_weight[real])))
    return losses, named_weights(twin)


def convert(model: keras.Model, batch_size: int, **config) -> TrainableModel:
    """Convert ``model`` without verification and load it in LiteRT."""
    converted = convert_model(model, ConvertConfig(batch_size=batch_size, verify=False, **config))
    return TrainableModel(converted.tflite, converted.manifest)


def litert_steps(runtime: TrainableModel, batches: list[Batch]) -> tuple[list[float], dict[str, np.ndarray]]:
    losses = [runtime.train_step(b.x, b.y, b.sample_weight).loss for b in batches]
    return losses, {w.name: w.array for w in runtime.get_weights()}


def padded(x: np.ndarray, y: np.ndarray, w: np.ndarray, batch_size: int) -> list[Batch]:
    """``(x, y, w)`` in order as full batches, the last one padded with weight-0 copies of row 0."""
    batches = []
    for start in range(0, len(x), batch_size):
        idx = np.arange(start, start + batch_size)
        real = idx < len(x)
        idx = np.where(real, idx, 0)
        batches.append(Batch(x[idx], y[idx], np.where(real, w[idx], 0.0).astype(np.float32)))
    return batches


def roundtrip_is_exact(runtime: TrainableModel) -> bool:
    """get_weights -> set_weights -> get_weights returns the same bytes (optimizer state included)."""
    before = runtime.get_weights(include_optimizer=True)
    runtime.set_weights([NamedArray(n, a.copy()) for n, a in before])
    after = runtime.get_weights(include_optimizer=True)
    return all(np.array_equal(a, b) for (_, a), (_, b) in zip(before, after, strict=True))
