"""Model and global-weights synchronisation alone: retained messages in any order, no broker, no LiteRT.

The model is the hand-written tiny model of conftest.py, "loaded" by a fake
loader; the state directory is real.
"""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import pytest

from edge_client.chunks import split
from edge_client.errors import ProtocolError
from edge_client.frames import Frame, encode_frame
from edge_client.model_sync import ModelSync, SyncHooks
from edge_client.state import StateStore
from edge_client.weights import NamedArray

RUN = "1111111111111111"
OTHER_RUN = "2222222222222222"
CHUNK = 256


class FakeModel:
    def __init__(self, model: bytes, manifest):
        self.model, self.manifest = model, manifest


class Recorder:
    """The hooks' calls, in order, and the ignored messages."""

    def __init__(self) -> None:
        self.events: list[tuple] = []
        self.ignored: list[tuple] = []

    def hooks(self) -> SyncHooks:
        return SyncHooks(
            model_installed=lambda manifest, previous, persist: self.events.append(
                ("model", manifest.model_sha256, previous, persist)
            ),
            global_arrived=lambda frame: self.events.append(("arrived", frame.round, frame.run)),
            global_kept=lambda frame: self.events.append(("kept", frame.round, frame.run)),
        )

    def ignore(self, key, message: str, level: int = logging.INFO) -> None:
        self.ignored.append(key)


@pytest.fixture
def rec() -> Recorder:
    return Recorder()


def make_sync(tmp_path, rec: Recorder, load=FakeModel, **kw) -> ModelSync:
    return ModelSync(StateStore(tmp_path / "state"), load, rec.hooks(), ignore=rec.ignore, **kw)


def feed_model(sync: ModelSync, model: bytes) -> None:
    for chunk in split(model, CHUNK):
        sync.on_model_chunk(chunk)


def feed_global(sync: ModelSync, frame: bytes) -> None:
    for chunk in split(frame, CHUNK):
        sync.on_global_chunk(chunk)


def installed(tmp_path, rec: Recorder, tiny) -> ModelSync:
    sync = make_sync(tmp_path, rec)
    sync.on_model_meta(tiny.meta(CHUNK).to_bytes())
    feed_model(sync, tiny.model)
    assert sync.model_sha256 == tiny.sha
    return sync


# -- the model -------------------------------------------------------------------------


def test_meta_then_chunks_installs_and_stores_the_model(tmp_path, rec, tiny):
    sync = installed(tmp_path, rec, tiny)
    assert isinstance(sync.model, FakeModel) and sync.model.model == tiny.model
    assert sync.manifest == tiny.manifest
    assert rec.events == [("model", tiny.sha, None, True)]
    stored = sync.store.load_model()
    assert stored is not None and stored.model == tiny.model and stored.manifest == tiny.manifest


def test_chunks_before_meta_wait_for_it(tmp_path, rec, tiny):
    sync = make_sync(tmp_path, rec)
    feed_model(sync, tiny.model)
    assert sync.model is None and rec.events == []
    sync.on_model_meta(tiny.meta(CHUNK).to_bytes())
    assert sync.model_sha256 == tiny.sha and rec.events == [("model", tiny.sha, None, True)]


def test_replayed_chunks_and_meta_of_the_model_in_use_change_nothing(tmp_path, rec, tiny):
    sync = installed(tmp_path, rec, tiny)
    model = sync.model
    sync.on_model_meta(tiny.meta(CHUNK).to_bytes())
    feed_model(sync, tiny.model)
    assert sync.model is model and len(rec.events) == 1
    assert sync.reassembler.pending_bytes == 0, "chunks of the model in use are not even collected"


def test_a_new_model_replaces_the_old_and_drops_its_global_weights(tmp_path, rec, tiny, make_tiny):
    sync = installed(tmp_path, rec, tiny)
    feed_global(sync, tiny.global_frame(1, RUN))
    assert sync.global_frame is not None
    other = make_tiny(b"another graph " * 30, "other")
    sync.on_model_meta(other.meta(CHUNK).to_bytes())
    feed_model(sync, other.model)
    assert sync.model_sha256 == other.sha and sync.global_frame is None
    assert rec.events[-1] == ("model", other.sha, tiny.sha, True)


@pytest.mark.parametrize(
    "changes, reason",
    [
        (dict(model_sha256="AB" * 32), "bad_sha256"),
        (dict(model_sha256="ab" * 31), "bad_sha256"),
        (dict(manifest={"format": "nope"}), "bad_json"),
        (dict(model_sha256="cd" * 32), "manifest_mismatch"),
        (dict(size=(64 << 20) + 1), "too_large"),
    ],
    ids=["upper_case", "short", "bad_manifest", "other_models_manifest", "too_large"],
)
def test_bad_model_meta_is_refused(tmp_path, rec, tiny, changes, reason):
    sync = make_sync(tmp_path, rec)
    with pytest.raises(ProtocolError) as info:
        sync.on_model_meta(tiny.meta(CHUNK, **changes).to_bytes())
    assert info.value.reason == reason
    feed_model(sync, tiny.model)
    assert sync.meta is None and sync.model is None, "a refused meta announces nothing"


@pytest.mark.parametrize("meta_first", [True, False], ids=["meta_first", "chunks_first"])
def test_a_model_whose_size_differs_from_its_meta_is_refused(tmp_path, rec, tiny, meta_first):
    sync = make_sync(tmp_path, rec)
    meta = tiny.meta(CHUNK, size=len(tiny.model) + 1).to_bytes()
    with pytest.raises(ProtocolError) as info:
        if meta_first:
            sync.on_model_meta(meta)
            feed_model(sync, tiny.model)
        else:
            feed_model(sync, tiny.model)
            sync.on_model_meta(meta)
    assert info.value.reason == "size_mismatch"
    assert sync.model is None and rec.events == [] and sync.store.load_model() is None


def test_a_model_that_cannot_be_loaded_is_bad_model(tmp_path, rec, tiny):
    def broken(model, manifest):
        raise ValueError("not a flatbuffer")

    sync = make_sync(tmp_path, rec, load=broken)
    sync.on_model_meta(tiny.meta(CHUNK).to_bytes())
    with pytest.raises(ProtocolError) as info:
        feed_model(sync, tiny.model)
    assert info.value.reason == "bad_model" and "not a flatbuffer" in str(info.value)
    assert sync.model is None and sync.store.load_model() is None


# -- global weights ----------------------------------------------------------------------


def test_global_weights_are_kept_stored_and_reported(tmp_path, rec, tiny):
    sync = installed(tmp_path, rec, tiny)
    frame = tiny.global_frame(2, RUN)
    feed_global(sync, frame)
    assert sync.global_frame is not None and (sync.global_frame.round, sync.global_frame.run) == (2, RUN)
    assert rec.events[1:] == [("arrived", 2, RUN), ("kept", 2, RUN)]
    assert sync.store.load_global(tiny.manifest)[0] == frame
    feed_global(sync, frame)  # replayed: the frame in use
    assert len(rec.events) == 3


def test_older_global_weights_of_the_same_run_are_ignored(tmp_path, rec, tiny):
    sync = installed(tmp_path, rec, tiny)
    feed_global(sync, tiny.global_frame(4, RUN))
    feed_global(sync, tiny.global_frame(3, RUN, value=0.25))
    assert sync.global_frame.round == 4
    assert rec.events[-1] == ("arrived", 3, RUN), "reported (its run may be new), not kept"
    assert rec.ignored == [("stale_round", "global", RUN, 3)]
    feed_global(sync, tiny.global_frame(1, OTHER_RUN))  # another run starts again at round 1
    assert (sync.global_frame.round, sync.global_frame.run) == (1, OTHER_RUN)


def test_global_weights_before_their_model_wait_for_it(tmp_path, rec, tiny):
    sync = make_sync(tmp_path, rec)
    feed_global(sync, tiny.global_frame(2, RUN))
    feed_global(sync, tiny.global_frame(1, RUN))  # older: the round-2 frame stays the one waiting
    assert sync.global_frame is None and rec.events == []
    sync.on_model_meta(tiny.meta(CHUNK).to_bytes())
    feed_model(sync, tiny.model)
    assert rec.events == [("model", tiny.sha, None, True), ("arrived", 2, RUN), ("kept", 2, RUN)]
    assert sync.global_frame.round == 2


def test_waiting_global_weights_that_do_not_fit_the_model_are_counted(tmp_path, rec, tiny):
    rejected: Counter[str] = Counter()
    sync = make_sync(tmp_path, rec, rejected=rejected)
    bad = [NamedArray("dense/kernel", np.zeros((4, 1), np.float32))]  # the bias is missing
    feed_global(sync, encode_frame(Frame("global", 2, tiny.sha, bad, run=RUN)))
    sync.on_model_meta(tiny.meta(CHUNK).to_bytes())
    feed_model(sync, tiny.model)
    assert sync.model is not None and sync.global_frame is None
    assert rejected == Counter(bad_tensors=1)


@pytest.mark.parametrize(
    "kind, tensors, reason",
    [("update", None, "wrong_kind"), ("global", [], "bad_tensors")],
    ids=["update_frame", "no_tensors"],
)
def test_bad_global_frames_are_refused(tmp_path, rec, tiny, kind, tensors, reason):
    sync = installed(tmp_path, rec, tiny)
    frame = Frame(kind, 2, tiny.sha, tiny.weights() if tensors is None else tensors, run=RUN, num_examples=1)
    with pytest.raises(ProtocolError) as info:
        feed_global(sync, encode_frame(frame))
    assert info.value.reason == reason and sync.global_frame is None


# -- restarts ----------------------------------------------------------------------------


def test_restore_brings_back_the_model_and_its_global_weights(tmp_path, rec, tiny):
    first = installed(tmp_path, rec, tiny)
    frame = tiny.global_frame(5, RUN)
    feed_global(first, frame)
    second_rec = Recorder()
    second = make_sync(tmp_path, second_rec)
    second.restore()
    assert second.model_sha256 == tiny.sha and second.global_frame.round == 5
    assert second_rec.events == [("model", tiny.sha, None, False)]
    second.on_model_meta(tiny.meta(CHUNK).to_bytes())
    feed_model(second, tiny.model)
    feed_global(second, frame)
    assert len(second_rec.events) == 1, "the retained messages replayed after a restart change nothing"


def test_restore_of_an_empty_or_damaged_state_directory(tmp_path, rec, tiny):
    sync = make_sync(tmp_path, rec)
    sync.restore()
    assert sync.model is None and sync.global_frame is None
    installed(tmp_path, rec, tiny)
    (tmp_path / "state" / "global.bin").write_bytes(b"LFWT")
    again = make_sync(tmp_path, Recorder())
    again.restore()
    assert again.model_sha256 == tiny.sha and again.global_frame is None
