"""MNIST: a small real subset shipped in the package, or the full set from a path.

The bundled subset (6,000 training and 1,000 test images, 600 and 100 per
class, drawn with a fixed seed from Keras' ``mnist.npz``) lets the default
emulation run offline on a fresh machine.
"""

from __future__ import annotations

import os
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


def keras_cache_path() -> Path:
    """Where Keras keeps ``mnist.npz`` (``$KERAS_HOME`` or ``~/.keras``)."""
    return Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras") / "datasets" / "mnist.npz"


def load_mnist(path: str | Path | None = None) -> Dataset:
    """Full MNIST in Keras' ``mnist.npz`` format.

    From ``path`` when given; else from the Keras cache; else downloaded
    through Keras (needs TensorFlow and a network, and fills the cache).
    """
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"MNIST file {path} not found (expected Keras' mnist.npz format)")
        return _read_npz(path)
    cached = keras_cache_path()
    if cached.is_file():
        return _read_npz(cached)
    try:
        import keras
    except ImportError as exc:
        raise FileNotFoundError(
            f"MNIST is not in the Keras cache ({cached}) and Keras is not installed to download it; "
            "pass the path of an mnist.npz, or use the bundled subset (mnist-small)"
        ) from exc
    (x_train, y_train), (x_test, y_test) = keras.datasets.mnist.load_data()
    return Dataset(x_train, y_train, x_test, y_test)


def to_model_input(images: np.ndarray) -> np.ndarray:
    """uint8 ``[N, 28, 28]`` -> float32 ``[N, 28, 28, 1]`` in [0, 1]."""
    return (np.asarray(images, np.float32) / 255.0)[..., None]


def load_test_set(spec: str, manifest: Manifest) -> tuple[np.ndarray, np.ndarray]:
    """A held-out set for server-side evaluation, shaped for ``manifest``.

    ``spec`` is ``mnist-small`` (the bundled test split), ``mnist`` (the full
    test split, see :func:`load_mnist`), or an ``.npz`` file
    with ``x``/``y`` or ``x_test``/``y_test`` arrays. uint8 inputs are
    scaled to [0, 1], as the training data of the bundled models is.
    """
    return _load_split(spec, "test", manifest, "test set")


def load_training_data(spec: str, manifest: Manifest) -> tuple[np.ndarray, np.ndarray, str | None]:
    """``(x, y, test_spec)`` for ``--data``: mnist-small, mnist, or an ``.npz`` file
    with ``x``/``y`` or ``x_train``/``y_train`` arrays.

    ``test_spec`` names the held-out split of the same source, or is None
    when the file has none. uint8 inputs are scaled to [0, 1].
    """
    x, y = _load_split(spec, "train", manifest, "training data")
    test = spec if spec in ("mnist-small", "mnist") or _holds(Path(spec), "x_test") else None
    return x, y, test


def _load_split(spec: str, split: str, manifest: Manifest, what: str) -> tuple[np.ndarray, np.ndarray]:
    """The ``split`` ("train" or "test") of MNIST or of an ``.npz`` file, scaled and shaped for ``manifest``."""
    if spec in ("mnist-small", "mnist"):
        data = load_bundled_mnist() if spec == "mnist-small" else load_mnist()
        x, y = (data.x_train, data.y_train) if split == "train" else (data.x_test, data.y_test)
    else:
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"{what} {spec!r}: no such file (use mnist-small, mnist or an .npz path)")
        keys = (f"x_{split}", f"y_{split}") if _holds(path, f"x_{split}") else ("x", "y")
        x, y = load_npz(path, *keys)
    return prepare_for_model(x, y, manifest)  # scales uint8 pixels to [0, 1], exactly as a board does


def _holds(path: Path, key: str) -> bool:
    """Whether the ``.npz`` at ``path`` has array ``key`` (False for an unreadable file: load_npz says why)."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            return key in archive.files
    except (OSError, ValueError):
        return False
