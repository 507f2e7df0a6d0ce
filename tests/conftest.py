"""Shared fixtures for the litefed tests.

- Session-scoped converted models: the MNIST CNN is converted exactly once
  per session (conversions take seconds, so tests reuse these).
- ``run_without_tensorflow``: runs Python code in a child interpreter in which
  importing ``tensorflow``, ``keras`` or ``tf_keras`` raises ImportError.

TensorFlow and the converter are imported lazily inside the fixtures.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from tests.helpers import BLOCK_TENSORFLOW, MNIST_PATH, REPO_ROOT, Converted, build_small_cnn  # noqa: E402

TABULAR_BATCH = 16
SMALL_BATCH = 4


def _convert_and_save(keras_model, config, directory: Path) -> Converted:
    from converter import convert_model

    converted = convert_model(keras_model, config)
    model_path, manifest_path = converted.save(directory / f"{keras_model.name}.tflite")
    return Converted(keras_model, converted, model_path, manifest_path)


@pytest.fixture(scope="session")
def mnist_cnn(tmp_path_factory) -> Converted:
    """The McMahan MNIST CNN, batch 32, converted once with verification on."""
    import keras

    from converter import ConvertConfig, zoo

    keras.utils.set_random_seed(0)
    config = ConvertConfig(batch_size=32, verify=True)
    return _convert_and_save(zoo.mnist_cnn(), config, tmp_path_factory.mktemp("mnist"))


@pytest.fixture(scope="session")
def tabular(tmp_path_factory) -> Converted:
    """The zoo's Dense-only binary classifier (8 features, BCE, Adam), verified."""
    import keras

    from converter import ConvertConfig, zoo

    keras.utils.set_random_seed(1)
    config = ConvertConfig(batch_size=TABULAR_BATCH, verify=True)
    return _convert_and_save(zoo.tabular_binary(num_features=8), config, tmp_path_factory.mktemp("tabular"))


@pytest.fixture(scope="session")
def small_cnn(tmp_path_factory) -> Converted:
    """A tiny multiclass CNN with batch size 4 (SGD momentum 0.9), not verified."""
    from converter import ConvertConfig

    config = ConvertConfig(batch_size=SMALL_BATCH, verify=False)
    return _convert_and_save(build_small_cnn(seed=2), config, tmp_path_factory.mktemp("small_cnn"))


@pytest.fixture(scope="session")
def mnist_data() -> dict[str, np.ndarray]:
    """The first 2,000 MNIST training images as float32 in [0, 1], NHWC, int32 labels."""
    assert MNIST_PATH.is_file(), f"MNIST data expected at {MNIST_PATH} (shared/data beside the repo)"
    with np.load(MNIST_PATH) as data:
        x = data["x_train"][:2000].astype(np.float32)[..., None] / 255.0
        y = data["y_train"][:2000].astype(np.int32)
    return {"x": x, "y": y}


@pytest.fixture(scope="session")
def run_without_tensorflow() -> Callable[..., subprocess.CompletedProcess]:
    """Run ``code`` (plus argv ``args``) in a child Python with TensorFlow blocked."""

    def run(code: str, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
        return subprocess.run(
            [sys.executable, "-c", BLOCK_TENSORFLOW + "\n" + code, *args],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    return run


@pytest.fixture(scope="session")
def flex_model() -> bytes:
    """A model that needs SELECT_TF_OPS: TensorFlow's own ReluGrad kernel."""

    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec([4], tf.float32), tf.TensorSpec([4], tf.float32)])
    def relu_grad(dy, x):
        return {"dx": tf.raw_ops.ReluGrad(gradients=dy, features=x) * 2.0}

    converter = tf.lite.TFLiteConverter.from_concrete_functions([relu_grad.get_concrete_function()], relu_grad)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS, tf.lite.OpsSet.SELECT_TF_OPS]
    return converter.convert()
