"""One round of local training, and the update frame it produces.

Shared by the edge client (over MQTT) and the coordinator's in-process
simulator, so a simulated client trains and encodes exactly as a board
does: the same ``train`` signature, the same delta, the same frame bytes.
Nothing here knows of MQTT, state directories or processes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edge_client.error_feedback import ErrorFeedback
from edge_client.errors import EdgeClientError
from edge_client.frames import Frame, decode_frame, encode_frame
from edge_client.runtime import TrainableModel
from edge_client.weights import NamedArray, Weights


class TrainingDiverged(EdgeClientError):
    """Local training produced NaN or Inf: the update must not be sent."""


@dataclass(frozen=True)
class LocalTraining:
    """What one round of local training produced."""

    delta: Weights  # local - global, float32, manifest order
    num_examples: int
    metrics: dict[str, float]  # loss, accuracy (classifiers), train_seconds
    epochs: int  # epochs actually completed (fewer when stopped early)


def train_local(
    model: TrainableModel,
    start: Weights,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    lr: float,
    mu: float = 0.0,
    rng: np.random.Generator | None = None,
    keep_going: Callable[[], bool] | None = None,
) -> LocalTraining | None:
    """Train ``epochs`` passes from ``start``; return the delta and train metrics.

    ``keep_going`` is asked before every epoch; when it says no before the
    first one, nothing is trained and None is returned. Raises
    :class:`TrainingDiverged` when the loss or the delta is not finite.
    """
    began = time.monotonic()
    losses, accuracies = [], []
    model.set_weights(start)  # also the FedProx anchor and a fresh optimizer state
    for _ in range(epochs):
        if keep_going is not None and not keep_going():
            break
        metrics = model.fit(x, y, epochs=1, lr=lr, mu=mu, rng=rng)
        losses.append(metrics.loss)
        if metrics.accuracy is not None:
            accuracies.append(metrics.accuracy)
    if not losses:
        return None
    local = model.get_weights()
    delta = [
        NamedArray(name, np.asarray(trained, np.float32) - np.asarray(origin, np.float32))
        for (name, trained), (_, origin) in zip(local, start, strict=True)
    ]
    # train_seconds lets the coordinator tell slow boards from protocol overhead.
    out = {"loss": float(np.mean(losses)), "train_seconds": time.monotonic() - began}
    if accuracies:
        out["accuracy"] = float(np.mean(accuracies))
    if not all(np.isfinite(v) for v in out.values()) or not all(np.isfinite(d.array).all() for d in delta):
        raise TrainingDiverged("training diverged (NaN or Inf in the loss or the weights); try a lower learning rate")
    return LocalTraining(delta, len(x), out, len(losses))


def uses_error_feedback(codec: str) -> bool:
    """Lossy codecs carry what they dropped into the next update; float32 drops nothing."""
    return codec != "float32"


def encode_update(
    training: LocalTraining,
    *,
    round: int,
    run: str,
    model_sha256: str,
    client_id: str,
    codec: str,
    feedback: ErrorFeedback | None = None,
) -> bytes:
    """The update frame for ``training`` in round ``round`` of run ``run``, encoded with ``codec``.

    With ``feedback`` and a lossy codec, the stored residual is added to the
    delta before encoding and the new residual (what the coordinator will
    not see) is kept for the next round. Raises ProtocolError when the codec
    cannot encode the values (e.g. float16 overflow); the residuals are then
    unchanged.
    """
    tensors = training.delta
    if feedback is not None and uses_error_feedback(codec):
        tensors = feedback.adjust(tensors)
    frame = Frame(
        kind="update",
        round=round,
        model_sha256=model_sha256,
        tensors=tensors,
        codec=codec,
        client_id=client_id,
        num_examples=training.num_examples,
        metrics=training.metrics,
        run=run,
    )
    payload = encode_frame(frame)
    if feedback is not None and uses_error_feedback(codec):
        feedback.update(tensors, decode_frame(payload).tensors)  # exactly what the coordinator decodes
    return payload
