"""The one durable, atomic write (edge_client.durable), and that every kept file goes through it."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest

from edge_client import durable
from edge_client.durable import atomic_write
from edge_client.weights import NamedArray


def test_atomic_write_replaces_content(tmp_path):
    target = tmp_path / "f.bin"
    atomic_write(target, b"one")
    atomic_write(target, b"two")
    assert target.read_bytes() == b"two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    atomic_write(target, b"old")

    def crash(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        atomic_write(target, b"new")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


def test_the_file_and_then_its_directory_are_fsynced(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def record(fd):
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", record)
    atomic_write(tmp_path / "f.bin", b"data")
    assert synced == ["file", "dir"]


def test_every_kept_file_is_written_by_the_one_helper(tmp_path, monkeypatch, tabular):
    """Checkpoint, manifest and converted model: each write goes through atomic_write."""
    from coordinator.checkpoint import ServerState, save_checkpoint
    from edge_client.manifest import load_manifest, save_manifest

    written = []
    real = durable.atomic_write

    def spy(path, data):
        written.append(os.path.basename(path))
        real(path, data)

    for module in ("coordinator.checkpoint", "edge_client.manifest", "edge_client.state", "converter.api"):
        monkeypatch.setattr(f"{module}.atomic_write", spy)
    manifest = load_manifest(tabular.manifest_path)
    save_manifest(manifest, tmp_path / "m.json")
    weights = [NamedArray(spec.name, np.zeros(spec.shape, spec.dtype)) for spec in manifest.weights]
    save_checkpoint(tmp_path / "ckpt", manifest.model_sha256, ServerState(1, weights))
    tabular.converted.save(tmp_path / "model.tflite")
    assert "m.json" in written and "checkpoint.json" in written and "global-000001.bin" in written
    assert "model.tflite" in written and "model.json" in written
    assert list(tmp_path.rglob(durable.TMP_PREFIX + "*")) == []
