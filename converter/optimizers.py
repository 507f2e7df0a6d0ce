"""Optimizer update rules written out as plain tensor arithmetic.

They reproduce Keras 3's SGD (with momentum and Nesterov) and Adam exactly,
so a step in the converted model matches ``model.train_on_batch``. The
learning rate is an input of ``train``, so the coordinator can change it
every round without re-converting the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import tensorflow as tf

from converter.errors import UnsupportedModelError

OPTIMIZERS = ("sgd", "adam")


@dataclass(frozen=True)
class OptimizerConfig:
    """Optimizer name and hyper-parameters, as recorded in the manifest."""

    name: str = "sgd"
    learning_rate: float = 0.01
    momentum: float = 0.0
    nesterov: bool = False
    beta_1: float = 0.9
    beta_2: float = 0.999
    epsilon: float = 1e-7

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise UnsupportedModelError(
                f"optimizer {self.name!r} is not supported; choose one of {', '.join(OPTIMIZERS)}"
            )
        if not self.learning_rate > 0:
            raise UnsupportedModelError(f"learning rate must be > 0, got {self.learning_rate}")
        if not 0 <= self.momentum < 1:
            raise UnsupportedModelError(f"momentum must be in [0, 1), got {self.momentum}")

    def to_json(self) -> dict:
        if self.name == "sgd":
            return {
                "name": "sgd",
                "learning_rate": self.learning_rate,
                "momentum": self.momentum,
                "nesterov": self.nesterov,
            }
        return {
            "name": "adam",
            "learning_rate": self.learning_rate,
            "beta_1": self.beta_1,
            "beta_2": self.beta_2,
            "epsilon": self.epsilon,
        }

    @property
    def slots(self) -> tuple[str, ...]:
        """Per-parameter state tensors, named ``optimizer/<slot>/<param>``."""
        if self.name == "adam":
            return ("m", "v")
        return ("momentum",) if self.momentum > 0 else ()

    @property
    def has_step_counter(self) -> bool:
        return self.name == "adam"


def apply_updates(config: OptimizerConfig, variables, values, grads, slots, step, lr) -> None:
    """Assign the updated values to ``variables`` and their ``slots``.

    ``values`` are the variables as read at the start of the step (reading
    them again would copy every weight once more); ``slots[i]`` holds the
    slot variables of ``variables[i]`` in ``config.slots`` order; ``step`` is
    the step counter variable or None.
    """
    if config.name == "adam":
        _adam(config, variables, values, grads, slots, step, lr)
        return
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
