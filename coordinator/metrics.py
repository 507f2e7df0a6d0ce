"""Per-round metrics, one JSON object per line (JSON Lines)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edge_client.reasons import STALE_ROUND


@dataclass
class RoundMetrics:
    """What happened in one completed round.

    ``bytes_in`` is what the server received (MQTT payloads, or in the
    simulator the update frames). ``bytes_out`` is what the MQTT coordinator
    published to the broker, once per message however many boards receive
    it; in the simulator, where there is no broker, it is the global frame
    times the clients selected, i.e. what the boards would download.
    """

    round: int
    clients_selected: int = 0
    clients_answered: int = 0
    clients_rejected: int = 0
    late_updates: int = 0
    rejected_reasons: dict[str, int] = field(default_factory=dict)
    attempts: int = 1
    bytes_in: int = 0
    bytes_out: int = 0
    num_examples: int = 0
    client_lr: float | None = None  # the learning rate the round asked of its clients (see --lr-decay)
    train_loss: float | None = None
    train_accuracy: float | None = None
    test_loss: float | None = None
    test_accuracy: float | None = None
    round_seconds: float = 0.0
    slowest_client_seconds: float | None = None  # longest local training reported by a client
    aggregate_seconds: float = 0.0
    evaluate_seconds: float = 0.0
    dp_epsilon: float | None = None  # privacy spent so far (for the strategy's delta), with --dp-noise
    aggregation_error: str | None = None  # why the aggregate was refused (the global model then stayed as it was)
    # Hostile input the MQTT coordinator survived: selected clients left out of an announcement that would not
    # fit the broker's payload limit, and presence messages ignored (by why: bad_json, not_listed, ...).
    clients_unannounced: int = 0
    presence_ignored: dict[str, int] = field(default_factory=dict)
    _weighted: dict[str, float] = field(default_factory=dict, repr=False)  # sum of n * client metric

    def reject(self, reason: str) -> None:
        """Count one rejected update; one for another round (``stale_round``) is also a late update."""
        self.clients_rejected += 1
        self.rejected_reasons[reason] = self.rejected_reasons.get(reason, 0) + 1
        if reason == STALE_ROUND:
            self.late_updates += 1

    def ignore_presence(self, why: str) -> None:
        """Count one presence message the coordinator ignored, and why."""
        self.presence_ignored[why] = self.presence_ignored.get(why, 0) + 1

    def record_update(self, num_examples: int, client_metrics: Mapping[str, float]) -> None:
        """Count one accepted update and its train metrics (averaged weighted by examples)."""
        self.clients_answered += 1
        self.num_examples += num_examples
        for key in ("loss", "accuracy"):
            if key in client_metrics:
                self._weighted[key] = self._weighted.get(key, 0.0) + num_examples * client_metrics[key]
                setattr(self, f"train_{key}", self._weighted[key] / self.num_examples)
        if "train_seconds" in client_metrics:
            self.slowest_client_seconds = max(self.slowest_client_seconds or 0.0, client_metrics["train_seconds"])

    def to_json(self) -> dict:
        return {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in asdict(self).items()
            if not k.startswith("_")
        }


def append_jsonl(path: Path, record: dict) -> None:
    """Append one line; flushed at once so a crash loses at most the round in progress."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, allow_nan=False) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
