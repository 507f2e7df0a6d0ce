"""The checks the converter relies on can actually fail."""

from __future__ import annotations

import pytest

from converter import ConvertConfig, VerificationError, convert_model
from converter.optimizers import OptimizerConfig
from converter.verify import verify_against_keras
from edge_client.errors import ModelFileError
from edge_client.model_file import require_builtin_only, summarize_operators
from tests.helpers import build_small_cnn


def test_flex_op_is_listed_as_custom(flex_model):
    summary = summarize_operators(flex_model)
    assert summary.custom == ("FlexReluGrad",)
    assert not summary.is_builtin_only
    assert "MUL" in summary.builtin


def test_require_builtin_only_names_the_flex_op(flex_model):
    with pytest.raises(ModelFileError, match="FlexReluGrad"):
        require_builtin_only(flex_model)


@pytest.mark.parametrize("verify", [True, False], ids=["verify", "no_verify"])
def test_convert_model_refuses_a_flex_model(flex_model, monkeypatch, verify):
    """Whatever TensorFlow's converter emits, a Flex op never reaches the output."""
    import converter.api

    monkeypatch.setattr(converter.api, "to_tflite", lambda module, workdir: flex_model)
    with pytest.raises(VerificationError, match="FlexReluGrad"):
        convert_model(build_small_cnn(seed=3), ConvertConfig(batch_size=4, verify=verify))


def test_verification_passes_for_the_converted_model(small_cnn):
    report = verify_against_keras(
        small_cnn.keras_model, small_cnn.tflite, small_cnn.manifest, OptimizerConfig("sgd", 0.05, momentum=0.9)
    )
    assert report.worst <= 1e-4
    assert report.steps == 3


def test_verification_fails_against_a_model_with_other_weights(small_cnn):
    other = build_small_cnn(seed=999)  # same architecture and names, other weights
    with pytest.raises(VerificationError, match="differs from TensorFlow"):
        verify_against_keras(other, small_cnn.tflite, small_cnn.manifest, OptimizerConfig("sgd", 0.05, momentum=0.9))


def test_verification_fails_with_another_optimizer(small_cnn):
    """Same weights, but the reference uses Adam: the SGD graph must not pass."""
    with pytest.raises(VerificationError):
        verify_against_keras(small_cnn.keras_model, small_cnn.tflite, small_cnn.manifest, OptimizerConfig("adam", 0.05))
