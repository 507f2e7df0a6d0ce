"""Losses: per-example value, gradient w.r.t. the model output, accuracy.

The training loss is the sample-weighted mean ``sum(w*l) / sum(w)``, which
equals Keras' mean when all weights are 1 and lets a padded last batch use
weight 0 without biasing the step.

When the model ends in softmax (sigmoid) and the loss is cross-entropy on
probabilities, the activation is fused into the loss and the gradient is
taken w.r.t. the logits (``softmax - onehot``), as Keras itself does.
"""

from __future__ import annotations

from dataclasses import dataclass

import tensorflow as tf

from converter.errors import UnsupportedModelError

LOSSES = ("sparse_categorical_crossentropy", "binary_crossentropy", "mean_squared_error")
_ALIASES = {"mse": "mean_squared_error", "sce": "sparse_categorical_crossentropy", "bce": "binary_crossentropy"}
_EPSILON = 1e-7  # keras.config.epsilon()


def canonical_loss(name: str) -> str:
    name = _ALIASES.get(name, name)
    if name not in LOSSES:
        raise UnsupportedModelError(f"loss {name!r} is not supported; choose one of {', '.join(LOSSES)}")
    return name


@dataclass(frozen=True)
class Head:
    """The loss attached to the model output.

    ``on_logits`` is True when the graph's last op produces logits: either
    the loss was declared ``from_logits`` or a final softmax/sigmoid was fused.
    """

    loss: str
    on_logits: bool
    num_outputs: int

    @property
    def task(self) -> str:
        return {
            "sparse_categorical_crossentropy": "multiclass",
            "binary_crossentropy": "binary",
            "mean_squared_error": "regression",
        }[self.loss]

    @property
    def label_dtype(self) -> tf.DType:
        return tf.int32 if self.task == "multiclass" else tf.float32

    def label_shape(self, batch: int) -> list[int]:
        return [batch] if self.task == "multiclass" else [batch, self.num_outputs]

    def predict(self, out: tf.Tensor) -> tf.Tensor:
        """Probabilities (classifiers) or outputs (regression) from the last op."""
        if not self.on_logits:
            return out
        return tf.nn.softmax(out) if self.task == "multiclass" else tf.sigmoid(out)

    def per_example(self, out: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        """Loss of each example, shape ``[batch]``."""
        if self.task == "multiclass":
            onehot = tf.one_hot(y, self.num_outputs, dtype=out.dtype)
            if self.on_logits:
                return tf.reduce_logsumexp(out, axis=-1) - tf.reduce_sum(out * onehot, axis=-1)
            p = tf.clip_by_value(tf.reduce_sum(out * onehot, axis=-1), _EPSILON, 1.0 - _EPSILON)
            return -tf.math.log(p)
        if self.task == "binary":
            if self.on_logits:
                terms = tf.nn.relu(out) - out * y + tf.math.log(1.0 + tf.exp(-tf.abs(out)))
            else:
                p = tf.clip_by_value(out, _EPSILON, 1.0 - _EPSILON)
                terms = -(y * tf.math.log(p) + (1.0 - y) * tf.math.log(1.0 - p))
            return tf.reduce_mean(terms, axis=-1)
        return tf.reduce_mean(tf.square(out - y), axis=-1)

    def output_grad(self, out: tf.Tensor, y: tf.Tensor, scale: tf.Tensor) -> tf.Tensor:
        """Gradient of ``sum(scale * per_example)`` w.r.t. ``out``; ``scale`` is ``[batch]``."""
        scale = scale[:, None]
        if self.task == "multiclass":
            onehot = tf.one_hot(y, self.num_outputs, dtype=out.dtype)
            if self.on_logits:
                return (tf.nn.softmax(out) - onehot) * scale
            p = tf.reduce_sum(out * onehot, axis=-1, keepdims=True)
            inside = tf.cast((p > _EPSILON) & (p < 1.0 - _EPSILON), out.dtype)
            return -onehot * inside / tf.maximum(p, _EPSILON) * scale
        k = float(self.num_outputs)
        if self.task == "binary":
            if self.on_logits:
                return (tf.sigmoid(out) - y) / k * scale
            inside = tf.cast((out > _EPSILON) & (out < 1.0 - _EPSILON), out.dtype)
            p = tf.clip_by_value(out, _EPSILON, 1.0 - _EPSILON)
            return inside * (p - y) / (p * (1.0 - p)) / k * scale
        return 2.0 * (out - y) / k * scale

    def correct(self, out: tf.Tensor, y: tf.Tensor) -> tf.Tensor | None:
        """Per-example correctness in [0, 1] for classifiers, None for regression."""
        if self.task == "multiclass":
            return tf.cast(tf.equal(tf.argmax(out, axis=-1, output_type=tf.int32), y), out.dtype)
        if self.task == "binary":
            threshold = 0.0 if self.on_logits else 0.5
            hits = tf.equal(out > threshold, y > 0.5)
            return tf.reduce_mean(tf.cast(hits, out.dtype), axis=-1)
        return None
