"""The JSON manifest written beside every converted ``.tflite`` model.

It tells a device everything it needs to train the model without
TensorFlow: input and label shapes, the fixed batch size, the loss and
optimizer the graph implements, and the ordered weight names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_client.durable import atomic_write
from edge_client.errors import ManifestError, WeightsError
from edge_client.weights import TensorSpec

FORMAT = "litefed-model"
# 2: no rank-0 signature input (lr, mu and scalar state have shape [1]); version 1
# models crash ai-edge-litert's aarch64 build in `train`, so they are refused.
FORMAT_VERSION = 2
RECONVERT = "re-convert the model with the current litefed-convert"
TASKS = ("multiclass", "binary", "regression")
SIGNATURES = ("train", "infer", "evaluate", "get_weights", "set_weights")


@dataclass(frozen=True)
class Manifest:
    """Everything about a converted model except its graph."""

    model_name: str
    task: str
    batch_size: int
    input: TensorSpec
    label: TensorSpec
    output: TensorSpec
    num_classes: int
    loss: dict[str, Any]
    optimizer: dict[str, Any]
    weights: tuple[TensorSpec, ...]
    optimizer_state: tuple[TensorSpec, ...]
    signatures: dict[str, dict[str, list[str]]]
    model_sha256: str
    converter_version: str
    fedprox: bool = True
    verification: dict[str, Any] = field(default_factory=dict)
    local_state: tuple[TensorSpec, ...] = ()
    """Model state that stays on the board (BatchNormalization statistics converted with
    ``--model-state local``): kept across rounds, never sent, never replaced by the global model."""

    @property
    def all_weights(self) -> tuple[TensorSpec, ...]:
        """Federated tensors, then the board's local state and optimizer state: everything ``get_weights`` returns."""
        return self.weights + self.local_state + self.optimizer_state

    @property
    def is_classifier(self) -> bool:
        return self.task in ("multiclass", "binary")

    @property
    def num_parameters(self) -> int:
        total = 0
        for spec in self.weights:
            count = 1
            for dim in spec.shape:
                count *= dim
            total += count
        return total

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "converter_version": self.converter_version,
            "model_name": self.model_name,
            "task": self.task,
            "batch_size": self.batch_size,
            "num_classes": self.num_classes,
            "num_parameters": self.num_parameters,
            "input": self.input.to_json(),
            "label": self.label.to_json(),
            "output": self.output.to_json(),
            "loss": self.loss,
            "optimizer": self.optimizer,
            "fedprox": self.fedprox,
            "weights": [s.to_json() for s in self.weights],
            "optimizer_state": [s.to_json() for s in self.optimizer_state],
            "local_state": [s.to_json() for s in self.local_state],
            "signatures": self.signatures,
            "model_sha256": self.model_sha256,
            "verification": self.verification,
        }

    @classmethod
    def from_json(cls, obj: Any) -> Manifest:
        """Validate and parse a manifest object; raise :class:`ManifestError`."""
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            raise ManifestError(f"not a litefed model manifest (expected format {FORMAT!r})")
        if obj.get("format_version") != FORMAT_VERSION:
            raise ManifestError(
                f"manifest format_version {obj.get('format_version')!r} is not supported "
                f"(this litefed reads {FORMAT_VERSION}); {RECONVERT}"
            )
        try:
            manifest = cls(
                model_name=str(obj["model_name"]),
                task=obj["task"],
                batch_size=int(obj["batch_size"]),
                input=TensorSpec.from_json(obj["input"]),
                label=TensorSpec.from_json(obj["label"]),
                output=TensorSpec.from_json(obj["output"]),
                num_classes=int(obj["num_classes"]),
                loss=dict(obj["loss"]),
                optimizer=dict(obj["optimizer"]),
                weights=tuple(TensorSpec.from_json(s) for s in obj["weights"]),
                optimizer_state=tuple(TensorSpec.from_json(s) for s in obj["optimizer_state"]),
                signatures={k: dict(v) for k, v in obj["signatures"].items()},
                model_sha256=str(obj["model_sha256"]),
                converter_version=str(obj["converter_version"]),
                fedprox=bool(obj.get("fedprox", False)),
                verification=dict(obj.get("verification", {})),
                local_state=tuple(TensorSpec.from_json(s) for s in obj.get("local_state", [])),
            )
        except (KeyError, TypeError, ValueError, WeightsError) as exc:
            raise ManifestError(f"malformed manifest: {exc!r}") from exc
        manifest._check()
        return manifest

    def _check(self) -> None:
        if self.task not in TASKS:
            raise ManifestError(f"unknown task {self.task!r}; expected one of {TASKS}")
        if self.batch_size < 1 or self.input.shape[:1] != (self.batch_size,):
            raise ManifestError("input shape must start with the fixed batch size")
        missing = [s for s in SIGNATURES if s not in self.signatures]
        if missing:
            raise ManifestError(f"manifest lacks signatures {missing}")
        names = [s.name for s in self.all_weights]
        if len(set(names)) != len(names):
            raise ManifestError("weight names in the manifest are not unique")
        scalars = [s.name for s in self.all_weights if s.shape == ()]
        if scalars:
            raise ManifestError(f"manifest has rank-0 tensors {scalars} (from an older converter); {RECONVERT}")


def manifest_path_for(model_path: str | Path) -> Path:
    """``model.tflite`` -> ``model.json``: where the manifest of a model lives."""
    return Path(model_path).with_suffix(".json")


def load_manifest(path: str | Path) -> Manifest:
    """Read and validate a manifest file."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ManifestError(f"manifest {path} not found; it is written beside the model by litefed-convert") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"cannot read manifest {path}: {exc}") from exc
    return Manifest.from_json(obj)


def save_manifest(manifest: Manifest, path: str | Path) -> None:
    """Write ``manifest`` as indented JSON, atomically and durably."""
    atomic_write(path, (json.dumps(manifest.to_json(), indent=2) + "\n").encode("utf-8"))
