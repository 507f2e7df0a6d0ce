"""The TensorFlow reference: the same training step done by Keras itself.

Used by the converter to verify its output and by the parity tests. The
reference runs the original Keras layers under ``tf.GradientTape`` with a
Keras loss and a Keras optimizer, so it shares no code with the lowering.
Dropout is off in the reference (``training=False``); models with dropout
are verified through their deterministic twin.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from converter import losses
from converter.frozen import leaf_layers
from converter.optimizers import OptimizerConfig


@dataclass(frozen=True)
class Batch:
    x: np.ndarray
    y: np.ndarray
    sample_weight: np.ndarray


def keras_loss(loss: str, from_logits: bool, **options) -> keras.losses.Loss:
    """The Keras loss with Keras' default reduction: sum(w*l) / N."""
    return losses.keras_loss(loss, from_logits, **options)


def keras_optimizer(config: OptimizerConfig, learning_rate: float) -> keras.optimizers.Optimizer:
    return config.to_keras(learning_rate)


def _real_rows(batch: Batch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The batch without its padding (weight-0 rows): Keras' own last batch is just shorter.

    A batch of padding only is kept whole: its loss and gradients are 0 either way.
    """
    real = batch.sample_weight > 0
    if not real.any():
        return batch.x, batch.y, batch.sample_weight
    return batch.x[real], batch.y[real], batch.sample_weight[real]


def named_weights(model: keras.Model) -> dict[str, np.ndarray]:
    """Trainable weights as ``{"layer/kernel": array}``, named after the leaf layers (nested models flattened)."""
    return {
        f"{layer.name}/{v.name}": np.array(keras.ops.convert_to_numpy(v))
        for layer in leaf_layers(model)
        for v in layer.trainable_weights
    }


def reference_steps(
    model: keras.Model,
    loss: str,
    from_logits: bool,
    optimizer: OptimizerConfig,
    batches: list[Batch],
    learning_rate: float,
    mu: float = 0.0,
    loss_options: dict | None = None,
) -> tuple[list[float], dict[str, np.ndarray]]:
    """Run one Keras step per batch on a copy of ``model``.

    Returns the loss of every step and the weights after the last one.
    ``mu`` adds the FedProx term anchored at the starting weights.
    """
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    loss_fn = keras_loss(loss, from_logits, **(loss_options or {}))
    opt = keras_optimizer(optimizer, learning_rate)
    variables = clone.trainable_variables
    anchors = [tf.constant(keras.ops.convert_to_numpy(v)) for v in variables]

    @tf.function
    def step(x, y, w):
        with tf.GradientTape() as tape:
            value = loss_fn(y, clone(x, training=False), sample_weight=w)
            if clone.losses:  # Keras' loss includes the trainable weights' regularization penalties
                value = value + tf.add_n(clone.losses)
            prox = tf.add_n([tf.reduce_sum(tf.square(v - a)) for v, a in zip(variables, anchors, strict=True)])
            total = value + 0.5 * mu * prox
        opt.apply_gradients(zip(tape.gradient(total, variables), variables, strict=True))
        return value

    step_losses = [float(step(*_real_rows(b))) for b in batches]
    return step_losses, named_weights(clone)
