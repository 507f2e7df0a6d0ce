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
from pathlib import Path

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
    from coordinator.cli.coordinate import add_local_federation_arguments, add_round_arguments

    p = argparse.ArgumentParser(
        prog="litefed-simulate",
        description=__doc__.split("\n\n")[1],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
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


def main(argv: list[str] | None = None) -> int:
    from coordinator.cli.coordinate import check_round_arguments, setup_logging, signal_handlers

    parser = build_parser()
    args = parser.parse_args(argv)
    check_round_arguments(parser, args)
    setup_logging(args.verbose)
    if args.clients < 1 or args.workers < 0:
        print("litefed-simulate: error: --clients must be >= 1 and --workers >= 0", file=sys.stderr)
        return 2
    stop = threading.Event()
    try:
        with signal_handlers(stop):
            return _simulate(args, stop)
    except KeyboardInterrupt:
        return 130


def _simulate(args: argparse.Namespace, stop: threading.Event) -> int:
    from coordinator.cli.wiring import build_strategy, prepare_local_federation, report_local_run, round_progress
    from coordinator.errors import CoordinatorError
    from coordinator.simulator import Simulation, SimulationConfig
    from edge_client.errors import EdgeClientError

    started = time.monotonic()
    out = args.out
    try:
        x, y, parts = prepare_local_federation(args)
        # Seeded DP noise: research only. The workers are idle while the server evaluates.
        strategy = build_strategy(args, Path(args.model), dp_seed=args.seed, eval_threads=max(1, args.workers))
        datasets = {f"client-{i:03d}": (x[idx], y[idx]) for i, idx in enumerate(parts)}
        config = SimulationConfig(
            model_path=Path(args.model),
            rounds=args.rounds,
            workers=args.workers,
            seed=args.seed,
            out=out,
            target_accuracy=args.target_accuracy,
        )
        simulation = Simulation(config, strategy, datasets)
        with round_progress(args.rounds, simulation.completed_round, not args.no_progress) as on_round:
            simulation.on_round = on_round
            history = simulation.run(stop)
    except (CoordinatorError, EdgeClientError, FileNotFoundError, ValueError) as exc:
        print(f"litefed-simulate: error: {exc}", file=sys.stderr)
        return 1
    label = f"{args.clients} clients, {args.partition}, {args.strategy}"
    records = report_local_run(history, started, out, label, "litefed simulation")
    return 0 if records else 1


if __name__ == "__main__":
    sys.exit(main())
