"""Server-side evaluation of the global model through the very same ``.tflite``.

The coordinator needs no TensorFlow: it loads the converted model into a
LiteRT interpreter, sets the global weights and runs the ``evaluate``
signature over a held-out set.
"""

from __future__ import annotations

import numpy as np

from edge_client.manifest import Manifest
from edge_client.runtime import TrainableModel
from edge_client.weights import Weights


class ServerEvaluator:
    """Callable ``weights -> {"loss": ..., "accuracy": ...}`` on a fixed test set."""

    def __init__(self, model: bytes, manifest: Manifest, x: np.ndarray, y: np.ndarray, num_threads: int | None = None):
        if len(x) != len(y) or len(x) == 0:
            raise ValueError(f"test set needs matching, non-empty x and y (got {len(x)} and {len(y)})")
        self._runtime = TrainableModel(model, manifest, num_threads=num_threads)
        self._x, self._y = x, y

    def __call__(self, weights: Weights) -> dict[str, float]:
        self._runtime.set_weights(weights)
        metrics = self._runtime.evaluate(self._x, self._y)
        scores = {"loss": metrics.loss}
        if metrics.accuracy is not None:
            scores["accuracy"] = metrics.accuracy
        return scores
