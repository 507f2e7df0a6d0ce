"""MNIST: a small real subset shipped in the package, or the full set from a path.

The bundled subset (6,000 training and 1,000 test images, 600 and 100 per
class, drawn with a fixed seed from Keras' ``mnist.npz``) lets the default
emulation run offline on a fresh machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from edge_client.data import load_npz, prepare_for_model
from edge_client.manifest import Manifest

BUNDLED = "mnist_small.npz"


@dataclass(frozen=True)
class Dataset:
    """Train and test splits, images as uint8 ``[N, 28, 28]``, labels as uint8."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def _read_npz(source) -> Dataset:
    with np.load(source) as data:
        missing = {"x_train", "y_train", "x_test", "y_test"} - set(data.files)
        if missing:
            raise ValueError(f"{source}: not in Keras' mnist.npz format (missing {sorted(missing)})")
        return Dataset(data["x_train"], data["y_train"], data["x_test"], data["y_test"])


def load_bundled_mnist() -> Dataset:
    """The small MNIST subset that ships with litefed."""
    with resources.files("coordinator.data").joinpath(BUNDLED).open("rb") as f:
        return _read_npz(f)


def load_mnist(path: str | Path) -> Dataset:
    """Full MNIST from a file in Keras' ``mnist.npz`` format."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"MNIST file {path} not found (expected Keras' mnist.npz format)")
    return _read_npz(path)


def to_model_input(images: np.ndarray) -> np.ndarray:
    """uint8 ``[N, 28, 28]`` -> float32 ``[N, 28, 28, 1]`` in [0, 1]."""
    return (np.asarray(images, np.float32) / 255.0)[..., None]


def load_test_set(spec: str, manifest: Manifest) -> tuple[np.ndarray, np.ndarray]:
    """A held-out set for server-side evaluation, shaped for ``manifest``.

    ``spec`` is ``mnist-small`` (the bundled test split), or an ``.npz`` file
    with ``x``/``y`` or ``x_test``/``y_test`` arrays. uint8 inputs are
    scaled to [0, 1], as the training data of the bundled models is.
    """
    if spec == "mnist-small":
        data = load_bundled_mnist()
        x, y = data.x_test, data.y_test
    else:
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"test set {spec!r}: no such file (use mnist-small or an .npz path)")
        with np.load(path, allow_pickle=False) as archive:
            keys = ("x_test", "y_test") if "x_test" in archive.files else ("x", "y")
            x, y = load_npz(path, *keys)
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / 255.0
    return prepare_for_model(x, y, manifest)
