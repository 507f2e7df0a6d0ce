"""litefed-coordinator, litefed-emulate and the plots: help, errors, output."""

from __future__ import annotations

import shutil
import signal
import subprocess

import pytest

from coordinator import cli, emulate
from coordinator.plots import plot_rounds


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("litefed-coordinator", ["--model", "--broker", "--min-fit", "--round-timeout", "--test-data", "examples:"]),
        ("litefed-emulate", ["--clients", "--partition", "dirichlet:ALPHA", "--broker", "--data", "examples:"]),
        ("litefed-broker", ["--kind", "--port"]),
        ("litefed-client", ["--config", "--broker", "--client-id", "--data"]),
    ],
)
def test_help_is_installed_and_explains_the_options(command, expected):
    exe = shutil.which(command)
    assert exe, f"{command} is not installed; run scripts/setup.sh"
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60, check=True).stdout
    for word in expected:
        assert word in out, f"{command} --help does not mention {word}"


def test_coordinator_reports_a_missing_model_and_exits_1(tmp_path, capsys):
    before = signal.getsignal(signal.SIGINT)
    assert cli.main(["--model", str(tmp_path / "none.tflite"), "--out", str(tmp_path)]) == 1
    assert signal.getsignal(signal.SIGINT) is before, "main() must give the caller its signal handler back"
    err = capsys.readouterr().err
    assert err.startswith("litefed-coordinator: error:") and "none.json" in err


def test_emulate_refuses_a_bad_partition_spec(capsys):
    with pytest.raises(SystemExit) as info:
        emulate.build_parser().parse_args(["--partition", "dirichlet:-1"])
    assert info.value.code == 2 and "dirichlet" in capsys.readouterr().err


@pytest.mark.parametrize("codec", ["float32", "int8", "int8-channel", "topk:0.01", "topk16:0.1"])
def test_codec_option_takes_every_registered_codec(codec):
    assert cli.build_parser().parse_args(["--model", "m.tflite", "--codec", codec]).codec == codec


@pytest.mark.parametrize("codec", ["pickle", "topk:0", "topk:2"])
def test_codec_option_refuses_unknown_codecs(codec, capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["--model", "m.tflite", "--codec", codec])
    assert "unknown_codec" in capsys.readouterr().err


def test_plot_draws_every_run(tmp_path):
    records = [{"round": r, "test_accuracy": 0.5 + r / 20, "test_loss": 1 / r, "train_loss": 1.2 / r} for r in (1, 2)]
    only_train = [{"round": 1, "test_accuracy": None, "test_loss": None, "train_loss": 0.9}]
    out = plot_rounds({"a": records, "b": records, "c": only_train}, tmp_path / "p.png", "title")
    assert out.read_bytes().startswith(b"\x89PNG") and out.stat().st_size > 10_000
