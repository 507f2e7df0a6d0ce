"""What an edge client keeps on disk so that it resumes after a power loss.

Layout of the state directory::

    model.tflite    the last model received (its SHA-256 is the manifest's model_sha256)
    model.json      its manifest, as carried by ModelMeta
    global.bin      the last global-weights frame, raw frame bytes (CRC-checked), in its signed envelope if signed
    pending.bin     the encoded update frame awaiting an ack, raw frame bytes
    answered.bin    the last acknowledged update (pending.bin renamed), kept until its round is known closed
    progress.json   the run followed, rounds trained and acknowledged in it, which update files are current
    residuals.npz   error-feedback residuals of a lossy update codec (per tensor, float32)
    issued.json     the newest issue time accepted per kind of signed message (replays older than it are refused)

Every file is written atomically: a temporary file in the same directory,
``fsync``, ``os.replace`` and an ``fsync`` of the directory. A board that
loses power mid-write keeps the previous version, and whatever is
inconsistent anyway (a truncated file, a model whose hash does not match its
manifest, a pending update that is not the one progress.json names) is
ignored with a warning: the retained messages bring it back.

Loads never raise for bad content; only an unusable directory raises
:class:`StateError`, when the store is created.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_client.durable import TMP_PREFIX, atomic_write, fsync_dir
from edge_client.errors import EdgeClientError, ProtocolError, StateError
from edge_client.frames import Frame, decode_frame, validate_frame
from edge_client.manifest import Manifest
from edge_client.messages import is_run_id
from edge_client.model_file import sha256_hex
from edge_client.reasons import WRONG_KIND

log = logging.getLogger(__name__)

MODEL_FILE = "model.tflite"
MANIFEST_FILE = "model.json"
GLOBAL_FILE = "global.bin"
PENDING_FILE = "pending.bin"
ANSWERED_FILE = "answered.bin"
PROGRESS_FILE = "progress.json"
RESIDUALS_FILE = "residuals.npz"
ISSUED_FILE = "issued.json"  # the newest issue time accepted per signed kind (edge_client.trust)
_RESIDUAL_PREFIX = "tensor:"
PROGRESS_VERSION = 3  # 2 added "run" (a version-1 file reads as belonging to no run), 3 "answered"
_PROGRESS_VERSIONS = (1, 2, PROGRESS_VERSION)


@dataclass(frozen=True)
class StoredModel:
    """A model read back from the state directory (hash already checked)."""

    model: bytes
    manifest_json: dict[str, Any]
    manifest: Manifest
    sha256: str


@dataclass(frozen=True)
class PendingUpdate:
    """Which update an update file holds: its round, model and the SHA-256 of its bytes.

    ``deadline`` (an answered update only) is that of the announcement it was
    acknowledged under: the same announcement replayed after a restart does not
    ask for it again, a new one of its round (a restarted coordinator's) does.
    """

    round: int
    model_sha256: str
    sha256: str
    size: int
    deadline: float | None = None


@dataclass(frozen=True)
class Progress:
    """How far this client got with the model ``model_sha256`` in the run ``run``.

    ``trained_round`` is the last round of that run it sent an update for
    (never trained again), ``acked_round`` the last round the coordinator
    acknowledged, ``pending`` the update to resend while its round is open,
    and ``answered`` the acknowledged update kept until a later round (or
    another run) shows that its round has closed: a coordinator restarted
    in that round has lost it and asks for it again. All belong to ``run``
    ("" before the board joins one): a new run starts from an empty Progress.
    """

    model_sha256: str = ""
    trained_round: int | None = None
    acked_round: int | None = None
    pending: PendingUpdate | None = None
    run: str = ""
    answered: PendingUpdate | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "version": PROGRESS_VERSION,
            "model_sha256": self.model_sha256,
            "run": self.run,
            "trained_round": self.trained_round,
            "acked_round": self.acked_round,
            "pending": _update_json(self.pending),
            "answered": _update_json(self.answered),
        }

    @classmethod
    def from_json(cls, obj: Any) -> Progress:
        """Parse progress.json; ValueError for anything malformed."""
        if not isinstance(obj, dict) or obj.get("version") not in _PROGRESS_VERSIONS:
            raise ValueError(f"not a version-{PROGRESS_VERSION} progress object")
        run = obj.get("run", "") if obj["version"] >= 2 else ""
        if run != "" and not is_run_id(run):
            raise ValueError(f"run must be a run id (16 lowercase hex digits) or empty, got {run!r}")
        return cls(
            model_sha256=_str(obj.get("model_sha256"), "model_sha256"),
            trained_round=_round(obj.get("trained_round"), "trained_round"),
            acked_round=_round(obj.get("acked_round"), "acked_round"),
            pending=_update_from_json(obj.get("pending"), "pending"),
            run=run,
            answered=_update_from_json(obj.get("answered"), "answered") if obj["version"] >= 3 else None,
        )


def _update_json(update: PendingUpdate | None) -> dict[str, Any] | None:
    if update is None:
        return None
    out: dict[str, Any] = {
        "round": update.round,
        "model_sha256": update.model_sha256,
        "sha256": update.sha256,
        "size": update.size,
    }
    if update.deadline is not None:
        out["deadline"] = update.deadline
    return out


def _update_from_json(obj: Any, name: str) -> PendingUpdate | None:
    if obj is None:
        return None
    if not isinstance(obj, dict):
        raise ValueError(f"{name} must be an object")
    return PendingUpdate(
        round=_count(obj.get("round"), f"{name}.round"),
        model_sha256=_str(obj.get("model_sha256"), f"{name}.model_sha256"),
        sha256=_str(obj.get("sha256"), f"{name}.sha256"),
        size=_count(obj.get("size"), f"{name}.size"),
        deadline=_deadline(obj.get("deadline"), f"{name}.deadline"),
    )


def _deadline(value: Any, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _round(value: Any, name: str) -> int | None:
    return None if value is None else _count(value, name)


def _count(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return value


def _str(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string, got {value!r}")
    return value


class StateStore:
    """The state directory of one client (created if missing)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StateError(
                f"cannot create the state directory {self.directory}: {exc.strerror or exc}; "
                "choose a writable state_dir (--state-dir)"
            ) from exc
        if not os.access(self.directory, os.W_OK | os.X_OK):
            raise StateError(f"the state directory {self.directory} is not writable; choose another state_dir")
        self._remove_stale_temporaries()

    def path(self, name: str) -> Path:
        return self.directory / name

    def _remove_stale_temporaries(self) -> None:
        """Temporary files left by a write that a power loss interrupted."""
        for tmp in self.directory.glob(TMP_PREFIX + "*"):
            with contextlib.suppress(OSError):
                tmp.unlink()
                log.info("removed %s, left by an interrupted write", tmp)

    def _write(self, name: str, data: bytes) -> None:
        try:
            atomic_write(self.path(name), data)
        except OSError as exc:
            raise StateError(f"cannot write {self.path(name)}: {exc.strerror or exc}") from exc

    def _read(self, name: str) -> bytes | None:
        try:
            return self.path(name).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("ignoring %s: cannot read it (%s)", self.path(name), exc.strerror or exc)
            return None

    def _remove(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(name).unlink()

    # -- model -----------------------------------------------------------------------
    def save_model(self, model: bytes, manifest_json: dict[str, Any]) -> None:
        """Write the model, then its manifest (a crash in between leaves a hash mismatch, detected on load)."""
        self._write(MODEL_FILE, model)
        self._write(MANIFEST_FILE, (json.dumps(manifest_json, indent=2) + "\n").encode())

    def load_model(self) -> StoredModel | None:
        """The stored model if both files are intact and belong together, else None."""
        model, manifest_raw = self._read(MODEL_FILE), self._read(MANIFEST_FILE)
        if model is None and manifest_raw is None:
            return None
        if model is None or manifest_raw is None:
            log.warning(
                "ignoring the stored model in %s: %s is missing",
                self.directory,
                MODEL_FILE if model is None else MANIFEST_FILE,
            )
            return None
        try:
            manifest_json = json.loads(manifest_raw.decode("utf-8"))
            manifest = Manifest.from_json(manifest_json)
        except (UnicodeDecodeError, ValueError, EdgeClientError) as exc:
            log.warning("ignoring the stored model: %s is damaged (%s)", self.path(MANIFEST_FILE), exc)
            return None
        digest = sha256_hex(model)
        if digest != manifest.model_sha256:
            log.warning(
                "ignoring the stored model: %s (sha256 %s) does not match its manifest (%s); "
                "a write was probably interrupted",
                self.path(MODEL_FILE),
                digest[:12],
                manifest.model_sha256[:12],
            )
            return None
        return StoredModel(model, manifest_json, manifest, digest)

    # -- signed messages -------------------------------------------------------------
    def save_issued(self, issued: dict[str, int]) -> None:
        self._write(ISSUED_FILE, json.dumps(issued, sort_keys=True).encode())

    def load_issued(self) -> dict[str, int]:
        """issued.json: kind -> the newest issue time accepted; empty if missing or damaged."""
        raw = self._read(ISSUED_FILE)
        if raw is None:
            return {}
        try:
            data = json.loads(raw.decode("utf-8"))
            if isinstance(data, dict) and all(isinstance(v, int) and not isinstance(v, bool) for v in data.values()):
                return {str(k): int(v) for k, v in data.items()}
        except (UnicodeDecodeError, ValueError):
            pass
        log.warning("ignoring %s: damaged; older signed messages may be accepted once", self.path(ISSUED_FILE))
        return {}

    # -- global weights --------------------------------------------------------------
    def save_global(self, frame_bytes: bytes) -> None:
        self._write(GLOBAL_FILE, frame_bytes)

    def load_global(
        self, manifest: Manifest | None = None, unwrap: Callable[[bytes], bytes] | None = None
    ) -> tuple[bytes, Frame] | None:
        """The stored global frame, decoded and (given the manifest) validated against the model.

        ``unwrap`` opens the stored bytes into the frame (a signed envelope, as
        received, is stored as it is); it raises ``ProtocolError`` to refuse them.
        """
        data = self._read(GLOBAL_FILE)
        if data is None:
            return None
        try:
            frame = decode_frame(data if unwrap is None else unwrap(data))
            if manifest is not None:
                validate_frame(frame, manifest.weights, manifest.model_sha256, "global")
            elif frame.kind != "global":
                raise ProtocolError(WRONG_KIND, f"a {frame.kind!r} frame")
        except ProtocolError as exc:
            log.warning("ignoring the stored global weights %s: %s", self.path(GLOBAL_FILE), exc)
            return None
        return data, frame

    # -- progress and the pending update ---------------------------------------------
    def load_progress(self) -> Progress:
        """progress.json, or an empty Progress if it is missing or damaged."""
        raw = self._read(PROGRESS_FILE)
        if raw is None:
            return Progress()
        try:
            return Progress.from_json(json.loads(raw.decode("utf-8")))
        except (UnicodeDecodeError, ValueError) as exc:
            log.warning("ignoring %s: damaged (%s); starting without progress", self.path(PROGRESS_FILE), exc)
            return Progress()

    def save_progress(self, progress: Progress, pending_bytes: bytes | None = None) -> None:
        """Write progress.json, after pending.bin when ``pending_bytes`` is given.

        pending.bin is written first: should power fail in between, progress.json
        still names the old update, whose hash no longer matches, and the stale
        pending update is ignored on load rather than resent.
        """
        if pending_bytes is not None:
            if progress.pending is None or sha256_hex(pending_bytes) != progress.pending.sha256:
                raise ValueError("pending_bytes must be the update named by progress.pending")
            self._write(PENDING_FILE, pending_bytes)
        self._write(PROGRESS_FILE, (json.dumps(progress.to_json(), indent=2) + "\n").encode())
        if progress.pending is None:
            self._remove(PENDING_FILE)
        if progress.answered is None:
            self._remove(ANSWERED_FILE)

    def keep_pending_as_answered(self) -> None:
        """Rename pending.bin to answered.bin, durably: call it before progress.json names the update answered.

        A power loss between the two leaves progress.json naming the update
        pending and its bytes in answered.bin; loading looks in both files.
        """
        try:
            os.replace(self.path(PENDING_FILE), self.path(ANSWERED_FILE))
        except FileNotFoundError:
            return  # nothing written (its write failed) or renamed already
        except OSError as exc:
            raise StateError(f"cannot rename {self.path(PENDING_FILE)}: {exc.strerror or exc}") from exc
        fsync_dir(self.directory)

    def load_pending(self, progress: Progress, manifest: Manifest | None = None) -> bytes | None:
        """The bytes of ``progress.pending`` if pending.bin is intact and is that update (of its run), else None."""
        return self._load_update(progress.pending, "pending", (PENDING_FILE, ANSWERED_FILE), progress.run, manifest)

    def load_answered(self, progress: Progress, manifest: Manifest | None = None) -> bytes | None:
        """The bytes of ``progress.answered`` if answered.bin is intact and is that update (of its run), else None."""
        files = (ANSWERED_FILE, PENDING_FILE)
        return self._load_update(progress.answered, "acknowledged", files, progress.run, manifest)

    def _load_update(
        self, update: PendingUpdate | None, what: str, files: tuple[str, str], run: str, manifest: Manifest | None
    ) -> bytes | None:
        """The bytes of ``update`` from the first of ``files`` that holds them (the second: a rename cut short)."""
        if update is None:
            return None
        other = None  # a file that holds something else
        for name in files:
            data = self._read(name)
            if data is None:
                continue
            if len(data) == update.size and sha256_hex(data) == update.sha256:
                return self._checked_update(data, name, update, what, run, manifest)
            other = other or name
        if other is None:
            path = self.path(files[0])
            log.warning("ignoring the %s update of round %d: %s is missing", what, update.round, path)
        else:
            path = self.path(other)
            log.warning(
                "ignoring %s: it is not the %s update of round %d (interrupted write?)", path, what, update.round
            )
        return None

    def _checked_update(
        self, data: bytes, name: str, update: PendingUpdate, what: str, run: str, manifest: Manifest | None
    ) -> bytes | None:
        try:
            frame = decode_frame(data)
            if manifest is not None:
                validate_frame(frame, manifest.weights, manifest.model_sha256, "update", update.round, run)
        except ProtocolError as exc:
            log.warning("ignoring the %s update %s: %s", what, self.path(name), exc)
            return None
        return data

    # -- error-feedback residuals ----------------------------------------------------
    def save_residuals(self, model_sha256: str, residuals: dict[str, np.ndarray]) -> None:
        """Write the residuals of ``model_sha256`` (plain arrays, read back without pickle)."""
        buffer = io.BytesIO()
        arrays = {_RESIDUAL_PREFIX + name: np.asarray(value, np.float32) for name, value in residuals.items()}
        # numpy >= 2.2's stub cannot tell these keys (all prefixed) from its allow_pickle keyword; older ones can.
        np.savez(buffer, model_sha256=np.array(model_sha256), **arrays)  # type: ignore[arg-type, unused-ignore]
        self._write(RESIDUALS_FILE, buffer.getvalue())

    def load_residuals(self, model_sha256: str) -> dict[str, np.ndarray] | None:
        """The stored residuals if they are intact and belong to ``model_sha256``, else None."""
        raw = self._read(RESIDUALS_FILE)
        if raw is None:
            return None
        try:
            with np.load(io.BytesIO(raw), allow_pickle=False) as archive:
                if str(archive["model_sha256"]) != model_sha256:
                    log.info("ignoring %s: it belongs to another model", self.path(RESIDUALS_FILE))
                    return None
                return {
                    key[len(_RESIDUAL_PREFIX) :]: archive[key]
                    for key in archive.files
                    if key.startswith(_RESIDUAL_PREFIX)
                }
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
            log.warning("ignoring %s: damaged (%s)", self.path(RESIDUALS_FILE), exc)
            return None

    def clear_residuals(self) -> None:
        self._remove(RESIDUALS_FILE)
