"""Model sync in a signed federation: envelopes opened, stored as received, restored, never replayed."""

from __future__ import annotations

from edge_client.chunks import split
from edge_client.model_sync import ModelSync, SyncHooks
from edge_client.reasons import REPLAYED, UNSIGNED
from edge_client.signing import SigningKey
from edge_client.state import StateStore
from edge_client.trust import Verifier
from tests.helpers import reason_of

RUN = "1111111111111111"
CHUNK = 256
KEY = SigningKey.generate()


class FakeModel:
    def __init__(self, model: bytes, manifest):
        self.model, self.manifest = model, manifest


def make_sync(tmp_path, key=KEY) -> ModelSync:
    store = StateStore(tmp_path / "state")
    verifier = Verifier(None if key is None else key.trust_key, store)
    return ModelSync(store, FakeModel, SyncHooks(), verifier=verifier)


def install(sync: ModelSync, tiny, issued: int = 1_000) -> None:
    sync.on_model_meta(KEY.seal("model_meta", tiny.meta(CHUNK).to_bytes(), issued=issued))
    for chunk in split(tiny.model, CHUNK):
        sync.on_model_chunk(chunk)


def send_global(sync: ModelSync, envelope: bytes) -> None:
    for chunk in split(envelope, CHUNK):
        sync.on_global_chunk(chunk)


def test_signed_meta_and_global_frames_install_and_an_unsigned_meta_is_refused(tmp_path, tiny):
    sync = make_sync(tmp_path)
    assert reason_of(lambda: sync.on_model_meta(tiny.meta(CHUNK).to_bytes())) == UNSIGNED
    install(sync, tiny)
    assert sync.model_sha256 == tiny.sha
    send_global(sync, KEY.seal("global", tiny.global_frame(2, RUN), issued=2_000))
    assert sync.global_frame is not None and sync.global_frame.round == 2


def test_a_replayed_global_frame_of_an_earlier_round_is_refused(tmp_path, tiny):
    sync = make_sync(tmp_path)
    install(sync, tiny)
    old = KEY.seal("global", tiny.global_frame(1, RUN), issued=1_500)
    send_global(sync, KEY.seal("global", tiny.global_frame(2, RUN), issued=2_000))
    chunks = split(old, CHUNK)
    for chunk in chunks[:-1]:
        sync.on_global_chunk(chunk)
    assert reason_of(lambda: sync.on_global_chunk(chunks[-1])) == REPLAYED
    assert sync.global_frame.round == 2


def test_the_stored_envelope_is_restored_and_its_retained_copy_is_recognised(tmp_path, tiny):
    sync = make_sync(tmp_path)
    install(sync, tiny)
    envelope = KEY.seal("global", tiny.global_frame(3, RUN), issued=3_000)
    send_global(sync, envelope)
    rebooted = make_sync(tmp_path)
    rebooted.restore()
    assert rebooted.model_sha256 == tiny.sha and rebooted.global_frame.round == 3
    chunks = split(envelope, CHUNK)
    assert len(chunks) > 1
    for chunk in chunks[:-1]:  # the broker's retained copy after the reboot: skipped by its transfer id
        rebooted.on_global_chunk(chunk)
    assert rebooted.reassembler.pending_bytes == 0


def test_a_board_given_a_trust_key_ignores_the_unsigned_global_frame_it_stored_before(tmp_path, tiny):
    unsigned = make_sync(tmp_path, key=None)
    unsigned.on_model_meta(tiny.meta(CHUNK).to_bytes())
    for chunk in split(tiny.model, CHUNK):
        unsigned.on_model_chunk(chunk)
    send_global(unsigned, tiny.global_frame(4, RUN))
    assert unsigned.global_frame.round == 4
    signed = make_sync(tmp_path)
    signed.restore()
    assert signed.model_sha256 == tiny.sha  # the model is checked by its SHA-256 on every load
    assert signed.global_frame is None  # the retained, signed one replaces it
