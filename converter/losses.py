"""Losses: per-example value, gradient w.r.t. the model output, accuracy.

The training loss is Keras' ``sum(w*l) / N`` (its default reduction,
``sum_over_batch_size``), so a sample or class weight scales an example's
step exactly as in ``model.fit``. ``N`` counts the examples of the batch
with a weight above 0: the padding that fills a partial last batch (weight
0) does not count, as Keras' own last batch is just shorter. A real example
given weight 0 (a class weight of 0) is not counted either, where Keras
counts it; that is the one case in which the step differs from Keras'.

When the model ends in softmax (sigmoid) and the loss is cross-entropy on
probabilities, the activation is fused into the loss and the gradient is
taken w.r.t. the logits (``softmax - onehot``), as Keras itself does.

Labels: class ids (int32 ``[B]``) for sparse categorical cross-entropy,
float32 ``[B, K]`` for every other loss (one-hot or soft class labels for
categorical cross-entropy, 0/1 targets for binary, values for regression).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import tensorflow as tf

from converter.errors import UnsupportedModelError

SCE = "sparse_categorical_crossentropy"
CCE = "categorical_crossentropy"
BCE = "binary_crossentropy"
LOSSES = (SCE, CCE, BCE, "mean_squared_error", "mean_absolute_error", "huber")
_ALIASES = {
    "mse": "mean_squared_error",
    "mae": "mean_absolute_error",
    "sce": SCE,
    "cce": CCE,
    "bce": BCE,
    "huber_loss": "huber",
}
_TASKS = {SCE: "multiclass", CCE: "multiclass", BCE: "binary"}  # the rest are regression
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
    ``label_smoothing`` is Keras' (categorical and binary cross-entropy),
    ``delta`` Huber's.
    """

    loss: str
    on_logits: bool
    num_outputs: int
    label_smoothing: float = 0.0
    delta: float = 1.0

    def __post_init__(self) -> None:
        if self.loss in (SCE, CCE) and self.num_outputs < 2:
            raise UnsupportedModelError(f"{self.loss} needs at least 2 outputs, got {self.num_outputs}")
        if self.label_smoothing and self.loss not in (CCE, BCE):
            raise UnsupportedModelError(f"label smoothing applies to {CCE} and {BCE} (as in Keras), not {self.loss}")
        if not 0.0 <= self.label_smoothing <= 1.0:
            raise UnsupportedModelError(f"label smoothing must be in [0, 1], got {self.label_smoothing}")
        if not self.delta > 0:
            raise UnsupportedModelError(f"Huber delta must be > 0, got {self.delta}")

    @property
    def task(self) -> str:
        return _TASKS.get(self.loss, "regression")

    @property
    def options(self) -> dict[str, Any]:
        """The loss's settings besides its name that differ from Keras' defaults (for the manifest)."""
        out: dict[str, Any] = {"label_smoothing": self.label_smoothing} if self.label_smoothing else {}
        return out | ({"delta": self.delta} if self.loss == "huber" and self.delta != 1.0 else {})

    @property
    def label_dtype(self) -> tf.DType:
        return tf.int32 if self.loss == SCE else tf.float32

    def label_shape(self, batch: int) -> list[int]:
        return [batch] if self.loss == SCE else [batch, self.num_outputs]

    def batch_scale(self, sample_weight: tf.Tensor) -> tf.Tensor:
        """Per-example factor of the training loss, ``w / N`` (see the module docstring)."""
        real = tf.reduce_sum(tf.cast(sample_weight > 0.0, sample_weight.dtype))
        return sample_weight / tf.maximum(real, 1.0)  # an all-padding batch gives 0, not 0/0

    def predict(self, out: tf.Tensor) -> tf.Tensor:
        """Probabilities (classifiers) or outputs (regression) from the last op."""
        if not self.on_logits:
            return out
        return tf.nn.softmax(out) if self.task == "multiclass" else tf.sigmoid(out)

    def _targets(self, out: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        """Labels as ``[batch, K]`` targets, smoothed as Keras smooths them."""
        if self.loss == SCE:
            return tf.one_hot(y, self.num_outputs, dtype=out.dtype)
        if not self.label_smoothing:
            return y
        share = 1.0 / self.num_outputs if self.loss == CCE else 0.5
        return y * (1.0 - self.label_smoothing) + share * self.label_smoothing

    def per_example(self, out: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        """Loss of each example, shape ``[batch]``."""
        if self.task == "multiclass":
            return self._categorical(out, self._targets(out, y))
        if self.task == "binary":
            t = self._targets(out, y)
            if self.on_logits:
                terms = tf.nn.relu(out) - out * t + tf.math.log(1.0 + tf.exp(-tf.abs(out)))
            else:
                p = tf.clip_by_value(out, _EPSILON, 1.0 - _EPSILON)
                terms = -(t * tf.math.log(p) + (1.0 - t) * tf.math.log(1.0 - p))
            return tf.reduce_mean(terms, axis=-1)
        error = out - y
        if self.loss == "mean_absolute_error":
            return tf.reduce_mean(tf.abs(error), axis=-1)
        if self.loss == "huber":
            small = tf.abs(error) <= self.delta
            linear = self.delta * tf.abs(error) - 0.5 * self.delta**2
            return tf.reduce_mean(tf.where(small, 0.5 * tf.square(error), linear), axis=-1)
        return tf.reduce_mean(tf.square(error), axis=-1)

    def _categorical(self, out: tf.Tensor, t: tf.Tensor) -> tf.Tensor:
        if self.on_logits:
            return tf.reduce_logsumexp(out, axis=-1) * tf.reduce_sum(t, axis=-1) - tf.reduce_sum(out * t, axis=-1)
        if self.loss == SCE:  # Keras' sparse loss clips the probability of the label, no renormalisation
            p = tf.clip_by_value(tf.reduce_sum(out * t, axis=-1), _EPSILON, 1.0 - _EPSILON)
            return -tf.math.log(p)
        q = tf.clip_by_value(out / tf.reduce_sum(out, axis=-1, keepdims=True), _EPSILON, 1.0 - _EPSILON)
        return -tf.reduce_sum(t * tf.math.log(q), axis=-1)

    def output_grad(self, out: tf.Tensor, y: tf.Tensor, scale: tf.Tensor) -> tf.Tensor:
        """Gradient of ``sum(scale * per_example)`` w.r.t. ``out``; ``scale`` is ``[batch]``."""
        scale = scale[:, None]
        if self.task == "multiclass":
            return self._categorical_grad(out, self._targets(out, y)) * scale
        k = float(self.num_outputs)
        if self.task == "binary":
            t = self._targets(out, y)
            if self.on_logits:
                return (tf.sigmoid(out) - t) / k * scale
            inside = tf.cast((out > _EPSILON) & (out < 1.0 - _EPSILON), out.dtype)
            p = tf.clip_by_value(out, _EPSILON, 1.0 - _EPSILON)
            return inside * (p - t) / (p * (1.0 - p)) / k * scale
        error = out - y
        if self.loss == "mean_absolute_error":
            return tf.sign(error) / k * scale
        if self.loss == "huber":
            return tf.clip_by_value(error, -self.delta, self.delta) / k * scale
        return 2.0 * error / k * scale

    def _categorical_grad(self, out: tf.Tensor, t: tf.Tensor) -> tf.Tensor:
        if self.on_logits:  # softmax * sum(t) - t: soft (smoothed) targets need not sum to exactly 1
            return tf.nn.softmax(out) * tf.reduce_sum(t, axis=-1, keepdims=True) - t
        if self.loss == SCE:
            p = tf.reduce_sum(out * t, axis=-1, keepdims=True)
            inside = tf.cast((p > _EPSILON) & (p < 1.0 - _EPSILON), out.dtype)
            return -t * inside / tf.maximum(p, _EPSILON)
        # l = -sum(t * log(clip(q))), q = out / S: dl/dout_j = (sum_i a_i q_i - a_j) / S, a = t * inside / q.
        total = tf.reduce_sum(out, axis=-1, keepdims=True)
        q = out / total
        inside = tf.cast((q > _EPSILON) & (q < 1.0 - _EPSILON), out.dtype)
        a = t * inside / tf.clip_by_value(q, _EPSILON, 1.0 - _EPSILON)
        return (tf.reduce_sum(a * q, axis=-1, keepdims=True) - a) / total

    def correct(self, out: tf.Tensor, y: tf.Tensor) -> tf.Tensor | None:
        """Per-example correctness in [0, 1] for classifiers, None for regression."""
        if self.task == "multiclass":
            labels = y if self.loss == SCE else tf.argmax(y, axis=-1, output_type=tf.int32)
            return tf.cast(tf.equal(tf.argmax(out, axis=-1, output_type=tf.int32), labels), out.dtype)
        if self.task == "binary":
            threshold = 0.0 if self.on_logits else 0.5
            hits = tf.equal(out > threshold, y > 0.5)
            return tf.reduce_mean(tf.cast(hits, out.dtype), axis=-1)
        return None


def keras_loss(
    name: str,
    from_logits: bool,
    label_smoothing: float = 0.0,
    delta: float = 1.0,
    reduction: str = "sum_over_batch_size",
):
    """The Keras loss a :class:`Head` computes, by default with Keras' default reduction (the reference)."""
    import keras

    losses = keras.losses
    if name == SCE:
        return losses.SparseCategoricalCrossentropy(from_logits=from_logits, reduction=reduction)
    if name == CCE:
        return losses.CategoricalCrossentropy(from_logits, label_smoothing, reduction=reduction)
    if name == BCE:
        return losses.BinaryCrossentropy(from_logits, label_smoothing, reduction=reduction)
    if name == "huber":
        return losses.Huber(delta, reduction=reduction)
    plain = {"mean_squared_error": losses.MeanSquaredError, "mean_absolute_error": losses.MeanAbsoluteError}
    return plain[name](reduction=reduction)
