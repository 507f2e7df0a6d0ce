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

from converter.optimizers import OptimizerConfig

_LOSS_CLASSES = {
    "sparse_categorical_crossentropy": keras.losses.SparseCategoricalCrossentropy,
    "binary_crossentropy": keras.losses.BinaryCrossentropy,
}


@dataclass(frozen=True)
class Batch:
    x: np.ndarray
    y: np.ndarray
    sample_weight: np.ndarray


def keras_loss(loss: str, from_logits: bool) -> keras.losses.Loss:
    """The Keras loss with our reduction: sum(w*l) / sum(w)."""
    if loss == "mean_squared_error":
        return keras.losses.MeanSquaredError(reduction="mean_with_sample_weight")
    return _LOSS_CLASSES[loss](from_logits=from_logits, reduction="mean_with_sample_weight")


def keras_optimizer(config: OptimizerConfig, learning_rate: float) -> keras.optimizers.Optimizer:
    if config.name == "adam":
        return keras.optimizers.Adam(learning_rate, config.beta_1, config.beta_2, config.epsilon)
    return keras.optimizers.SGD(learning_rate, momentum=config.momentum, nesterov=config.nesterov)


def named_weights(model: keras.Model) -> dict[str, np.ndarray]:
    """Trainable weights as ``{"layer/kernel": array}``."""
    return {
        f"{layer.name}/{v.name}": np.array(keras.ops.convert_to_numpy(v))
        for layer in model.layers
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
) -> tuple[list[float], dict[str, np.ndarray]]:
    """Run one Keras step per batch on a copy of ``model``.

    Returns the loss of every step and the weights after the last one.
    ``mu`` adds the FedProx term anchored at the starting weights.
    """
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    loss_fn = keras_loss(loss, from_logits)
    opt = keras_optimizer(optimizer, learning_rate)
    variables = clone.trainable_variables
    anchors = [tf.constant(keras.ops.convert_to_numpy(v)) for v in variables]

    @tf.function
    def step(x, y, w):
        with tf.GradientTape() as tape:
            value = loss_fn(y, clone(x, training=False), sample_weight=w)
            prox = tf.add_n([tf.reduce_sum(tf.square(v - a)) for v, a in zip(variables, anchors, strict=True)])
            total = value + 0.5 * mu * prox
        opt.apply_gradients(zip(tape.gradient(total, variables), variables, strict=True))
        return value

    losses = [float(step(b.x, b.y, b.sample_weight)) for b in batches]
    return losses, named_weights(clone)
