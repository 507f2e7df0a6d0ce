"""Train, evaluate and predict with a converted model on the LiteRT interpreter.

This is the only module that drives ``ai_edge_litert``. It needs numpy and
ai-edge-litert and nothing else, so it runs on a Raspberry Pi as it runs on
the coordinator (which evaluates the global model through it).

Signatures are run through :class:`_Signature`, not ``SignatureRunner.__call__``:
that call resizes every input on every call, and ai-edge-litert's aarch64
build crashes resizing a rank-0 input (``memset`` of 2^64-4 bytes). Our
inputs have fixed shapes, so the tensors are allocated once and only set.
Models with a rank-0 signature input (converted before format_version 2)
are refused at load.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ai_edge_litert.interpreter import Interpreter

from edge_client.errors import ManifestError, WeightsError
from edge_client.manifest import RECONVERT, Manifest, load_manifest, manifest_path_for
from edge_client.model_file import require_builtin_only, sha256_hex
from edge_client.weights import NamedArray, Weights, check_weights


@dataclass(frozen=True)
class StepResult:
    """Outputs of one ``train`` step: mean loss and weighted correct count."""

    loss: float
    correct: float


@dataclass(frozen=True)
class Metrics:
    """Loss and accuracy over a whole dataset (accuracy is None for regression)."""

    loss: float
    accuracy: float | None
    num_examples: int


def padded_batches(
    num_examples: int, batch_size: int, order: np.ndarray | None = None
) -> Iterator[tuple[np.ndarray, int]]:
    """Yield ``(indices, num_real)`` batches of exactly ``batch_size`` indices.

    The last batch is padded by repeating its first index; ``num_real``
    tells how many entries are real so that padding gets sample weight 0.
    """
    order = np.arange(num_examples) if order is None else order
    for start in range(0, num_examples, batch_size):
        idx = order[start : start + batch_size]
        real = len(idx)
        if real < batch_size:
            idx = np.concatenate([idx, np.full(batch_size - real, idx[0])])
        yield idx, real


class _Signature:
    """One signature of a loaded model, run with fixed-shape inputs (no resizing)."""

    def __init__(self, interpreter: Interpreter, name: str):
        self.name = name
        self._runner = interpreter.get_signature_runner(name)
        self._inputs = self._runner.get_input_details()
        self._outputs = {n: d["index"] for n, d in self._runner.get_output_details().items()}
        scalars = sorted(n for n, d in self._inputs.items() if len(d["shape"]) == 0)
        if scalars:
            raise ManifestError(f"signature {name!r} has rank-0 inputs {scalars} (an older model); {RECONVERT}")
        # The calls SignatureRunner.__call__ makes, minus the resizing; there is no public
        # per-subgraph set/invoke. A build without them falls back to the runner itself,
        # which is safe too now that no input is rank 0.
        wrapper = getattr(interpreter, "_interpreter", None)
        self._subgraph = getattr(self._runner, "_subgraph_index", None)
        direct = self._subgraph is not None and all(
            hasattr(wrapper, m) for m in ("AllocateTensors", "SetTensor", "Invoke", "GetTensor")
        )
        self._wrapper = wrapper if direct else None
        if self._wrapper is not None:
            self._wrapper.AllocateTensors(self._subgraph)

    @property
    def input_names(self) -> list[str]:
        return list(self._inputs)

    def __call__(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        arrays = self._checked(inputs)
        if self._wrapper is None:
            return self._runner(**arrays)
        for name, value in arrays.items():
            self._wrapper.SetTensor(self._inputs[name]["index"], value, self._subgraph)
        self._wrapper.Invoke(self._subgraph)
        # GetTensor returns a copy, so the results survive the next invocation.
        return {n: self._wrapper.GetTensor(i, self._subgraph) for n, i in self._outputs.items()}

    def _checked(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The inputs in the signature's dtypes; a one-line error for a missing name or a wrong shape."""
        if set(inputs) != set(self._inputs):
            raise WeightsError(f"signature {self.name!r} takes inputs {sorted(self._inputs)}, got {sorted(inputs)}")
        arrays = {}
        for name, value in inputs.items():
            detail = self._inputs[name]
            arrays[name] = np.asarray(value, detail["dtype"])
            if arrays[name].shape != tuple(detail["shape"]):
                raise WeightsError(
                    f"input {name!r} of {self.name!r} must have shape {tuple(detail['shape'])}, "
                    f"got {arrays[name].shape}"
                )
        return arrays


class TrainableModel:
    """A converted model loaded into one LiteRT interpreter."""

    def __init__(self, model: bytes, manifest: Manifest, num_threads: int | None = None):
        if sha256_hex(model) != manifest.model_sha256:
            raise ManifestError(
                "the manifest does not belong to this model (sha256 mismatch); "
                "use the .json written beside the .tflite by the same conversion"
            )
        require_builtin_only(model)
        self.manifest = manifest
        self._interpreter = Interpreter(model_content=model, num_threads=num_threads)
        self._runners = {name: _Signature(self._interpreter, name) for name in manifest.signatures}
        for name, runner in self._runners.items():
            if sorted(runner.input_names) != sorted(manifest.signatures[name].get("inputs", [])):
                raise ManifestError(f"the model's {name!r} inputs differ from the manifest's; {RECONVERT}")
        self._x_dtype = np.dtype(manifest.input.dtype)
        self._y_dtype = np.dtype(manifest.label.dtype)

    @classmethod
    def load(
        cls,
        model_path: str | Path,
        manifest_path: str | Path | None = None,
        num_threads: int | None = None,
    ) -> TrainableModel:
        """Load ``model.tflite`` and its manifest (``model.json`` by default)."""
        manifest = load_manifest(manifest_path or manifest_path_for(model_path))
        return cls(Path(model_path).read_bytes(), manifest, num_threads=num_threads)

    @property
    def batch_size(self) -> int:
        return self.manifest.batch_size

    # -- single batches -------------------------------------------------------
    def train_step(
        self,
        x: np.ndarray,
        y: np.ndarray,
        sample_weight: np.ndarray | None = None,
        lr: float | None = None,
        mu: float = 0.0,
    ) -> StepResult:
        """One optimizer step on one full batch (``batch_size`` examples)."""
        lr = self.manifest.optimizer["learning_rate"] if lr is None else lr
        out = self._runners["train"](
            x=np.asarray(x, self._x_dtype),
            y=np.asarray(y, self._y_dtype),
            sample_weight=self._weights_or_ones(sample_weight),
            lr=np.array([lr], np.float32),
            mu=np.array([mu], np.float32),
        )
        return StepResult(float(out["loss"]), float(out.get("correct", 0.0)))

    def infer_batch(self, x: np.ndarray) -> np.ndarray:
        """Model outputs (probabilities for classifiers) for one full batch."""
        return self._runners["infer"](x=np.asarray(x, self._x_dtype))["output"]

    def _weights_or_ones(self, sample_weight: np.ndarray | None) -> np.ndarray:
        if sample_weight is None:
            return np.ones(self.batch_size, np.float32)
        return np.asarray(sample_weight, np.float32)

    # -- whole datasets -------------------------------------------------------
    def fit(
        self,
        x: np.ndarray,
        y: np.ndarray,
        epochs: int = 1,
        lr: float | None = None,
        mu: float = 0.0,
        rng: np.random.Generator | None = None,
    ) -> Metrics:
        """Train ``epochs`` passes over ``(x, y)``; return the running train metrics.

        Examples are shuffled each epoch when ``rng`` is given. The last,
        partial batch is padded with zero-weight examples.
        """
        total_loss, total_correct, seen = 0.0, 0.0, 0
        for _ in range(epochs):
            order = rng.permutation(len(x)) if rng is not None else None
            for idx, real in padded_batches(len(x), self.batch_size, order):
                weight = np.zeros(self.batch_size, np.float32)
                weight[:real] = 1.0
                step = self.train_step(x[idx], y[idx], weight, lr=lr, mu=mu)
                total_loss += step.loss * real
                total_correct += step.correct
                seen += real
        return self._metrics(total_loss, total_correct, seen)

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> Metrics:
        """Exact dataset loss and accuracy through the ``evaluate`` signature."""
        total_loss, total_correct = 0.0, 0.0
        for idx, real in padded_batches(len(x), self.batch_size):
            weight = np.zeros(self.batch_size, np.float32)
            weight[:real] = 1.0
            out = self._runners["evaluate"](
                x=np.asarray(x[idx], self._x_dtype),
                y=np.asarray(y[idx], self._y_dtype),
                sample_weight=weight,
            )
            total_loss += float(out["loss_sum"])
            total_correct += float(out.get("correct", 0.0))
        return self._metrics(total_loss, total_correct, len(x))

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Outputs for any number of examples (padded to full batches internally)."""
        parts = [self.infer_batch(x[idx])[:real] for idx, real in padded_batches(len(x), self.batch_size)]
        return np.concatenate(parts) if parts else np.zeros((0, *self.manifest.output.shape[1:]))

    def _metrics(self, loss_sum: float, correct: float, count: int) -> Metrics:
        if count == 0:
            return Metrics(0.0, None, 0)
        accuracy = correct / count if self.manifest.is_classifier else None
        return Metrics(loss_sum / count, accuracy, count)

    # -- weights --------------------------------------------------------------
    def _local_state(self) -> Weights:
        """The board's current local state (none for most models)."""
        if not self.manifest.local_state:
            return []
        out = self._runners["get_weights"]()
        return [NamedArray(s.name, np.array(out[s.name])) for s in self.manifest.local_state]

    def get_weights(self, include_optimizer: bool = False) -> Weights:
        """Current weights in manifest order, optionally with optimizer state."""
        out = self._runners["get_weights"]()
        specs = self.manifest.all_weights if include_optimizer else self.manifest.weights
        return [NamedArray(s.name, np.array(out[s.name])) for s in specs]

    def set_weights(self, weights: Weights) -> None:
        """Assign weights and make them the FedProx anchor.

        ``weights`` holds either the federated tensors only, in which case the
        optimizer state is reset to zero (a fresh local optimizer, as at the
        start of a federated round) and the board's local state is kept, or
        everything ``get_weights(include_optimizer=True)`` returns.
        Everything is validated before anything is assigned.
        """
        specs = self.manifest.all_weights
        if len(weights) == len(self.manifest.weights):
            local = self._local_state()
            weights = (
                list(weights)
                + local
                + [NamedArray(s.name, np.zeros(s.shape, s.dtype)) for s in self.manifest.optimizer_state]
            )
        elif len(weights) != len(specs):
            raise WeightsError(
                f"expected {len(self.manifest.weights)} federated tensors "
                f"(or {len(specs)} with local and optimizer state), got {len(weights)}"
            )
        check_weights(weights, specs)
        self._runners["set_weights"](**{name: array for name, array in weights})
