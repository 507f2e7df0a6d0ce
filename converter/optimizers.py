"""Optimizer update rules written out as plain tensor arithmetic.

They reproduce Keras 3's SGD (with momentum and Nesterov), Adam, AdamW,
RMSprop and Adagrad exactly, with Keras' gradient clipping (``clipnorm``,
``global_clipnorm``, ``clipvalue``) and decoupled weight decay, in Keras'
order: clip the gradients, decay the weights, then the update rule. A step
in the converted model therefore matches ``model.train_on_batch``. The
learning rate is an input of ``train``, so the coordinator can change it
every round without re-converting the model.

A compiled Keras learning-rate schedule (:class:`Schedule`) is evaluated in
the graph from the step counter ``optimizer/iterations``, as Keras evaluates
it from ``optimizer.iterations``: the rate of a step is
``schedule(iterations) * lr / base_rate``, so feeding the manifest's
``learning_rate`` (the schedule's base rate) gives exactly Keras' schedule
and a coordinator can still scale it.

Optimizer state starts at zero (``set_weights`` with the trainable tensors
only resets it so, at the start of every round). That includes the step
counter, so a schedule restarts at step 0 every federated round (a per-round
schedule over the local steps), unless the client sends back the optimizer
state it got from ``get_weights``. Adagrad's accumulator
starts at ``initial_accumulator_value`` in Keras, so its slot holds the sum
of squared gradients *without* that initial value: zero is a fresh start.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import tensorflow as tf

from converter.errors import UnsupportedModelError

OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop", "adagrad")
_ADAMW_WEIGHT_DECAY = 0.004  # keras.optimizers.AdamW's default


SCHEDULES = ("ExponentialDecay", "InverseTimeDecay", "PiecewiseConstantDecay", "PolynomialDecay", "CosineDecay")
_RATE_KEYS = ("initial_learning_rate", "end_learning_rate", "warmup_target", "values")  # scale with the rate


@dataclass(frozen=True)
class Schedule:
    """A Keras learning-rate schedule: its class name and its config (without Keras' ``name``).

    ``options`` holds the config as sorted ``(key, value)`` pairs, lists as
    tuples, so the optimizer config stays hashable.
    """

    kind: str
    options: tuple[tuple[str, Any], ...]

    @classmethod
    def from_keras(cls, serialized: dict[str, Any]) -> Schedule:
        """Read a schedule as a compiled optimizer's ``get_config()`` holds it; refuse what the graph cannot compute.

        Subclasses (even of a supported schedule, whose ``__call__`` may differ)
        are refused: Keras serializes them with their own module.
        """
        kind = serialized.get("class_name")
        if kind not in SCHEDULES or serialized.get("module") != "keras.optimizers.schedules":
            raise UnsupportedModelError(
                f"learning-rate schedule {kind} is not supported; litefed computes {', '.join(SCHEDULES)}; "
                "pass --learning-rate LR for a constant rate"
            )
        return cls.of(str(kind), {k: v for k, v in serialized["config"].items() if k != "name"})

    @classmethod
    def of(cls, kind: str, config: dict[str, Any]) -> Schedule:
        """From a class name and a config (``to_json`` without ``class_name``); validates both."""
        if kind not in SCHEDULES:
            raise UnsupportedModelError(f"learning-rate schedule {kind} is not supported; choose one of {SCHEDULES}")
        frozen = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
        schedule = cls(kind, tuple(sorted(frozen.items())))
        if not schedule.base_rate > 0:
            raise UnsupportedModelError(
                f"{kind}'s base learning rate must be > 0 (the rate the coordinator's rate replaces), "
                f"got {schedule.base_rate}; pass --learning-rate LR for a constant rate"
            )
        return schedule

    @property
    def config(self) -> dict[str, Any]:
        return dict(self.options)

    @property
    def base_rate(self) -> float:
        """The rate the schedule starts (Cosine with warm-up: decays) from: the manifest's ``learning_rate``."""
        cfg = self.config
        if self.kind == "PiecewiseConstantDecay":
            return float(cfg["values"][0])
        if self.kind == "CosineDecay" and cfg.get("warmup_target") is not None:
            return float(cfg["warmup_target"])
        return float(cfg["initial_learning_rate"])

    def to_json(self) -> dict[str, Any]:
        return {"class_name": self.kind, **{k: list(v) if isinstance(v, tuple) else v for k, v in self.options}}

    def to_keras(self, scale: float = 1.0):
        """Keras' schedule, every rate multiplied by ``scale`` (schedules are linear in their rates)."""
        import keras

        cfg = self.to_json()
        del cfg["class_name"]
        if scale != 1.0:
            for key in _RATE_KEYS:
                if isinstance(cfg.get(key), list):
                    cfg[key] = [v * scale for v in cfg[key]]
                elif cfg.get(key) is not None:
                    cfg[key] = cfg[key] * scale
        return getattr(keras.optimizers.schedules, self.kind)(**cfg)

    def rate(self, step: tf.Tensor) -> tf.Tensor:
        """The schedule at ``step`` (float32), in Keras' float32 arithmetic and order of operations."""
        cfg = self.config
        if self.kind == "PiecewiseConstantDecay":
            return _piecewise(step, cfg["boundaries"], cfg["values"])
        if self.kind == "CosineDecay":
            return _cosine(step, cfg)
        initial = tf.constant(cfg["initial_learning_rate"], tf.float32)
        decay_steps = tf.constant(cfg["decay_steps"], tf.float32)
        if self.kind == "PolynomialDecay":
            return _polynomial(step, initial, decay_steps, cfg)
        p = step / decay_steps
        if cfg["staircase"]:
            p = tf.floor(p)
        decay_rate = tf.constant(cfg["decay_rate"], tf.float32)
        if self.kind == "ExponentialDecay":
            return initial * tf.pow(decay_rate, p)
        return initial / (1.0 + decay_rate * p)  # InverseTimeDecay


def _piecewise(step, boundaries, values) -> tf.Tensor:
    # values[0] up to and including boundaries[0], values[i+1] after boundaries[i]; Keras
    # sums indicator * value, which is exact as one indicator alone is 1.
    rate = tf.constant(float(values[0]), tf.float32)
    for boundary, value in zip(boundaries, values[1:], strict=True):
        rate = tf.where(step > float(boundary), tf.constant(float(value), tf.float32), rate)
    return rate


def _polynomial(step, initial, decay_steps, cfg) -> tf.Tensor:
    end = tf.constant(cfg["end_learning_rate"], tf.float32)
    if cfg["cycle"]:  # decay over the first multiple of decay_steps at or above the step (1 at step 0)
        multiplier = tf.where(tf.equal(step, 0.0), 1.0, tf.math.ceil(step / decay_steps))
        decay_steps = decay_steps * multiplier
    else:
        step = tf.minimum(step, decay_steps)
    p = step / decay_steps
    return (initial - end) * tf.pow(1.0 - p, tf.constant(cfg["power"], tf.float32)) + end


def _cosine(step, cfg) -> tf.Tensor:
    initial = tf.constant(cfg["initial_learning_rate"], tf.float32)
    decay_steps = tf.constant(cfg["decay_steps"], tf.float32)
    alpha = cfg["alpha"]

    def decay(s, peak):
        cosine = 0.5 * (1.0 + tf.cos(tf.constant(math.pi, tf.float32) * (s / decay_steps)))
        return peak * ((1 - alpha) * cosine + alpha)

    if cfg.get("warmup_target") is None:
        return decay(tf.minimum(step, decay_steps), initial)
    target = tf.constant(cfg["warmup_target"], tf.float32)
    warmup_steps = tf.constant(cfg["warmup_steps"], tf.float32)
    step = tf.minimum(step, decay_steps + warmup_steps)
    warmup = (target - initial) * (step / warmup_steps) + initial  # linear from initial to target
    # Both branches are computed (a SELECT, not Keras' cond): the unused one never reaches the rate.
    return tf.where(step < warmup_steps, warmup, decay(step - warmup_steps, target))


@dataclass(frozen=True)
class OptimizerConfig:
    """Optimizer name and hyper-parameters, as recorded in the manifest.

    Fields an optimizer does not use are ignored by it: ``momentum`` is
    SGD's and RMSprop's, ``beta_*`` Adam's, ``rho``/``centered`` RMSprop's,
    ``initial_accumulator_value`` Adagrad's. ``weight_decay`` None means
    Keras' default (0.004 for AdamW, none otherwise). At most one of the
    three clipping options may be set, as in Keras. With a ``schedule``,
    ``learning_rate`` is the rate ``train`` is fed by default (the
    schedule's base rate, see the module docstring).
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
    schedule: Schedule | None = None

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
        if self.schedule is not None:
            out["learning_rate_schedule"] = self.schedule.to_json()
        return out

    def to_keras(self, learning_rate: float | None = None):
        """The equivalent Keras optimizer (the reference the converted step is checked against)."""
        import keras  # the converter's only Keras use here; the update rules need TensorFlow alone

        lr: Any = self.learning_rate if learning_rate is None else learning_rate
        if self.schedule is not None:  # the graph's rate: schedule(iterations) * lr / base_rate
            lr = self.schedule.to_keras(lr / self.schedule.base_rate)
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
        """Adam's bias correction and a schedule read ``optimizer/iterations``, the number of steps taken."""
        return self.name in ("adam", "adamw") or self.schedule is not None

    def rate(self, step: tf.Tensor | None, lr: tf.Tensor) -> tf.Tensor:
        """The step's learning rate from the fed ``lr``: ``schedule(step) * lr / base_rate``, or ``lr``."""
        if self.schedule is None or step is None:
            return lr
        # lr / base is exactly 1 when the manifest's rate is fed (both the same float32).
        return self.schedule.rate(step) * (lr / tf.constant(self.schedule.base_rate, tf.float32))


def apply_updates(config: OptimizerConfig, variables, values, grads, slots, step, lr) -> None:
    """Assign the updated values to ``variables`` and their ``slots``.

    ``values`` are the variables as read at the start of the step (reading
    them again would copy every weight once more); ``slots[i]`` holds the
    slot variables of ``variables[i]`` in ``config.slots`` order; ``step`` is
    the step counter variable or None (it counts the steps: a schedule reads
    it before this step's increment, as Keras' does).
    """
    lr = config.rate(step, lr)
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
    if step is not None:
        step.assign(step + 1.0)


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
