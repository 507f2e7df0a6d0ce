"""MNIST loaders: the bundled subset, a path, the Keras cache, and test sets for a model."""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.datasets import load_bundled_mnist, load_mnist, load_test_set
from tests.helpers import MNIST_PATH


def test_bundled_subset_is_balanced_real_mnist():
    data = load_bundled_mnist()
    assert data.x_train.shape == (6000, 28, 28) and data.x_test.shape == (1000, 28, 28)
    assert data.x_train.dtype == np.uint8 and data.x_train.max() == 255
    assert np.bincount(data.y_train).tolist() == [600] * 10
    assert np.bincount(data.y_test).tolist() == [100] * 10


def test_full_mnist_from_a_path():
    data = load_mnist(MNIST_PATH)
    assert data.x_train.shape == (60000, 28, 28) and data.x_test.shape == (10000, 28, 28)


def test_full_mnist_from_the_keras_cache(tmp_path, monkeypatch):
    cache = tmp_path / "datasets"
    cache.mkdir()
    x = np.zeros((3, 28, 28), np.uint8)
    np.savez(cache / "mnist.npz", x_train=x, y_train=np.arange(3), x_test=x[:1], y_test=np.arange(1))
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    assert load_mnist().x_train.shape == (3, 28, 28)


def test_missing_file_and_wrong_format_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="mnist.npz"):
        load_mnist(tmp_path / "nope.npz")
    np.savez(tmp_path / "other.npz", a=np.zeros(2))
    with pytest.raises(ValueError, match="missing"):
        load_mnist(tmp_path / "other.npz")


def test_test_sets_are_shaped_and_scaled_for_the_model(mnist_cnn, tmp_path):
    x, y = load_test_set("mnist-small", mnist_cnn.manifest)
    assert x.shape == (1000, 28, 28, 1) and x.dtype == np.float32 and x.min() >= 0 and x.max() <= 1
    assert y.dtype == np.int32 and set(np.unique(y)) == set(range(10))
    np.savez(tmp_path / "t.npz", x=(np.ones((5, 28, 28)) * 255).astype(np.uint8), y=np.arange(5))
    x, y = load_test_set(str(tmp_path / "t.npz"), mnist_cnn.manifest)
    assert x.shape == (5, 28, 28, 1) and np.all(x == 1.0)
    with pytest.raises(FileNotFoundError, match="mnist-small"):
        load_test_set(str(tmp_path / "missing.npz"), mnist_cnn.manifest)
