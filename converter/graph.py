"""The trainable TensorFlow module whose signatures become the ``.tflite``.

Signatures (all with the fixed batch size ``B``):

- ``train(x, y, sample_weight, lr, mu) -> loss[, correct]``: one optimizer
  step; ``mu`` scales the FedProx term ``mu/2 * ||w - anchor||^2``; ``lr``
  and ``mu`` have shape ``[1]``.
- ``infer(x) -> output``: probabilities for classifiers, outputs otherwise.
- ``evaluate(x, y, sample_weight) -> loss_sum[, correct]``: weighted sums.
- ``get_weights() -> {name: tensor}``: trainable tensors, model state
  (BatchNormalization's moving statistics) and optimizer state.
- ``set_weights({name: tensor}) -> count``: assigns them and sets the anchor.

No signature has a rank-0 input: ai-edge-litert's aarch64 build crashes
(a ``memset`` of 2^64-4 bytes) when its ``SignatureRunner`` resizes one.
Scalars therefore cross every signature boundary with shape ``[1]``
(:func:`boundary_shape`) and are reshaped inside the graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from converter import regularizers
from converter.losses import Head
from converter.ops import Op, Param
from converter.optimizers import OptimizerConfig, apply_updates

MODEL_STATE = ("federated", "local")
"""Where model state (BatchNormalization's moving statistics) goes: averaged with the
weights across the federation, or kept on each board (as FedBN does)."""


@dataclass(frozen=True)
class GraphSpec:
    """Everything needed to build the module: ops, head, optimizer, shapes."""

    ops: tuple[Op, ...]
    head: Head
    optimizer: OptimizerConfig
    batch_size: int
    input_shape: tuple[int, ...]  # per example, without the batch dimension
    input_dtype: str = "float32"
    model_state: str = "federated"

    @property
    def params(self) -> list[Param]:
        return [p for op in self.ops for p in op.params]

    @property
    def state(self) -> list[Param]:
        """Model state: tensors ops update in ``train`` without a gradient."""
        return [s for op in self.ops for s in op.state]


class TrainingModule(tf.Module):
    """Variables plus the five signature functions for one :class:`GraphSpec`."""

    def __init__(self, spec: GraphSpec):
        super().__init__(name="litefed")
        self.spec = spec
        self.weights = [tf.Variable(p.initial, name=_var_name(p.name)) for p in spec.params]
        # FedProx anchor: the last weights loaded through set_weights.
        self.anchors = [
            tf.Variable(p.initial, trainable=False, name=_var_name("anchor/" + p.name)) for p in spec.params
        ]
        self.slots = [
            [
                tf.Variable(np.zeros_like(p.initial), trainable=False, name=_var_name(f"{s}/{p.name}"))
                for s in spec.optimizer.slots
            ]
            for p in spec.params
        ]
        self.step = tf.Variable(0.0, trainable=False, name="iterations") if spec.optimizer.has_step_counter else None
        self.model_state = [tf.Variable(s.initial, trainable=False, name=_var_name(s.name)) for s in spec.state]

    # -- names ----------------------------------------------------------------
    def tensor_names(self) -> list[str]:
        """Every name ``get_weights`` returns: trainable tensors, model state, optimizer state."""
        return [p.name for p in self.spec.params] + [s.name for s in self.spec.state] + self.state_names()

    def tensor_variables(self) -> list[tf.Variable]:
        """The variables of :meth:`tensor_names`, in the same order."""
        return self.weights + self.model_state + self.state_variables()

    def state_names(self) -> list[str]:
        """Names of the optimizer-state tensors, in ``get_weights`` order."""
        names = ["optimizer/iterations"] if self.step is not None else []
        return names + [f"optimizer/{s}/{p.name}" for p in self.spec.params for s in self.spec.optimizer.slots]

    def state_variables(self) -> list[tf.Variable]:
        state = [self.step] if self.step is not None else []
        return state + [v for slot_list in self.slots for v in slot_list]

    # -- the computation ------------------------------------------------------
    def _op_values(self, params, states) -> list[list[tf.Tensor]]:
        """Per op: its params' values, then its state's (the list ``forward`` and ``backward`` take)."""
        out, p, s = [], 0, 0
        for op in self.spec.ops:
            out.append(list(params[p : p + len(op.params)]) + list(states[s : s + len(op.state)]))
            p, s = p + len(op.params), s + len(op.state)
        return out

    def _forward(self, x, values, training):
        caches = []
        for op, op_values in zip(self.spec.ops, values, strict=True):
            x, cache = op.forward(x, op_values, training)
            caches.append(cache)
        return x, caches

    def _backward(self, d_out, caches, values):
        grads: list[tf.Tensor] = []
        first_trainable = next(i for i, op in enumerate(self.spec.ops) if op.params)
        for i in range(len(self.spec.ops) - 1, first_trainable - 1, -1):
            op = self.spec.ops[i]
            d_out, op_grads = op.backward(d_out, caches[i], values[i], need_dx=i > first_trainable)
            grads[:0] = op_grads
        return grads

    def _state_updates(self, caches, values) -> list[tf.Tensor]:
        return [u for op, c, v in zip(self.spec.ops, caches, values, strict=True) for u in op.state_updates(c, v)]

    def _read(self):
        return self._op_values([w.read_value() for w in self.weights], [v.read_value() for v in self.model_state])

    def _proximal(self, grads, params, mu):
        """Add the gradient of the FedProx term mu/2 * ||w - anchor||^2."""
        return [g + mu * (p - a) for g, p, a in zip(grads, params, self.anchors, strict=True)]

    def train(self, x, y, sample_weight, lr, mu):
        lr, mu = tf.reshape(lr, []), tf.reshape(mu, [])  # shape-[1] inputs, see the module docstring
        params = [w.read_value() for w in self.weights]
        values = self._op_values(params, [v.read_value() for v in self.model_state])
        out, caches = self._forward(x, values, training=True)
        head = self.spec.head
        scale = head.batch_scale(sample_weight)  # Keras' sum(w*l)/N, padding rows not counted
        grads = self._backward(head.output_grad(out, y, scale), caches, values)
        penalty, grads = regularizers.apply(self.spec.params, params, grads)
        grads = tf.cond(mu > 0.0, lambda: self._proximal(grads, params, mu), lambda: grads)
        result = {"loss": tf.reduce_sum(head.per_example(out, y) * scale) + penalty}
        correct = head.correct(out, y)
        if correct is not None:
            result["correct"] = tf.reduce_sum(correct * sample_weight)
        for var, value in zip(self.model_state, self._state_updates(caches, values), strict=True):
            var.assign(value)
        apply_updates(self.spec.optimizer, self.weights, params, grads, self.slots, self.step, lr)
        return result

    def infer(self, x):
        out, _ = self._forward(x, self._read(), training=False)
        return {"output": self.spec.head.predict(out)}

    def evaluate(self, x, y, sample_weight):
        out, _ = self._forward(x, self._read(), training=False)
        head = self.spec.head
        result = {"loss_sum": tf.reduce_sum(head.per_example(out, y) * sample_weight)}
        correct = head.correct(out, y)
        if correct is not None:
            result["correct"] = tf.reduce_sum(correct * sample_weight)
        return result

    def get_weights(self):
        return {
            n: _reshaped(v.read_value(), boundary_shape(v.shape))
            for n, v in zip(self.tensor_names(), self.tensor_variables(), strict=True)
        }

    def set_weights(self, tensors):
        for p, w, a in zip(self.spec.params, self.weights, self.anchors, strict=True):
            value = _reshaped(tensors[p.name], w.shape)
            w.assign(value)
            a.assign(value)
        model_state = [(s.name, v) for s, v in zip(self.spec.state, self.model_state, strict=True)]
        for name, var in model_state + list(zip(self.state_names(), self.state_variables(), strict=True)):
            var.assign(_reshaped(tensors[name], var.shape))
        return {"count": tf.constant(len(tensors), tf.int32)}

    # -- signatures -----------------------------------------------------------
    def signatures(self) -> dict[str, tf.types.experimental.ConcreteFunction]:
        spec, b = self.spec, self.spec.batch_size
        x = tf.TensorSpec([b, *spec.input_shape], spec.input_dtype, name="x")
        y = tf.TensorSpec(spec.head.label_shape(b), spec.head.label_dtype, name="y")
        w = tf.TensorSpec([b], tf.float32, name="sample_weight")
        hyper = lambda name: tf.TensorSpec([1], tf.float32, name=name)  # noqa: E731
        tensors = {
            n: tf.TensorSpec(boundary_shape(v.shape), v.dtype, name=n)
            for n, v in zip(self.tensor_names(), self.tensor_variables(), strict=True)
        }
        return {
            "train": tf.function(self.train).get_concrete_function(x, y, w, hyper("lr"), hyper("mu")),
            "infer": tf.function(self.infer).get_concrete_function(x),
            "evaluate": tf.function(self.evaluate).get_concrete_function(x, y, w),
            "get_weights": tf.function(self.get_weights).get_concrete_function(),
            "set_weights": tf.function(self.set_weights).get_concrete_function(tensors),
        }


def boundary_shape(shape) -> tuple[int, ...]:
    """The shape a tensor has in a signature: its own, except that a scalar becomes ``[1]``."""
    shape = tuple(int(d) for d in shape)
    return shape or (1,)


def _reshaped(value: tf.Tensor, shape) -> tf.Tensor:
    """``value`` in ``shape``; a RESHAPE op only where the shapes differ (scalars)."""
    shape = tuple(int(d) for d in shape)
    return value if tuple(value.shape) == shape else tf.reshape(value, shape)


def _var_name(name: str) -> str:
    return name.replace("/", "__")


def to_tflite(module: TrainingModule, workdir: str) -> bytes:
    """Save ``module`` as a SavedModel and convert it with builtin ops only."""
    signatures = module.signatures()
    tf.saved_model.save(module, workdir, signatures=signatures)
    converter = tf.lite.TFLiteConverter.from_saved_model(workdir, signature_keys=list(signatures))
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    converter.experimental_enable_resource_variables = True
    # Zero-initialised optimizer slots would otherwise be stored as full buffers,
    # doubling (Adam: tripling) the file; FILL recreates them at initialisation.
    converter._experimental_unfold_large_splat_constant = True
    return converter.convert()
