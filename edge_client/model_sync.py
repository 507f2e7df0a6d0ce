"""Keeping an edge client's model and global weights in step with the coordinator's retained messages.

A :class:`ModelSync` reassembles ``model/chunk/+`` and ``global/chunk/+``,
installs the model that ``model/meta`` announces (checked by SHA-256 and
size, stored, loaded) and keeps the global frame of the highest round. The
retained messages may arrive in any order: a complete model not (yet)
announced, and global weights of a model not (yet) installed, wait until their
counterpart arrives. In a signed federation the model meta and each global
frame arrive in the coordinator's signed envelope, which the
:class:`~edge_client.trust.Verifier` opens (the model itself is covered by
the SHA-256 in the signed meta). What the rest of the client must do about a new model or
new global weights (abandon an old update, join a new run, fit the data) it
does in the :class:`SyncHooks` it gives.
"""

from __future__ import annotations

import functools
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edge_client.chunks import Reassembler, parse_chunk, transfer_id_for
from edge_client.errors import ProtocolError, StateError
from edge_client.frames import Frame, decode_frame, validate_frame
from edge_client.manifest import Manifest
from edge_client.messages import ModelMeta
from edge_client.model_file import sha256_hex
from edge_client.reasons import BAD_MODEL, STALE_ROUND, TOO_LARGE, WRONG_KIND
from edge_client.state import StateStore
from edge_client.trust import Verifier
from edge_client.uploads import Ignore, log_every_time

log = logging.getLogger(__name__)

# Incomplete transfers a board holds at once: a few models' worth, not the Reassembler's server-sized 1 GiB.
MAX_PENDING_TRANSFER_BYTES = 256 << 20


def _nothing(*args: Any) -> None:
    return None


@dataclass
class SyncHooks:
    """What the owner of a :class:`ModelSync` does when the model or the global weights change.

    ``model_installed(manifest, previous, persist)`` runs after a model is
    loaded (``previous`` is the digest of the model it replaces, ``persist`` is
    False when restored from the state directory). ``global_arrived(frame)``
    runs for every valid global frame of the model in use, before it is kept
    or found older than the one held (its run may be new); ``global_kept(frame)``
    once it is kept.
    """

    model_installed: Callable[[Manifest, str | None, bool], None] = _nothing
    global_arrived: Callable[[Frame], None] = _nothing
    global_kept: Callable[[Frame], None] = _nothing


class ModelSync:
    """The model in use and the global weights held, fed by the retained messages.

    ``load_model(model_bytes, manifest)`` builds the trainable model (LiteRT's
    :class:`~edge_client.runtime.TrainableModel` in the client; anything in
    tests). ``rejected`` counts global weights refused after waiting for their
    model; other refusals raise :class:`ProtocolError` to the caller.
    ``verifier`` opens signed envelopes (default: an unsigned federation).
    """

    def __init__(
        self,
        store: StateStore,
        load_model: Callable[[bytes, Manifest], Any],
        hooks: SyncHooks | None = None,
        *,
        rejected: Counter[str] | None = None,
        ignore: Ignore = log_every_time,
        max_pending: int = MAX_PENDING_TRANSFER_BYTES,
        verifier: Verifier | None = None,
    ):
        self.store = store
        self.verifier = verifier or Verifier(None)
        self.load_model = load_model
        self.hooks = hooks or SyncHooks()
        self.rejected: Counter[str] = Counter() if rejected is None else rejected
        self.ignore = ignore
        self.reassembler = Reassembler(max_pending=max_pending)
        # the model in use
        self.model: Any = None
        self.manifest: Manifest | None = None
        self.model_sha256: str | None = None
        self.meta: ModelMeta | None = None  # the latest model the coordinator announced
        self._orphan_model: tuple[str, bytes] | None = None  # a complete model not announced (yet)
        # global weights
        self.global_frame: Frame | None = None
        self._global_transfer: bytes | None = None
        self._orphan_global: tuple[bytes, Frame] | None = None  # for a model that has not arrived (yet)

    def restore(self) -> None:
        """Load the stored model and, if there is one, the stored global weights of it."""
        stored = self.store.load_model()
        if stored is not None:
            try:
                self._install(stored.model, stored.manifest_json, stored.manifest, persist=False)
            except ProtocolError as exc:
                log.warning("ignoring the stored model: %s", exc)
        if self.manifest is None:
            return
        stored_global = self.store.load_global(self.manifest, functools.partial(self.verifier.open_stored, "global"))
        if stored_global is not None:
            data, frame = stored_global
            self.global_frame, self._global_transfer = frame, transfer_id_for(data)

    # -- model -------------------------------------------------------------------------
    def on_model_meta(self, payload: bytes) -> None:
        meta = ModelMeta.from_bytes(self.verifier.open("model_meta", payload))
        if meta.model_sha256 == self.model_sha256:
            self.meta = meta
            return
        if meta.size > self.reassembler.max_payload:
            raise ProtocolError(TOO_LARGE, f"model of {meta.size} bytes exceeds {self.reassembler.max_payload}")
        if self.meta is None or self.meta.model_sha256 != meta.model_sha256:
            log.info("model %s announced (%d bytes, %d chunk(s))", meta.model_sha256[:12], meta.size, meta.chunks)
        self.meta = meta
        if self._orphan_model is not None and self._orphan_model[0] == meta.model_sha256:
            model_bytes = self._orphan_model[1]
            self._orphan_model = None
            self._install_announced(model_bytes, meta)

    def on_model_chunk(self, payload: bytes) -> None:
        chunk = parse_chunk(payload)
        if self.model_sha256 is not None and chunk.transfer_id == bytes.fromhex(self.model_sha256)[:16]:
            return  # the model in use (retained chunks replayed after a restart or reconnection)
        model_bytes = self.reassembler.add(payload, "model")
        if model_bytes is None:
            return
        digest = sha256_hex(model_bytes)
        if digest == self.model_sha256:
            return
        meta = self.meta
        if meta is not None and digest == meta.model_sha256:
            self._install_announced(model_bytes, meta)
        else:
            # Chunks may overtake model/meta; keep the latest such model until meta names it.
            log.info("received model %s, which model/meta has not announced (yet)", digest[:12])
            self._orphan_model = (digest, model_bytes)

    def _install_announced(self, model_bytes: bytes, meta: ModelMeta) -> None:
        meta.check_model(model_bytes)
        self._install(model_bytes, meta.manifest, meta.parse_manifest())

    def _install(
        self, model_bytes: bytes, manifest_json: dict[str, Any], manifest: Manifest, persist: bool = True
    ) -> None:
        digest = manifest.model_sha256
        try:
            model = self.load_model(model_bytes, manifest)
        except Exception as exc:  # ManifestError, ModelFileError, or LiteRT's own errors on a broken graph
            raise ProtocolError(BAD_MODEL, f"model {digest[:12]} cannot be loaded: {exc}") from None
        if persist:
            try:
                self.store.save_model(model_bytes, manifest_json)
            except StateError as exc:
                log.error("%s; the model stays in memory only", exc)
        previous = self.model_sha256
        self.model, self.manifest, self.model_sha256 = model, manifest, digest
        log.info(
            "%s model %s (%s, %d parameters)%s",
            "restored" if not persist else "loaded",
            digest[:12],
            manifest.model_name,
            manifest.num_parameters,
            f", replacing {previous[:12]}" if previous else "",
        )
        if self.global_frame is not None and self.global_frame.model_sha256 != digest:
            self.global_frame, self._global_transfer = None, None
        self.hooks.model_installed(manifest, previous, persist)
        orphan, self._orphan_global = self._orphan_global, None
        if orphan is not None and orphan[1].model_sha256 == digest:
            try:
                self._offer_global(*orphan)
            except ProtocolError as exc:
                self.rejected[exc.reason] += 1
                log.warning("ignored the global weights received before the model: %s", exc)

    # -- global weights ------------------------------------------------------------------
    def on_global_chunk(self, payload: bytes) -> None:
        chunk = parse_chunk(payload)
        if chunk.transfer_id == self._global_transfer:
            return  # the global frame in use
        if self._orphan_global is not None and chunk.transfer_id == transfer_id_for(self._orphan_global[0]):
            return
        data = self.reassembler.add(payload, "global")
        if data is None:
            return
        frame = decode_frame(self.verifier.open("global", data))
        if frame.kind != "global":
            raise ProtocolError(WRONG_KIND, f"expected a 'global' frame on global/chunk, got {frame.kind!r}")
        self._offer_global(data, frame)

    def _offer_global(self, data: bytes, frame: Frame) -> None:
        if self.manifest is None or frame.model_sha256 != self.model_sha256:
            orphan = self._orphan_global
            held = None if orphan is None else orphan[1]
            # Keep the latest: another model or run replaces it, as does a later round of the same.
            if (
                held is None
                or (held.model_sha256, held.run) != (frame.model_sha256, frame.run)
                or frame.round > held.round
            ):
                self._orphan_global = (data, frame)
                log.info(
                    "keeping global weights of round %d for model %s until that model arrives",
                    frame.round,
                    frame.model_sha256[:12],
                )
            return
        validate_frame(frame, self.manifest.weights, self.model_sha256, "global")
        self.hooks.global_arrived(frame)
        current = self.global_frame
        if current is not None and current.run == frame.run and frame.round <= current.round:
            self.ignore(
                (STALE_ROUND, "global", frame.run, frame.round),
                f"ignoring global weights of round {frame.round}: holding round {current.round} of this run",
                logging.INFO,
            )
            return
        self.global_frame, self._global_transfer = frame, transfer_id_for(data)
        self.hooks.global_kept(frame)
        log.info("global weights of round %d received (run %s)", frame.round, frame.run)
        try:
            self.store.save_global(data)
        except StateError as exc:
            log.error("%s; the global weights stay in memory only", exc)
