"""The ``litefed-convert`` command line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import textwrap

import keras
import pytest

from converter.cli import main
from edge_client.manifest import load_manifest
from edge_client.model_file import sha256_hex
from tests.blockers import blocked_env

TENSORFLOW_FAMILY = ("tensorflow", "keras", "tf_keras")
# How each of litefed-convert's own lines starts; TensorFlow's, absl's and LiteRT's do not.
OWN_LINES = ("loading ", "lowered ", "verified ", "wrote ", "done in ")

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


@pytest.fixture(scope="module")
def exe() -> str:
    found = shutil.which("litefed-convert")
    assert found, "litefed-convert is not installed; run scripts/setup.sh"
    return found


def test_help_explains_spec_forms_and_never_imports_tensorflow(exe, tmp_path):
    attempts = tmp_path / "attempts.txt"
    env = blocked_env(tmp_path / "site", TENSORFLOW_FAMILY, attempts)
    done = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    for expected in ("SPEC", ".keras", "file.py:function", "--batch-size", "--loss", "--optimizer", "examples:"):
        assert expected in done.stdout
    assert done.stderr == ""
    assert not attempts.exists(), f"--help tried to import {attempts.read_text().split()}"


def test_without_tensorflow_says_which_extra_to_install(exe, model_file, tmp_path):
    env = blocked_env(tmp_path / "site", TENSORFLOW_FAMILY)
    out = tmp_path / "x.tflite"
    done = subprocess.run(
        [exe, f"{model_file}:build", "-o", str(out), "--batch-size", "2"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        "litefed-convert: error: the converter needs TensorFlow: pip install 'litefed[converter]'"
    ]
    assert not out.exists()


@pytest.mark.slow  # a whole conversion with verification
def test_a_conversion_prints_only_litefeds_own_lines(exe, model_file, tmp_path):
    # Verification included: it runs LiteRT, which announces its XNNPACK delegate on stderr.
    out = tmp_path / "tiny.tflite"
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}  # as in a user's shell
    done = subprocess.run(
        [exe, f"{model_file}:build", "-o", str(out), "--batch-size", "4", "--loss", "mean_squared_error",
         "--verify-steps", "1"],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    lines = done.stdout.splitlines()
    assert [line for line in lines if not line.startswith(OWN_LINES)] == []
    assert lines[0].startswith("loading ") and lines[-1].startswith("done in "), lines
    assert any(line.startswith("verified 1 train steps") for line in lines), lines
    assert len(lines) == len(OWN_LINES), lines
    assert load_manifest(out.with_suffix(".json")).batch_size == 4


@pytest.mark.slow  # a whole conversion with verification
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


@pytest.mark.slow  # a whole conversion with verification
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
