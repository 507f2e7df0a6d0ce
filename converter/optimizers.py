"""Optimizer update rules written out as plain tensor arithmetic.

They reproduce Keras 3's SGD (with momentum and Nesterov), Adam, AdamW,
RMSprop and Adagrad exactly, with Keras' gradient clipping (``clipnorm``,
``global_clipnorm``, ``clipvalue``) and decoupled weight decay, in Keras'
order: clip the gradients, decay the weights, then the update rule. A step
in the converted model therefore matches ``model.train_on_batch``. The
learning rate is an input of ``train``, so the coordinator can change it
every round without re-converting the model.

Optimizer state starts at zero (``set_weights`` with the trainable tensors
only resets it so, at the start of every round). Adagrad's accumulator
starts at ``initial_accumulator_value`` in Keras, so its slot holds the sum
of squared gradients *without* that initial value: zero is a fresh start.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import tensorflow as tf

from converter.errors import UnsupportedModelError

OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop", "adagrad")
_ADAMW_WEIGHT_DECAY = 0.004  # keras.optimizers.AdamW's default


@dataclass(frozen=True)
class OptimizerConfig:
    """Optimizer name and hyper-parameters, as recorded in the manifest.

    Fields an optimizer does not use are ignored by it: ``momentum`` is
    SGD's and RMSprop's, ``beta_*`` Adam's, ``rho``/``centered`` RMSprop's,
    ``initial_accumulator_value`` Adagrad's. ``weight_decay`` None means
    Keras' default (0.004 for AdamW, none otherwise). At most one of the
    three clipping options may be set, as in Keras.
    """

    name: str = "sgd"
    learning_rate: float = 0.01
    momentum: float = 0.0
    nesterov: bool = False
    beta_1: float = 0.9
    beta_2: float = 0.999
    epsilon: float = 1e-7
    rho: float = 0.9
    centered: bool = False
    initial_accumulator_value: float = 0.1
    weight_decay: float | None = None
    clipnorm: float | None = None
    clipvalue: float | None = None
    global_clipnorm: float | None = None

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise UnsupportedModelError(
                f"optimizer {self.name!r} is not supported; choose one of {', '.join(OPTIMIZERS)}"
            )
        if not self.learning_rate > 0:
            raise UnsupportedModelError(f"learning rate must be > 0, got {self.learning_rate}")
        if not 0 <= self.momentum < 1:
            raise UnsupportedModelError(f"momentum must be in [0, 1), got {self.momentum}")
        if not 0 <= self.rho < 1:
            raise UnsupportedModelError(f"rho must be in [0, 1), got {self.rho}")
        if self.initial_accumulator_value < 0:
            raise UnsupportedModelError(f"initial_accumulator_value must be >= 0, got {self.initial_accumulator_value}")
        if self.decay < 0:
            raise UnsupportedModelError(f"weight decay must be >= 0, got {self.decay}")
        clips = {k: v for k, v in self.clipping.items() if v is not None}
        if len(clips) > 1:
            raise UnsupportedModelError(f"set at most one of clipnorm, clipvalue and global_clipnorm, got {clips}")
        if any(not v > 0 for v in clips.values()):
            raise UnsupportedModelError(f"gradient clipping must be > 0, got {clips}")

    @property
    def decay(self) -> float:
        """The decoupled weight decay actually applied (``w -= lr * decay * w``)."""
        if self.weight_decay is None:
            return _ADAMW_WEIGHT_DECAY if self.name == "adamw" else 0.0
        return self.weight_decay

    @property
    def clipping(self) -> dict[str, float | None]:
        return {"clipnorm": self.clipnorm, "clipvalue": self.clipvalue, "global_clipnorm": self.global_clipnorm}

    def to_json(self) -> dict[str, Any]:
        """The manifest's ``optimizer``: the rule's own hyper-parameters, then decay and clipping if set."""
        out: dict[str, Any] = {"name": self.name, "learning_rate": self.learning_rate}
        if self.name == "sgd":
            out.update(momentum=self.momentum, nesterov=self.nesterov)
        elif self.name in ("adam", "adamw"):
            out.update(beta_1=self.beta_1, beta_2=self.beta_2, epsilon=self.epsilon)
        elif self.name == "rmsprop":
            out.update(rho=self.rho, momentum=self.momentum, epsilon=self.epsilon, centered=self.centered)
        else:
            out.update(initial_accumulator_value=self.initial_accumulator_value, epsilon=self.epsilon)
        if self.decay or self.name == "adamw":
            out["weight_decay"] = self.decay
        out.update({k: v for k, v in self.clipping.items() if v is not None})
        return out

    def to_keras(self, learning_rate: float | None = None):
        """The equivalent Keras optimizer (the reference the converted step is checked against)."""
        import keras  # the converter's only Keras use here; the update rules need TensorFlow alone

        lr = self.learning_rate if learning_rate is None else learning_rate
        common: dict[str, Any] = {k: v for k, v in self.clipping.items() if v is not None}
        if self.name != "adamw":
            common["weight_decay"] = self.decay or None
        if self.name == "sgd":
            return keras.optimizers.SGD(lr, momentum=self.momentum, nesterov=self.nesterov, **common)
        if self.name == "adam":
            return keras.optimizers.Adam(lr, self.beta_1, self.beta_2, self.epsilon, **common)
        if self.name == "adamw":
            return keras.optimizers.AdamW(lr, self.decay, self.beta_1, self.beta_2, self.epsilon, **common)
        if self.name == "rmsprop":
            return keras.optimizers.RMSprop(lr, self.rho, self.momentum, self.epsilon, self.centered, **common)
        return keras.optimizers.Adagrad(lr, self.initial_accumulator_value, self.epsilon, **common)

    @property
    def slots(self) -> tuple[str, ...]:
        """Per-parameter state tensors, named ``optimizer/<slot>/<param>``."""
        if self.name in ("adam", "adamw"):
            return ("m", "v")
        if self.name == "rmsprop":
            return ("velocity", *(("average_gradient",) if self.centered else ()), *self._momentum_slot)
        if self.name == "adagrad":
            return ("squared_gradient_sum",)
        return self._momentum_slot

    @property
    def _momentum_slot(self) -> tuple[str, ...]:
        return ("momentum",) if self.momentum > 0 else ()

    @property
    def has_step_counter(self) -> bool:
        return self.name in ("adam", "adamw")


def apply_updates(config: OptimizerConfig, variables, values, grads, slots, step, lr) -> None:
    """Assign the updated values to ``variables`` and their ``slots``.

    ``values`` are the variables as read at the start of the step (reading
    them again would copy every weight once more); ``slots[i]`` holds the
    slot variables of ``variables[i]`` in ``config.slots`` order; ``step`` is
    the step counter variable or None.
    """
    grads = clip_gradients(config, grads)
    if config.decay:
        values = [value - value * (config.decay * lr) for value in values]
    if config.name in ("adam", "adamw"):
        _adam(config, variables, values, grads, slots, step, lr)
    elif config.name == "rmsprop":
        _rmsprop(config, variables, values, grads, slots, lr)
    elif config.name == "adagrad":
        _adagrad(config, variables, values, grads, slots, lr)
    else:
        _sgd(config, variables, values, grads, slots, lr)


def clip_gradients(config: OptimizerConfig, grads: list[tf.Tensor]) -> list[tf.Tensor]:
    """Keras' clipping: per-tensor norm, else the global norm, else element-wise."""
    if config.clipnorm is not None:
        return [_clip_by_norm(g, config.clipnorm) for g in grads]
    if config.global_clipnorm is not None:
        norm = tf.sqrt(tf.add_n([tf.reduce_sum(tf.square(g)) for g in grads]))
        clip = config.global_clipnorm
        scale = clip * tf.minimum(1.0 / norm, 1.0 / clip)  # 1 when the norm is within the clip
        return [g * scale for g in grads]
    if config.clipvalue is not None:
        return [tf.clip_by_value(g, -config.clipvalue, config.clipvalue) for g in grads]
    return grads


def _clip_by_norm(grad: tf.Tensor, clip: float) -> tf.Tensor:
    # Keras' formula (not tf.clip_by_norm): a zero gradient stays zero without a 0/0.
    l2sum = tf.reduce_sum(tf.square(grad))
    l2norm = tf.where(l2sum > 0, tf.sqrt(tf.where(l2sum > 0, l2sum, tf.ones_like(l2sum))), l2sum)
    return grad * clip / tf.maximum(l2norm, clip)


def _sgd(config, variables, values, grads, slots, lr) -> None:
    for var, value, grad, var_slots in zip(variables, values, grads, slots, strict=True):
        if config.momentum == 0:
            var.assign(value - lr * grad)
            continue
        (velocity,) = var_slots
        new_velocity = config.momentum * velocity - lr * grad
        velocity.assign(new_velocity)
        if config.nesterov:
            var.assign(value + (config.momentum * new_velocity - lr * grad))
        else:
            var.assign(value + new_velocity)


def _adam(config, variables, values, grads, slots, step, lr) -> None:
    t = step + 1.0
    alpha = lr * tf.sqrt(1.0 - tf.pow(config.beta_2, t)) / (1.0 - tf.pow(config.beta_1, t))
    for var, value, grad, (m, v) in zip(variables, values, grads, slots, strict=True):
        new_m = m + (grad - m) * (1.0 - config.beta_1)
        new_v = v + (tf.square(grad) - v) * (1.0 - config.beta_2)
        m.assign(new_m)
        v.assign(new_v)
        var.assign(value - new_m * alpha / (tf.sqrt(new_v) + config.epsilon))
    step.assign(t)


def _rmsprop(config, variables, values, grads, slots, lr) -> None:
    rho = config.rho
    for var, value, grad, var_slots in zip(variables, values, grads, slots, strict=True):
        velocity, rest = var_slots[0], list(var_slots[1:])
        new_velocity = rho * velocity + (1.0 - rho) * tf.square(grad)
        velocity.assign(new_velocity)
        if config.centered:
            average = rest.pop(0)
            new_average = rho * average + (1.0 - rho) * grad
            average.assign(new_average)
            denominator = new_velocity - tf.square(new_average) + config.epsilon
        else:
            denominator = new_velocity + config.epsilon
        increment = lr * grad / tf.sqrt(denominator)
        if config.momentum > 0:
            (momentum,) = rest
            new_momentum = config.momentum * momentum + increment
            momentum.assign(new_momentum)
            var.assign(value - new_momentum)
        else:
            var.assign(value - increment)


def _adagrad(config, variables, values, grads, slots, lr) -> None:
    for var, value, grad, (squared_sum,) in zip(variables, values, grads, slots, strict=True):
        new_sum = squared_sum + tf.square(grad)
        squared_sum.assign(new_sum)
        accumulator = new_sum + config.initial_accumulator_value  # Keras' accumulator
        var.assign(value - lr * grad / tf.sqrt(accumulator + config.epsilon))
