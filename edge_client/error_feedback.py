"""Error feedback for lossy update codecs (client side).

A lossy codec (``int8``, ``topk:<fraction>``, ...) drops part of every update.
Error feedback keeps what was dropped, per tensor name, and adds it to the
next round's update, so nothing is lost for good, only delayed. One round::

    ef = ErrorFeedback()
    adjusted = ef.adjust(delta)                       # delta + residual
    sent = decoded_as_sent(adjusted, codec)           # what the coordinator will decode
    ef.update(adjusted, sent)                         # residual = adjusted - sent
    # ... send encode_frame(Frame(tensors=adjusted, codec=codec.name, ...))

Because ``residual_t = adjusted_t - sent_t`` and ``adjusted_t = delta_t + residual_{t-1}``,
the sums telescope: ``sent_1 + ... + sent_T = delta_1 + ... + delta_T - residual_T``.
The sum of what was sent therefore tracks the sum of the intended deltas up to
one residual, which stays bounded (for top-k a value is sent once it grows
large enough), so the relative gap shrinks as rounds accumulate.

Residuals are float32 and live in the client's state directory via
:meth:`ErrorFeedback.state_dict` / :meth:`ErrorFeedback.load_state_dict`.
Call :meth:`ErrorFeedback.reset` when the model changes.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from edge_client.codecs import Codec
from edge_client.errors import WeightsError
from edge_client.weights import NamedArray, Weights


def decoded_as_sent(weights: Weights, codec: Codec) -> Weights:
    """``weights`` after an encode/decode round trip: exactly what the receiver will see."""
    result = []
    for name, array in weights:
        values = np.asarray(array, np.float32)
        blob, params = codec.encode(values)
        result.append(NamedArray(name, codec.decode(blob, params, values.shape)))
    return result


class ErrorFeedback:
    """Residuals (intended minus sent) per tensor name, carried into the next update."""

    def __init__(self) -> None:
        self._residuals: dict[str, np.ndarray] = {}

    def adjust(self, delta: Weights) -> Weights:
        """``delta`` plus the stored residual of each tensor (a tensor without one is unchanged).

        Raises :class:`WeightsError` when a residual's shape differs from its
        tensor's (the model changed: call :meth:`reset`).
        """
        adjusted = []
        for name, array in delta:
            values = np.asarray(array, np.float32)
            residual = self._residuals.get(name)
            if residual is not None:
                if residual.shape != values.shape:
                    raise WeightsError(
                        f"error feedback residual for {name!r} has shape {residual.shape}, the update "
                        f"{values.shape}; call reset() after changing the model"
                    )
                values = values + residual
            adjusted.append(NamedArray(name, values))
        return adjusted

    def update(self, adjusted: Weights, sent: Weights) -> None:
        """Store ``adjusted - sent`` per tensor: what this round meant to send but did not."""
        if len(adjusted) != len(sent):
            raise WeightsError(f"{len(adjusted)} adjusted tensors but {len(sent)} sent ones")
        residuals = {}
        for (name, intended), (sent_name, got) in zip(adjusted, sent, strict=True):
            intended = np.asarray(intended, np.float32)
            got = np.asarray(got, np.float32)
            if name != sent_name or intended.shape != got.shape:
                raise WeightsError(f"sent tensor {sent_name!r} {got.shape} does not match {name!r} {intended.shape}")
            residuals[name] = intended - got
        self._residuals.update(residuals)

    def residual(self, name: str) -> np.ndarray | None:
        """A copy of the stored residual of tensor ``name``, if any."""
        residual = self._residuals.get(name)
        return None if residual is None else residual.copy()

    def reset(self) -> None:
        """Forget every residual (new model, or a fresh run)."""
        self._residuals.clear()

    def state_dict(self) -> dict[str, np.ndarray]:
        """Residuals by tensor name (copies; e.g. for ``np.savez`` in the state directory)."""
        return {name: residual.copy() for name, residual in self._residuals.items()}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Replace the residuals with ``state``; :class:`WeightsError` if it is malformed or not finite."""
        residuals = {}
        for name, array in state.items():
            if not isinstance(name, str) or not name:
                raise WeightsError(f"error feedback state: tensor name {name!r} is not a non-empty string")
            values = np.asarray(array)
            if values.dtype.kind not in "fiu":
                raise WeightsError(f"error feedback state: {name!r} has dtype {values.dtype}, not a number")
            values = values.astype(np.float32)
            if not np.isfinite(values).all():
                raise WeightsError(f"error feedback state: {name!r} contains NaN or Inf")
            residuals[name] = values
        self._residuals = residuals
