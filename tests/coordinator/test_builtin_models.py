"""The built-in model cache never hands out a model converted by an older litefed."""

from __future__ import annotations

import json
import shutil

import pytest

import converter
from coordinator.builtin_models import builtin_model
from edge_client import __version__
from edge_client.manifest import FORMAT_VERSION


@pytest.fixture
def conversions(monkeypatch):
    """Records conversions instead of running TensorFlow (the cache logic is under test, not the converter)."""
    calls = []
    monkeypatch.setattr(converter, "convert", lambda spec, path, config, log=None: calls.append((spec, path)))
    return calls


def _cache_entry(tabular, cache, format_version: int):
    name = f"mnist_cnn-b32-v{__version__}-f{FORMAT_VERSION}.tflite"
    target = cache / name
    cache.mkdir(parents=True, exist_ok=True)
    shutil.copy(tabular.model_path, target)
    manifest = json.loads(tabular.manifest_path.read_text())
    manifest["format_version"] = format_version
    target.with_suffix(".json").write_text(json.dumps(manifest))
    return target


def test_the_cache_key_names_the_manifest_format(tmp_path, conversions):
    path = builtin_model("mnist_cnn", 32, cache=tmp_path)
    assert path.name.endswith(f"-f{FORMAT_VERSION}.tflite") and len(conversions) == 1


def test_a_current_entry_is_reused(tabular, tmp_path, conversions):
    entry = _cache_entry(tabular, tmp_path, FORMAT_VERSION)
    assert builtin_model("mnist_cnn", 32, cache=tmp_path) == entry and conversions == []


def test_an_entry_of_an_older_format_is_converted_again(tabular, tmp_path, conversions):
    entry = _cache_entry(tabular, tmp_path, 1)
    assert builtin_model("mnist_cnn", 32, cache=tmp_path) == entry
    assert conversions == [("converter.zoo:mnist_cnn", entry)]
