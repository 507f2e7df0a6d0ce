"""Helpers shared by the tests (the fixtures live in ``conftest.py``)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
MNIST_PATH = REPO_ROOT.parent / "shared" / "data" / "mnist.npz"

# Prepended to child-process code: from there on, the TensorFlow family cannot
# be imported, whether directly or by any library the child imports.
BLOCK_TENSORFLOW = '''
import sys as _sys

class _BlockTensorFlow:
    """A meta-path finder that refuses the TensorFlow family of packages."""

    BLOCKED = ("tensorflow", "keras", "tf_keras")
    attempts = []

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.BLOCKED:
            self.attempts.append(name)
            raise ImportError(f"import of {name!r} blocked: the edge client must run without TensorFlow")
        return None

_sys.meta_path.insert(0, _BlockTensorFlow())
_early = [m for m in _sys.modules if m.split(".")[0] in _BlockTensorFlow.BLOCKED]
assert not _early, f"imported before the blocker: {_early}"
'''


@dataclass(frozen=True)
class Converted:
    """A Keras model, its conversion, and where the conversion was saved."""

    keras_model: Any
    converted: Any  # converter.ConvertedModel
    model_path: Path
    manifest_path: Path

    @property
    def tflite(self) -> bytes:
        return self.converted.tflite

    @property
    def manifest(self):
        return self.converted.manifest

    def runtime(self):
        """A fresh interpreter (with its own weights) for one test."""
        from edge_client.runtime import TrainableModel

        return TrainableModel(self.tflite, self.manifest)


def build_small_cnn(seed: int, name: str = "small_cnn"):
    """Conv2D -> MaxPool -> Flatten -> Dense -> Dense(softmax) on 6x6x2 inputs, SGD momentum 0.9.

    Layer names are explicit, so two initialisations share weight names.
    """
    import keras

    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((6, 6, 2)),
            keras.layers.Conv2D(3, 3, padding="same", activation="relu", name="conv"),
            keras.layers.MaxPooling2D(2, name="pool"),
            keras.layers.Flatten(name="flatten"),
            keras.layers.Dense(5, activation="relu", name="hidden"),
            keras.layers.Dense(3, activation="softmax", name="out"),
        ],
        name=name,
    )
    model.compile(loss="sparse_categorical_crossentropy", optimizer=keras.optimizers.SGD(0.05, momentum=0.9))
    return model


def separable_binary_data(n: int, num_features: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Linearly separable data with a margin; labels shaped ``[n, 1]`` float32."""
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=num_features)
    direction /= np.linalg.norm(direction)
    x = rng.normal(size=(4 * n, num_features))
    score = x @ direction
    keep = np.abs(score) > 0.25
    x, score = x[keep][:n], score[keep][:n]
    assert len(x) == n
    return x.astype(np.float32), (score > 0).astype(np.float32)[:, None]


def json_output(proc: subprocess.CompletedProcess) -> dict:
    """The JSON object a child process printed on its last stdout line."""
    assert proc.returncode == 0, f"child failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert lines, f"child printed nothing; stderr:\n{proc.stderr}"
    return json.loads(lines[-1])


def max_abs_diff(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, f"shapes differ: {a.shape} vs {b.shape}"
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def modules_loaded_by(code: str, prefixes: tuple[str, ...]) -> list[str]:
    """The modules starting with one of ``prefixes`` that running ``code`` in a fresh interpreter loads.

    For "``--help`` stays light" checks: what a command imports before it does any work.
    """
    script = f"import sys\n{code}\nprint(sorted(m for m in sys.modules if m.startswith({prefixes!r})))\n"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1].replace("'", '"'))


def stop_process(process: subprocess.Popen, timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL if ``process`` is still there after ``timeout`` seconds; reaped either way."""
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout)


def reason_of(call: Callable[[], object]) -> str:
    """The reason of the ``ProtocolError`` that ``call()`` raises (and fails if it raises none)."""
    from edge_client.errors import ProtocolError

    with pytest.raises(ProtocolError) as info:
        call()
    return info.value.reason
