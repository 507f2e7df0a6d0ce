"""``litefed-coordinator``: run federated rounds of a converted model over MQTT."""

from __future__ import annotations

import argparse
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from coordinator.cli.options import add_round_arguments
from coordinator.cli.settings import BrokerSettings, CoordinatorSettings
from edge_client.cli_support import (
    EXIT_OK,
    command,
    fail,
    new_parser,
    run_service,
)

if TYPE_CHECKING:
    from edge_client.transport import Transport

PROG = "litefed-coordinator"

DESCRIPTION = """\
Publish a converted model (OUT.tflite + OUT.json from litefed-convert) to an
MQTT broker and run federated rounds with the edge clients that come online:
select clients, collect their updates until every one answered or the round
deadline passed, aggregate them with weighted FedAvg, evaluate, checkpoint,
and publish the new global model (retained, so boards that connect later get
it too).
"""

EPILOG = """\
examples:
  litefed-coordinator --model build/mnist_cnn.tflite --broker mqtt://127.0.0.1:1883 \\
      --rounds 20 --min-available 4 --test-data mnist-small --out runs/mnist
  litefed-coordinator --model model.tflite --broker mqtts://user:pass@broker.example:8883 \\
      --ca-file ca.pem --federation greenhouse --fraction-fit 0.1 --min-fit 10 --min-available 50 \\
      --round-timeout 600

Ctrl+C (or SIGTERM) once stops after the current poll and closes cleanly; a restarted
coordinator resumes after the last completed round (checkpoint in --out).
Press Ctrl+C twice to stop at once.
"""


def build_parser() -> argparse.ArgumentParser:
    p = new_parser(PROG, DESCRIPTION, EPILOG)
    p.add_argument("--model", required=True, type=Path, help="converted model; its manifest is read from MODEL.json")
    p.add_argument(
        "--broker", default="mqtt://127.0.0.1:1883", help="broker URL (mqtt:// or mqtts://, default %(default)s)"
    )
    t = p.add_argument_group("TLS (mqtts:// brokers only)")
    t.add_argument(
        "--ca-file", type=Path, help="CA bundle that signed the broker's certificate (default: the system's CAs)"
    )
    t.add_argument("--cert-file", type=Path, help="client certificate for mutual TLS, with --key-file (default: none)")
    t.add_argument("--key-file", type=Path, help="private key of --cert-file (default: none)")
    p.add_argument(
        "--signing-key",
        type=Path,
        metavar="FILE.pem",
        help="Ed25519 key that signs the model, global weights and rounds; boards given its public half "
        "(trust_key) accept nothing else. litefed-provision writes coordinator/signing.key (default: unsigned)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("runs/coordinator"),
        help="checkpoints and metrics.jsonl go here (default %(default)s)",
    )
    p.add_argument(
        "--test-data",
        help="held-out set for evaluation after every round: mnist-small or an .npz file (default: none)",
    )
    add_round_arguments(p)
    return p


def make_transport(broker: BrokerSettings) -> Transport:
    """The coordinator's MQTT transport (paho is imported here, not at ``--help``)."""
    from edge_client.mqtt import MqttTransport

    return MqttTransport(broker.url, broker.client_id)


@command
def main(argv: Sequence[str] | None = None) -> int:
    """Run the coordinator; return the exit status (only ``__main__`` calls ``sys.exit``)."""
    return run_service(build_parser(), argv, CoordinatorSettings.from_args, _coordinate)


def _coordinate(settings: CoordinatorSettings, stop: threading.Event) -> int:
    from coordinator.cli.wiring import build_coordinator, run_with_progress
    from coordinator.errors import CoordinatorError
    from edge_client.errors import EdgeClientError

    try:
        coordinator = build_coordinator(settings, make_transport)
        run_with_progress(coordinator, stop, progress=settings.run.progress)
    except (CoordinatorError, EdgeClientError, FileNotFoundError) as exc:
        return fail(PROG, exc)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
