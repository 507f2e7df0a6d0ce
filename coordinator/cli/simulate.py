"""``litefed-simulate``: a federation of virtual clients in worker processes, no broker.

Each virtual client trains the converted .tflite with the devices' own
training and encoding code; the strategies, partitioners, codecs, metrics
and plots are those of litefed-emulate and litefed-coordinator. Writes
OUT/metrics.jsonl, OUT/metrics.png and checkpoints: run the same command
again to resume an interrupted run.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections.abc import Sequence

from coordinator.cli.options import add_local_federation_arguments, add_round_arguments
from coordinator.cli.settings import SimulateSettings
from edge_client.cli_support import (
    EXIT_OK,
    EXIT_RUNTIME,
    command,
    fail,
    new_parser,
    run_service,
)

PROG = "litefed-simulate"

EPILOG = """\
examples:
  litefed-simulate --clients 10 --rounds 5 --epochs 2 --lr 0.05 --out runs/sim
  litefed-simulate --data ../shared/data/mnist.npz --clients 100 --fraction-fit 0.1 --epochs 5 \\
      --batch-size 10 --lr 0.05 --partition shards:2 --rounds 300 --target-accuracy 0.99 --out runs/noniid
  litefed-simulate --strategy fedavgm --server-lr 1.0 --server-momentum 0.9 --out runs/fedavgm
  litefed-simulate --codec topk:0.1 --dp-clip 1.0 --dp-noise 0.5 --out runs/private
  litefed-plot runs/sim runs/noniid --out compare.png

With no --model the built-in MNIST CNN is used (converted on first use and
cached); with no --data, the MNIST subset bundled with litefed. Results
depend only on --seed, not on --workers.
"""


def build_parser() -> argparse.ArgumentParser:
    p = new_parser(PROG, __doc__.split("\n\n")[1], EPILOG)
    add_local_federation_arguments(p, clients=10, clients_help="virtual clients", out="runs/simulation")
    p.add_argument(
        "--workers",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="client processes; 0 trains in this process (default: cores, at most 4)",
    )
    p.add_argument(
        "--target-accuracy",
        type=float,
        help="stop after the first round at or above this test accuracy (default: run every round)",
    )
    add_round_arguments(
        p,
        min_available=None,
        min_fit=None,
        mqtt=False,
        seed_help="seed of the partition, client sampling, shuffling and DP noise (default %(default)s)",
    )
    return p


@command
def main(argv: Sequence[str] | None = None) -> int:
    """Run the simulation; return the exit status (only ``__main__`` calls ``sys.exit``)."""
    return run_service(build_parser(), argv, SimulateSettings.from_args, _simulate)


def _simulate(settings: SimulateSettings, stop: threading.Event) -> int:
    from coordinator.cli.wiring import (
        build_strategy,
        model_of,
        prepare_local_federation,
        report_local_run,
        round_progress,
    )
    from coordinator.errors import CoordinatorError
    from coordinator.simulator import Simulation, SimulationConfig
    from edge_client.errors import EdgeClientError

    started = time.monotonic()
    run, local = settings.run, settings.local
    try:
        federation = prepare_local_federation(run, local)
        config = SimulationConfig(
            model_path=model_of(federation.run),
            rounds=run.rounds,
            workers=settings.workers,
            seed=run.seed,
            out=run.out,
            target_accuracy=settings.target_accuracy,
        )
        simulation = Simulation(config, build_strategy(federation.run), federation.datasets())
        with round_progress(run.rounds, simulation.completed_round, run.progress) as on_round:
            simulation.on_round = on_round
            history = simulation.run(stop)
    except (CoordinatorError, EdgeClientError, FileNotFoundError, ValueError) as exc:
        return fail(PROG, exc)
    label = f"{local.clients} clients, {local.partition}, {run.strategy.name}"
    records = report_local_run(history, started, run.out, label, "litefed simulation")
    return EXIT_OK if records else EXIT_RUNTIME


if __name__ == "__main__":
    sys.exit(main())
