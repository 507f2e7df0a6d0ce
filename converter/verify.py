"""Check a converted model before it is written: builtin ops only, and the
LiteRT training step equal to the Keras/TensorFlow step it replaces."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import keras
import numpy as np

from converter.errors import VerificationError
from converter.optimizers import OptimizerConfig
from converter.reference import Batch, reference_steps
from edge_client.manifest import Manifest
from edge_client.runtime import TrainableModel


@dataclass(frozen=True)
class VerificationReport:
    """Maximum absolute differences between LiteRT and TensorFlow."""

    steps: int
    loss_max_abs_diff: float
    weights_max_abs_diff: float
    infer_max_abs_diff: float
    tolerance: float

    @property
    def worst(self) -> float:
        return max(self.loss_max_abs_diff, self.weights_max_abs_diff, self.infer_max_abs_diff)

    def to_json(self) -> dict:
        return asdict(self)


def random_batches(
    manifest: Manifest,
    steps: int,
    seed: int,
    make_x: Callable[[np.random.Generator, tuple[int, ...]], np.ndarray] | None = None,
    weight_range: tuple[float, float] = (0.5, 1.5),
) -> list[Batch]:
    """Random inputs, labels and sample weights shaped for ``manifest``.

    Inputs are uniform in [0, 1) unless ``make_x(rng, shape)`` is given. The
    last example of every batch has weight 0, as padding would.
    """
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(steps):
        shape = manifest.input.shape
        x = (make_x(rng, shape) if make_x else rng.uniform(0.0, 1.0, shape)).astype(manifest.input.dtype)
        if manifest.task == "multiclass" and len(manifest.label.shape) == 2:  # one-hot (categorical)
            ids = rng.integers(0, manifest.num_classes, manifest.batch_size)
            y = np.eye(manifest.num_classes, dtype=np.float32)[ids]
        elif manifest.task == "multiclass":
            y = rng.integers(0, manifest.num_classes, manifest.label.shape).astype(np.int32)
        elif manifest.task == "binary":
            y = rng.integers(0, 2, manifest.label.shape).astype(np.float32)
        else:
            y = rng.normal(size=manifest.label.shape).astype(np.float32)
        w = rng.uniform(*weight_range, manifest.batch_size).astype(np.float32)
        w[-1] = 0.0
        batches.append(Batch(x, y, w))
    return batches


def keras_probabilities(model: keras.Model, x: np.ndarray, task: str, from_logits: bool) -> np.ndarray:
    """What ``infer`` should return for ``x``: Keras' output, squashed if logits."""
    out = keras.ops.convert_to_numpy(model(x, training=False))
    if not from_logits or task == "regression":
        return out
    if task == "binary":
        return 1.0 / (1.0 + np.exp(-out))
    shifted = np.exp(out - out.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def verify_against_keras(
    model: keras.Model,
    tflite: bytes,
    manifest: Manifest,
    optimizer: OptimizerConfig,
    steps: int = 3,
    tolerance: float = 1e-4,
    seed: int = 0,
) -> VerificationReport:
    """Run ``steps`` train steps in LiteRT and in TensorFlow and compare them.

    The caller has already checked that ``tflite`` holds builtin ops only.
    """
    runtime = TrainableModel(tflite, manifest)
    batches = random_batches(manifest, steps, seed)
    from_logits = bool(manifest.loss["from_logits"])

    expected = keras_probabilities(model, batches[0].x, manifest.task, from_logits)
    infer_diff = float(np.max(np.abs(runtime.infer_batch(batches[0].x) - expected)))

    lr = optimizer.learning_rate
    got_losses = [runtime.train_step(b.x, b.y, b.sample_weight, lr=lr).loss for b in batches]
    options = {k: v for k, v in manifest.loss.items() if k not in ("name", "from_logits")}
    ref_losses, ref_weights = reference_steps(
        model, manifest.loss["name"], from_logits, optimizer, batches, lr, loss_options=options
    )
    loss_diff = float(np.max(np.abs(np.subtract(got_losses, ref_losses))))
    weight_diff = 0.0
    for name, array in runtime.get_weights():
        if name not in ref_weights:
            raise VerificationError(f"weight {name!r} has no counterpart in the Keras model")
        weight_diff = max(weight_diff, float(np.max(np.abs(array - ref_weights[name]))))

    report = VerificationReport(steps, loss_diff, weight_diff, infer_diff, tolerance)
    if not report.worst <= tolerance:  # also catches NaN
        raise VerificationError(
            f"converted model differs from TensorFlow by {report.worst:.3g} (> tolerance {tolerance:g}): "
            f"loss {loss_diff:.3g}, weights {weight_diff:.3g}, infer {infer_diff:.3g}. "
            "Please report this model; use --no-verify only to inspect the file."
        )
    return report
