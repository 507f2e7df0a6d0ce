"""The server's state between rounds, and its atomic checkpoints.

:class:`ServerState` is what a federation is after some rounds, for the MQTT
coordinator and the simulator alike; a checkpoint is one saved to disk, so
that a restarted run resumes after its last completed round.

A checkpoint is the global weights as a ``global`` frame (the wire format:
no pickle, CRC-checked) plus a small JSON file naming it. Both are written
durably (``edge_client.durable.atomic_write``), the JSON last, so a crash at
any point leaves either the previous checkpoint or the new one. It also
keeps the run id, so that a resumed run is the same run for the boards.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge_client.durable import atomic_write
from edge_client.errors import ProtocolError
from edge_client.frames import Frame, decode_frame, encode_frame
from edge_client.messages import UNNAMED_RUN, is_run_id
from edge_client.weights import Weights

log = logging.getLogger(__name__)
INDEX = "checkpoint.json"


@dataclass(frozen=True)
class ServerState:
    """The global model after ``round`` completed rounds, the strategy's state (server
    optimiser moments, DP accounting: what :meth:`~coordinator.strategies.base.Strategy.state_dict`
    returned) and the run id ("" when unknown: a state made by hand, or a checkpoint written
    before runs had ids)."""

    round: int
    weights: Weights
    strategy_state: Mapping[str, np.ndarray] = field(default_factory=dict)
    run_id: str = ""


def save_checkpoint(directory: Path, model_sha256: str, state: ServerState) -> None:
    """Save ``state`` of the model ``model_sha256`` in ``directory``, keeping the previous one too."""
    directory.mkdir(parents=True, exist_ok=True)
    name = f"global-{state.round:06d}.bin"
    run = state.run_id or UNNAMED_RUN
    frame = Frame("global", state.round, model_sha256, state.weights, run=run)
    atomic_write(directory / name, encode_frame(frame))
    index: dict[str, object] = {
        "completed_round": state.round,
        "model_sha256": model_sha256,
        "run": state.run_id,
        "weights": name,
    }
    if state.strategy_state:
        buffer = io.BytesIO()
        # Plain arrays, read back with allow_pickle=False. numpy >= 2.2's stub cannot tell the state's keys
        # from its allow_pickle keyword (older stubs have none).
        np.savez(buffer, **state.strategy_state)  # type: ignore[arg-type, unused-ignore]
        strategy_file = f"strategy-{state.round:06d}.npz"
        index["strategy_state"] = strategy_file
        atomic_write(directory / strategy_file, buffer.getvalue())
    atomic_write(directory / INDEX, json.dumps(index, indent=2).encode())
    for pattern, suffix in (("global-*.bin", ".bin"), ("strategy-*.npz", ".npz")):  # keep the last two
        keep_from = f"{pattern.split('*')[0]}{state.round - 1:06d}{suffix}"
        for old in directory.glob(pattern):
            if old.name < keep_from:
                old.unlink(missing_ok=True)


def load_checkpoint(directory: Path, model_sha256: str) -> ServerState | None:
    """The state checkpointed in ``directory`` for this model, or None (with a logged reason)."""
    index_path = directory / INDEX
    if not index_path.exists():
        return None
    try:
        index = json.loads(index_path.read_text())
        frame = decode_frame((directory / index["weights"]).read_bytes(), accept_legacy=True)
        state = {}
        if "strategy_state" in index:
            with np.load(directory / index["strategy_state"], allow_pickle=False) as archive:
                state = {key: archive[key] for key in archive.files}
    except (OSError, ValueError, KeyError, TypeError, ProtocolError) as exc:
        log.warning("ignoring unreadable checkpoint in %s: %s", directory, exc)
        return None
    if frame.model_sha256 != model_sha256 or index.get("model_sha256") != model_sha256:
        log.warning("ignoring checkpoint in %s: it belongs to another model", directory)
        return None
    run = index.get("run", "")
    if run and not is_run_id(run):
        log.warning("ignoring checkpoint in %s: its run id %r is not 16 lowercase hex digits", directory, run)
        return None
    return ServerState(frame.round, frame.tensors, state, run)
