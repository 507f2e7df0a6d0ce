"""The state directory: atomic writes, and damaged files ignored rather than fatal."""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import numpy as np
import pytest

from edge_client.errors import StateError
from edge_client.frames import Frame, encode_frame
from edge_client.model_file import sha256_hex
from edge_client.state import (
    ANSWERED_FILE,
    GLOBAL_FILE,
    MANIFEST_FILE,
    MODEL_FILE,
    PENDING_FILE,
    PROGRESS_FILE,
    PendingUpdate,
    Progress,
    StateStore,
)
from edge_client.weights import NamedArray

RUN = "0123456789abcdef"
OTHER_RUN = "fedcba9876543210"


def _weights(manifest, value: float = 0.5) -> list[NamedArray]:
    return [NamedArray(s.name, np.full(s.shape, value, np.float32)) for s in manifest.weights]


def _global(tabular, round: int = 4) -> bytes:
    return encode_frame(Frame("global", round, tabular.manifest.model_sha256, _weights(tabular.manifest)))


def _update(tabular, round: int = 4, run: str = RUN) -> bytes:
    weights = _weights(tabular.manifest, 0.01)
    frame = Frame("update", round, tabular.manifest.model_sha256, weights, client_id="pi-1", num_examples=12, run=run)
    return encode_frame(frame)


def _pending(data: bytes, round: int, sha: str) -> PendingUpdate:
    return PendingUpdate(round, sha, sha256_hex(data), len(data))


def test_store_removes_temporaries_left_by_a_power_loss(tmp_path):
    (tmp_path / ".tmp-global.bin.abc123").write_bytes(b"half a frame")
    StateStore(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_unusable_state_directory_raises_state_error(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(StateError, match="state directory"):
        StateStore(tmp_path / "file" / "state")


def test_write_failure_raises_state_error(tmp_path, monkeypatch):
    store = StateStore(tmp_path)
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(StateError, match="No space left"):
        store.save_global(b"x")


# -- model ---------------------------------------------------------------------------


def test_model_round_trip(tmp_path, tabular):
    store = StateStore(tmp_path)
    assert store.load_model() is None
    store.save_model(tabular.tflite, tabular.manifest.to_json())
    stored = store.load_model()
    assert stored is not None
    assert stored.model == tabular.tflite and stored.sha256 == tabular.manifest.model_sha256
    assert stored.manifest == tabular.manifest


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: (d / MODEL_FILE).write_bytes((d / MODEL_FILE).read_bytes()[:-100]),  # truncated model
        lambda d: (d / MANIFEST_FILE).write_bytes((d / MANIFEST_FILE).read_bytes()[:50]),  # truncated manifest
        lambda d: (d / MANIFEST_FILE).write_text('{"format": "litefed-model"}'),  # not a manifest
        lambda d: (d / MODEL_FILE).unlink(),  # half of the pair
        lambda d: (d / MANIFEST_FILE).write_bytes(b"\xff\xfe"),  # not UTF-8
    ],
    ids=["truncated-model", "truncated-manifest", "bad-manifest", "missing-model", "binary-manifest"],
)
def test_a_damaged_model_is_ignored_with_a_warning(tmp_path, tabular, damage, caplog):
    store = StateStore(tmp_path)
    store.save_model(tabular.tflite, tabular.manifest.to_json())
    damage(tmp_path)
    with caplog.at_level(logging.WARNING, logger="edge_client.state"):
        assert store.load_model() is None
    assert "ignoring the stored model" in caplog.text


def test_model_of_another_manifest_is_ignored(tmp_path, tabular):
    """Power lost between writing model.tflite and model.json: the pair does not match."""
    store = StateStore(tmp_path)
    store.save_model(tabular.tflite, {**tabular.manifest.to_json(), "model_sha256": "cd" * 32})
    assert store.load_model() is None


# -- global weights ------------------------------------------------------------------


def test_global_round_trip_and_validation(tmp_path, tabular):
    store = StateStore(tmp_path)
    assert store.load_global(tabular.manifest) is None
    data = _global(tabular)
    store.save_global(data)
    loaded = store.load_global(tabular.manifest)
    assert loaded is not None and loaded[0] == data and loaded[1].round == 4
    assert store.load_global() is not None  # structurally valid without a manifest
    other_model = dataclasses.replace(tabular.manifest, model_sha256="cd" * 32)
    assert store.load_global(other_model) is None  # weights of another model
    fewer_tensors = dataclasses.replace(tabular.manifest, weights=tabular.manifest.weights[:-1])
    assert store.load_global(fewer_tensors) is None


@pytest.mark.parametrize("cut", [0, 3, 20, -1])
def test_a_truncated_global_frame_is_ignored(tmp_path, tabular, cut, caplog):
    store = StateStore(tmp_path)
    data = _global(tabular)
    (tmp_path / GLOBAL_FILE).write_bytes(data[:cut])
    with caplog.at_level(logging.WARNING, logger="edge_client.state"):
        assert store.load_global(tabular.manifest) is None
    assert "ignoring the stored global weights" in caplog.text


def test_an_update_frame_is_not_a_global_frame(tmp_path, tabular):
    store = StateStore(tmp_path)
    store.save_global(_update(tabular))
    assert store.load_global(tabular.manifest) is None
    assert store.load_global() is None


# -- progress and the pending update -------------------------------------------------


def test_progress_and_pending_round_trip(tmp_path, tabular):
    store = StateStore(tmp_path)
    assert store.load_progress() == Progress()
    sha = tabular.manifest.model_sha256
    data = _update(tabular)
    progress = Progress(sha, trained_round=4, acked_round=3, pending=_pending(data, 4, sha), run=RUN)
    store.save_progress(progress, data)
    assert store.load_progress() == progress
    assert store.load_pending(progress, tabular.manifest) == data

    done = Progress(sha, trained_round=4, acked_round=4, run=RUN)
    store.save_progress(done)
    assert store.load_progress() == done
    assert not (tmp_path / PENDING_FILE).exists()


def test_an_acknowledged_update_is_kept_as_answered_until_its_round_closes(tmp_path, tabular):
    store = StateStore(tmp_path)
    sha = tabular.manifest.model_sha256
    data = _update(tabular)
    pending = _pending(data, 4, sha)
    store.save_progress(Progress(sha, 4, 3, pending, RUN), data)
    store.keep_pending_as_answered()
    acked = Progress(sha, 4, 4, None, RUN, answered=dataclasses.replace(pending, deadline=1_700_000_123.25))
    store.save_progress(acked)
    assert not (tmp_path / PENDING_FILE).exists() and (tmp_path / ANSWERED_FILE).read_bytes() == data
    assert store.load_progress() == acked, "the deadline it answered travels too"
    assert store.load_answered(acked, tabular.manifest) == data
    assert store.load_pending(acked, tabular.manifest) is None
    store.keep_pending_as_answered()  # nothing left to rename: a no-op
    store.save_progress(dataclasses.replace(acked, answered=None))  # a later round: its round has closed
    assert not (tmp_path / ANSWERED_FILE).exists()


def test_a_rename_cut_short_by_a_power_loss_loses_nothing(tmp_path, tabular):
    store = StateStore(tmp_path)
    sha = tabular.manifest.model_sha256
    data = _update(tabular)
    pending = Progress(sha, 4, 3, _pending(data, 4, sha), RUN)
    store.save_progress(pending, data)
    store.keep_pending_as_answered()  # ... and the power went before progress.json said "answered"
    assert store.load_progress() == pending
    assert store.load_pending(pending, tabular.manifest) == data, "found in answered.bin"
    (tmp_path / ANSWERED_FILE).rename(tmp_path / PENDING_FILE)
    answered = Progress(sha, 4, 4, None, RUN, answered=_pending(data, 4, sha))
    assert store.load_answered(answered, tabular.manifest) == data, "found in pending.bin"


def test_a_damaged_answered_record_is_ignored(tmp_path, tabular, caplog):
    store = StateStore(tmp_path)
    sha = tabular.manifest.model_sha256
    data = _update(tabular)
    answered = Progress(sha, 4, 4, None, RUN, answered=_pending(data, 4, sha))
    with caplog.at_level(logging.WARNING, logger="edge_client.state"):
        assert store.load_answered(answered, tabular.manifest) is None
        assert "acknowledged update of round 4" in caplog.text and "missing" in caplog.text
        (tmp_path / ANSWERED_FILE).write_bytes(data[:-1])
        assert store.load_answered(answered, tabular.manifest) is None
    obj = answered.to_json()
    obj["answered"]["deadline"] = "soon"
    (tmp_path / PROGRESS_FILE).write_text(json.dumps(obj))
    assert store.load_progress() == Progress()


def test_progress_of_version_2_has_no_answered_update(tmp_path, tabular):
    store = StateStore(tmp_path)
    obj = Progress(tabular.manifest.model_sha256, 2, 2, None, RUN).to_json()
    obj.update(version=2, answered={"round": 2, "model_sha256": "x", "sha256": "y", "size": 1})
    (tmp_path / PROGRESS_FILE).write_text(json.dumps(obj))
    assert store.load_progress() == Progress(tabular.manifest.model_sha256, 2, 2, None, RUN)


def test_pending_bytes_must_match_progress(tmp_path, tabular):
    store = StateStore(tmp_path)
    sha = tabular.manifest.model_sha256
    with pytest.raises(ValueError):
        store.save_progress(Progress(sha, 4, None, _pending(b"other", 4, sha)), _update(tabular))


@pytest.mark.parametrize(
    "content",
    [b"", b"{", b"[]", b'{"version": 1, "model_sha256": 5}', b'{"version": 2}', b'{"version":1,"trained_round":-1}'],
)
def test_damaged_progress_is_ignored(tmp_path, content, caplog):
    store = StateStore(tmp_path)
    (tmp_path / PROGRESS_FILE).write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="edge_client.state"):
        assert store.load_progress() == Progress()
    assert PROGRESS_FILE in caplog.text


def test_truncated_or_stale_pending_update_is_ignored(tmp_path, tabular):
    store = StateStore(tmp_path)
    sha = tabular.manifest.model_sha256
    data = _update(tabular)
    progress = Progress(sha, 4, None, _pending(data, 4, sha), RUN)
    store.save_progress(progress, data)
    (tmp_path / PENDING_FILE).write_bytes(data[:-10])  # cut short
    assert store.load_pending(progress, tabular.manifest) is None
    (tmp_path / PENDING_FILE).write_bytes(_update(tabular, round=3))  # the previous round's update
    assert store.load_pending(progress, tabular.manifest) is None
    (tmp_path / PENDING_FILE).unlink()
    assert store.load_pending(progress, tabular.manifest) is None


def test_pending_update_of_another_round_is_ignored(tmp_path, tabular):
    """progress.json and pending.bin agree, but the frame inside is not for the named round."""
    store = StateStore(tmp_path)
    sha = tabular.manifest.model_sha256
    data = _update(tabular, round=3)
    progress = Progress(sha, 4, None, _pending(data, 4, sha), RUN)
    store.save_progress(progress, data)
    assert store.load_pending(progress, tabular.manifest) is None
    assert store.load_pending(Progress(sha, 3, None, _pending(data, 3, sha), RUN), tabular.manifest) == data


def test_pending_update_of_another_run_is_ignored(tmp_path, tabular):
    """The same round number in another run is another round: its update is never resent."""
    store = StateStore(tmp_path)
    sha = tabular.manifest.model_sha256
    data = _update(tabular, round=4, run=OTHER_RUN)
    progress = Progress(sha, 4, None, _pending(data, 4, sha), RUN)
    store.save_progress(progress, data)
    assert store.load_pending(progress, tabular.manifest) is None
    assert store.load_pending(dataclasses.replace(progress, run=OTHER_RUN), tabular.manifest) == data


def test_progress_of_protocol_v1_reads_as_belonging_to_no_run(tmp_path, tabular):
    store = StateStore(tmp_path)
    sha = tabular.manifest.model_sha256
    old = f'{{"version": 1, "model_sha256": "{sha}", "trained_round": 9, "acked_round": 9, "pending": null}}'
    (tmp_path / PROGRESS_FILE).write_text(old)
    assert store.load_progress() == Progress(sha, 9, 9, None, run="")


@pytest.mark.parametrize("run", ["../x", "0123456789ABCDEF", "0" * 17, 5, None])
def test_progress_with_a_bad_run_is_damaged(tmp_path, tabular, run, caplog):
    store = StateStore(tmp_path)
    obj = Progress(tabular.manifest.model_sha256, 2, 2, None, RUN).to_json()
    obj["run"] = run
    (tmp_path / PROGRESS_FILE).write_text(json.dumps(obj))
    with caplog.at_level(logging.WARNING, logger="edge_client.state"):
        assert store.load_progress() == Progress()
    assert "damaged" in caplog.text
