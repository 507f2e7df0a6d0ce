"""The ``litefed-convert`` command line."""

from __future__ import annotations

import json
import shutil
import subprocess
import textwrap

import keras
import pytest

from converter.cli import main
from edge_client.manifest import load_manifest
from edge_client.model_file import sha256_hex

TINY_MODEL = textwrap.dedent(
    """
    import keras

    def build():
        return keras.Sequential([keras.Input((6,)), keras.layers.Dense(4, activation="relu"), keras.layers.Dense(3)])

    def not_a_model():
        return 42
    """
)


@pytest.fixture()
def model_file(tmp_path):
    path = tmp_path / "tiny.py"
    path.write_text(TINY_MODEL)
    return path


def test_help_explains_spec_forms_and_runs_without_tensorflow_import():
    exe = shutil.which("litefed-convert")
    assert exe, "litefed-convert is not installed; run scripts/setup.sh"
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60, check=True).stdout
    for expected in ("SPEC", ".keras", "file.py:function", "--batch-size", "--loss", "--optimizer", "examples:"):
        assert expected in out


def test_converts_a_function_spec_with_flags(model_file, tmp_path, capsys):
    out = tmp_path / "out" / "tiny.tflite"
    code = main(
        [
            f"{model_file}:build",
            "-o",
            str(out),
            "--batch-size",
            "5",
            "--loss",
            "sparse_categorical_crossentropy",
            "--from-logits",
            "--optimizer",
            "adam",
            "--learning-rate",
            "0.003",
        ]
    )
    assert code == 0
    manifest = load_manifest(out.with_suffix(".json"))
    assert manifest.model_sha256 == sha256_hex(out.read_bytes())
    assert manifest.batch_size == 5 and manifest.input.shape == (5, 6)
    assert manifest.loss == {"name": "sparse_categorical_crossentropy", "from_logits": True}
    assert manifest.optimizer["name"] == "adam" and manifest.optimizer["learning_rate"] == pytest.approx(0.003)
    assert manifest.verification["loss_max_abs_diff"] <= 1e-4
    assert "verified 3 train steps" in capsys.readouterr().out


def test_keras_file_uses_its_compiled_loss_and_optimizer(tmp_path):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, activation="sigmoid")])
    model.compile(loss="binary_crossentropy", optimizer=keras.optimizers.SGD(0.3, momentum=0.5))
    saved = tmp_path / "clf.keras"
    model.save(saved)
    out = tmp_path / "clf.tflite"
    assert main([str(saved), "-o", str(out), "--batch-size", "2", "--quiet"]) == 0
    manifest = json.loads(out.with_suffix(".json").read_text())
    assert manifest["loss"]["name"] == "binary_crossentropy"
    assert manifest["optimizer"] == {"name": "sgd", "learning_rate": 0.3, "momentum": 0.5, "nesterov": False}


@pytest.mark.parametrize(
    ("spec_suffix", "extra", "message"),
    [
        (":build", [], "--loss"),  # uncompiled and no --loss given
        (":not_a_model", [], "not a keras.Model"),
        (":missing", [], "has no function 'missing'"),
    ],
)
def test_errors_are_one_clear_line_and_exit_1(model_file, tmp_path, capsys, spec_suffix, extra, message):
    out = tmp_path / "x.tflite"
    assert main([f"{model_file}{spec_suffix}", "-o", str(out), "--batch-size", "2", *extra]) == 1
    err = capsys.readouterr().err
    assert err.startswith("litefed-convert: error:") and message in err
    assert not out.exists()


def test_missing_keras_file_is_reported(tmp_path, capsys):
    assert main([str(tmp_path / "nope.keras"), "-o", str(tmp_path / "x.tflite"), "--batch-size", "2"]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_bad_batch_size_is_rejected(model_file, tmp_path, capsys):
    assert (
        main(
            [
                f"{model_file}:build",
                "-o",
                str(tmp_path / "x.tflite"),
                "--batch-size",
                "0",
                "--loss",
                "mean_squared_error",
            ]
        )
        == 1
    )
    assert "batch size" in capsys.readouterr().err
