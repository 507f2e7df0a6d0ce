"""A short run of scripts/fuzz_decoders.py in the suite; the 100,000-input run is in docs/benchmarks.md."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from tests.helpers import REPO_ROOT


@pytest.fixture(scope="module")
def fuzzer():
    spec = importlib.util.spec_from_file_location("fuzz_decoders", REPO_ROOT / "scripts" / "fuzz_decoders.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["fuzz_decoders"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("fuzz_decoders", None)


def test_a_short_fuzz_run_finds_nothing_and_reaches_past_the_checksums(fuzzer):
    report = fuzzer.fuzz(4000, seed=1)
    assert report.findings == [], report.findings[0]
    assert report.total == 4000 and set(report.inputs) == {"frame", "chunks", "message", "envelope"}
    # CRC-fixed mutations get past magic and checksum into the header, the codecs and the tensors.
    assert {"bad_header", "bad_json", "bad_chunk", "bad_signature", "unsigned"} <= set(report.reasons)
    assert report.accepted["chunks"] > 0 and report.accepted["message"] > 0


def test_an_exception_other_than_the_protocol_error_is_a_finding(fuzzer, monkeypatch):
    def broken(data: bytes) -> None:
        raise ValueError("a decoder bug")

    monkeypatch.setattr(fuzzer, "_decode_message", broken)
    report = fuzzer.fuzz(200, seed=2)
    assert report.findings and all("ValueError: a decoder bug" in f for f in report.findings)
    assert fuzzer.main(["--inputs", "50"]) == 1
