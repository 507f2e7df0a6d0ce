"""Atomic checkpoints: a restarted coordinator resumes after the last completed round.

A checkpoint is the global weights as a ``global`` frame (the wire format:
no pickle, CRC-checked) plus a small JSON file naming it. Both are written
to temporary files, fsynced and renamed, and the JSON last, so a crash at
any point leaves either the previous checkpoint or the new one.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from edge_client.errors import ProtocolError
from edge_client.frames import Frame, decode_frame, encode_frame
from edge_client.weights import Weights

log = logging.getLogger(__name__)
INDEX = "checkpoint.json"


@dataclass(frozen=True)
class Checkpoint:
    """The global weights after ``completed_round`` rounds of the model ``model_sha256``."""

    completed_round: int
    model_sha256: str
    weights: Weights


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new file, never a mix."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(directory: Path, checkpoint: Checkpoint) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    name = f"global-{checkpoint.completed_round:06d}.bin"
    frame = Frame("global", checkpoint.completed_round, checkpoint.model_sha256, checkpoint.weights)
    write_atomic(directory / name, encode_frame(frame))
    index = {"completed_round": checkpoint.completed_round, "model_sha256": checkpoint.model_sha256, "weights": name}
    write_atomic(directory / INDEX, json.dumps(index, indent=2).encode())
    for old in directory.glob("global-*.bin"):  # keep the current and the previous one
        if old.name != name and old.name < f"global-{checkpoint.completed_round - 1:06d}.bin":
            old.unlink(missing_ok=True)


def load_checkpoint(directory: Path, model_sha256: str) -> Checkpoint | None:
    """The checkpoint in ``directory`` for this model, or None (with a logged reason)."""
    index_path = directory / INDEX
    if not index_path.exists():
        return None
    try:
        index = json.loads(index_path.read_text())
        frame = decode_frame((directory / index["weights"]).read_bytes())
    except (OSError, ValueError, KeyError, TypeError, ProtocolError) as exc:
        log.warning("ignoring unreadable checkpoint in %s: %s", directory, exc)
        return None
    if frame.model_sha256 != model_sha256 or index.get("model_sha256") != model_sha256:
        log.warning("ignoring checkpoint in %s: it belongs to another model", directory)
        return None
    return Checkpoint(frame.round, frame.model_sha256, frame.tensors)
