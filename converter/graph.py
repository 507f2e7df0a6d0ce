"""The trainable TensorFlow module whose signatures become the ``.tflite``.

Signatures (all with the fixed batch size ``B``):

- ``train(x, y, sample_weight, lr, mu) -> loss[, correct]``: one optimizer
  step; ``mu`` scales the FedProx term ``mu/2 * ||w - anchor||^2``; ``lr``
  and ``mu`` have shape ``[1]``.
- ``infer(x) -> output``: probabilities for classifiers, outputs otherwise.
- ``evaluate(x, y, sample_weight) -> loss_sum[, correct]``: weighted sums.
- ``get_weights() -> {name: tensor}``: trainable tensors and optimizer state.
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

from converter.losses import Head
from converter.ops import Op, Param
from converter.optimizers import OptimizerConfig, apply_updates


@dataclass(frozen=True)
class GraphSpec:
    """Everything needed to build the module: ops, head, optimizer, shapes."""

    ops: tuple[Op, ...]
    head: Head
    optimizer: OptimizerConfig
    batch_size: int
    input_shape: tuple[int, ...]  # per example, without the batch dimension
    input_dtype: str = "float32"

    @property
    def params(self) -> list[Param]:
        return [p for op in self.ops for p in op.params]


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

    # -- names ----------------------------------------------------------------
    def state_names(self) -> list[str]:
        """Names of the optimizer-state tensors, in ``get_weights`` order."""
        names = ["optimizer/iterations"] if self.step is not None else []
        return names + [f"optimizer/{s}/{p.name}" for p in self.spec.params for s in self.spec.optimizer.slots]

    def state_variables(self) -> list[tf.Variable]:
        state = [self.step] if self.step is not None else []
        return state + [v for slot_list in self.slots for v in slot_list]

    # -- the computation ------------------------------------------------------
    def _forward(self, x, params, training):
        caches, index = [], 0
        for op in self.spec.ops:
            n = len(op.params)
            x, cache = op.forward(x, params[index : index + n], training)
            caches.append(cache)
            index += n
        return x, caches

    def _backward(self, d_out, caches, params):
        grads: list[tf.Tensor] = []
        first_trainable = next(i for i, op in enumerate(self.spec.ops) if op.params)
        index = len(params)
        for i in range(len(self.spec.ops) - 1, first_trainable - 1, -1):
            op = self.spec.ops[i]
            n = len(op.params)
            d_out, op_grads = op.backward(d_out, caches[i], params[index - n : index], need_dx=i > first_trainable)
            grads[:0] = op_grads
            index -= n
        return grads

    def _proximal(self, grads, params, mu):
        """Add the gradient of the FedProx term mu/2 * ||w - anchor||^2."""
        return [g + mu * (p - a) for g, p, a in zip(grads, params, self.anchors, strict=True)]

    def train(self, x, y, sample_weight, lr, mu):
        lr, mu = tf.reshape(lr, []), tf.reshape(mu, [])  # shape-[1] inputs, see the module docstring
        params = [w.read_value() for w in self.weights]
        out, caches = self._forward(x, params, training=True)
        head = self.spec.head
        scale = head.batch_scale(sample_weight)  # Keras' sum(w*l)/N, padding rows not counted
        grads = self._backward(head.output_grad(out, y, scale), caches, params)
        grads = tf.cond(mu > 0.0, lambda: self._proximal(grads, params, mu), lambda: grads)
        result = {"loss": tf.reduce_sum(head.per_example(out, y) * scale)}
        correct = head.correct(out, y)
        if correct is not None:
            result["correct"] = tf.reduce_sum(correct * sample_weight)
        apply_updates(self.spec.optimizer, self.weights, params, grads, self.slots, self.step, lr)
        return result

    def infer(self, x):
        out, _ = self._forward(x, [w.read_value() for w in self.weights], training=False)
        return {"output": self.spec.head.predict(out)}

    def evaluate(self, x, y, sample_weight):
        out, _ = self._forward(x, [w.read_value() for w in self.weights], training=False)
        head = self.spec.head
        result = {"loss_sum": tf.reduce_sum(head.per_example(out, y) * sample_weight)}
        correct = head.correct(out, y)
        if correct is not None:
            result["correct"] = tf.reduce_sum(correct * sample_weight)
        return result

    def get_weights(self):
        names = [p.name for p in self.spec.params] + self.state_names()
        return {
            n: _reshaped(v.read_value(), boundary_shape(v.shape))
            for n, v in zip(names, self.weights + self.state_variables(), strict=True)
        }

    def set_weights(self, tensors):
        for p, w, a in zip(self.spec.params, self.weights, self.anchors, strict=True):
            value = _reshaped(tensors[p.name], w.shape)
            w.assign(value)
            a.assign(value)
        for name, var in zip(self.state_names(), self.state_variables(), strict=True):
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
            for n, v in zip(
                [p.name for p in spec.params] + self.state_names(), self.weights + self.state_variables(), strict=True
            )
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
