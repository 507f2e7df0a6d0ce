"""Protocol fakes shared by the edge-client tests: a fake clock and a tiny hand-written model.

The tiny model is a manifest and arbitrary bytes whose SHA-256 the manifest
names: enough for everything that checks a model's identity and its weights
(model meta, global frames, the state directory) without TensorFlow or LiteRT.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from edge_client.chunks import split
from edge_client.frames import Frame, encode_frame
from edge_client.manifest import SIGNATURES, Manifest
from edge_client.messages import ModelMeta
from edge_client.model_file import sha256_hex
from edge_client.weights import NamedArray, TensorSpec

T0 = 1_700_000_000.0


class FakeClock:
    """Unix time that moves only when a test sets :attr:`now`."""

    def __init__(self, now: float = T0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass(frozen=True)
class TinyModel:
    """A manifest with two weights and the bytes it belongs to (not a real graph)."""

    model: bytes
    manifest: Manifest

    @property
    def sha(self) -> str:
        return self.manifest.model_sha256

    def weights(self, value: float = 0.5) -> list[NamedArray]:
        return [NamedArray(s.name, np.full(s.shape, value, np.float32)) for s in self.manifest.weights]

    def meta(self, chunk_size: int, **changes) -> ModelMeta:
        fields = dict(
            model_sha256=self.sha,
            size=len(self.model),
            chunks=len(split(self.model, chunk_size)),
            manifest=self.manifest.to_json(),
        )
        return ModelMeta(**{**fields, **changes})

    def global_frame(self, round: int, run: str, value: float = 0.5) -> bytes:
        return encode_frame(Frame("global", round, self.sha, self.weights(value), run=run))


def tiny_manifest(model_sha256: str, name: str = "tiny") -> Manifest:
    """A valid manifest naming ``model_sha256``: 4 features, one sigmoid output, batch 2."""
    scalar = TensorSpec("lr", (1,), "float32")
    signatures = {s: {"inputs": [], "outputs": []} for s in SIGNATURES}
    return Manifest(
        model_name=name,
        task="binary",
        batch_size=2,
        input=TensorSpec("x", (2, 4), "float32"),
        label=TensorSpec("y", (2, 1), "float32"),
        output=TensorSpec("out", (2, 1), "float32"),
        num_classes=2,
        loss={"name": "binary_crossentropy"},
        optimizer={"name": "sgd"},
        weights=(TensorSpec("dense/kernel", (4, 1), "float32"), TensorSpec("dense/bias", (1,), "float32")),
        optimizer_state=(scalar,),
        signatures=signatures,
        model_sha256=model_sha256,
        converter_version="test",
    )


def make_tiny_model(content: bytes = b"tiny model graph " * 40, name: str = "tiny") -> TinyModel:
    return TinyModel(content, tiny_manifest(sha256_hex(content), name))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def tiny() -> TinyModel:
    return make_tiny_model()


@pytest.fixture
def make_tiny():
    """``make_tiny(content, name)``: another tiny model (other bytes, other SHA-256)."""
    return make_tiny_model
