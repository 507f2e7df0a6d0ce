"""Per-round metrics, one JSON object per line (JSON Lines)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class RoundMetrics:
    """What happened in one completed round."""

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
    train_loss: float | None = None
    train_accuracy: float | None = None
    test_loss: float | None = None
    test_accuracy: float | None = None
    round_seconds: float = 0.0
    slowest_client_seconds: float | None = None  # longest local training reported by a client
    aggregate_seconds: float = 0.0
    evaluate_seconds: float = 0.0

    def reject(self, reason: str) -> None:
        self.clients_rejected += 1
        self.rejected_reasons[reason] = self.rejected_reasons.get(reason, 0) + 1

    def to_json(self) -> dict:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}


def append_jsonl(path: Path, record: dict) -> None:
    """Append one line; flushed at once so a crash loses at most the round in progress."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, allow_nan=False) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
