"""``litefed-simulate``: a federation of virtual clients in worker processes, no broker.

Each virtual client trains the converted .tflite with the devices' own
training and encoding code; the strategies, partitioners, codecs, metrics
and plots are those of litefed-emulate and litefed-coordinator. Writes
OUT/metrics.jsonl, OUT/metrics.png and checkpoints: run the same command
again to resume an interrupted run.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger("litefed.simulate")

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
    from coordinator.cli import add_round_arguments
    from coordinator.partition import parse_partition

    p = argparse.ArgumentParser(
        prog="litefed-simulate",
        description=__doc__.split("\n\n")[1],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--clients", type=int, default=10, help="virtual clients (default %(default)s)")
    p.add_argument("--partition", type=parse_partition, default="iid", help="iid, dirichlet:ALPHA or shards:K")
    p.add_argument("--out", type=Path, default=Path("runs/simulation"), help="output directory (default %(default)s)")
    p.add_argument("--model", type=Path, help="converted model (default: the built-in MNIST CNN)")
    p.add_argument("--batch-size", type=int, default=32, help="batch size of the built-in model (default 32)")
    p.add_argument(
        "--data",
        default="mnist-small",
        help="training data: mnist-small (bundled), mnist (full; Keras cache or download), or an .npz file",
    )
    p.add_argument("--test-data", help="held-out set (default: the test split of --data, when it has one)")
    p.add_argument(
        "--workers",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="client processes; 0 trains in this process (default: cores, at most 4)",
    )
    p.add_argument("--target-accuracy", type=float, help="stop after the first round at or above this test accuracy")
    add_round_arguments(
        p,
        min_available=None,
        min_fit=None,
        mqtt=False,
        seed_help="seed of the partition, client sampling, shuffling and DP noise (default %(default)s)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    from coordinator.cli import check_round_arguments, setup_logging, signal_handlers

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
    import numpy as np

    from coordinator.builtin_models import builtin_model
    from coordinator.datasets import load_training_data
    from coordinator.emulate import summarize
    from coordinator.errors import CoordinatorError
    from coordinator.metrics import read_jsonl
    from coordinator.plots import plot_rounds
    from coordinator.runner import build_strategy, round_progress
    from coordinator.simulation import Simulation, SimulationConfig
    from edge_client.errors import EdgeClientError
    from edge_client.manifest import load_manifest, manifest_path_for

    started = time.monotonic()
    out = args.out
    try:
        args.model = args.model or builtin_model("mnist_cnn", args.batch_size)
        manifest = load_manifest(manifest_path_for(args.model))
        x, y, test = load_training_data(args.data, manifest)
        args.test_data = args.test_data or test
        parts = args.partition(y, args.clients, np.random.default_rng(args.seed))
        log.info("%d examples split %s among %d clients (sizes %d..%d)", len(x), args.partition, args.clients,
                 min(map(len, parts)), max(map(len, parts)))  # fmt: skip
        args.min_available = args.min_available or args.clients
        args.min_fit = args.min_fit or max(1, math.ceil(args.fraction_fit * args.clients))
        args.eval_threads = max(1, args.workers)  # the workers are idle while the server evaluates
        strategy = build_strategy(args, Path(args.model), dp_seed=args.seed)  # seeded noise: research only
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
    records = read_jsonl(out / "metrics.jsonl") if (out / "metrics.jsonl").exists() else []
    if records:
        label = f"{args.clients} clients, {args.partition}, {args.strategy}"
        plot_rounds({label: records}, out / "metrics.png", "litefed simulation")
    print(summarize(history, started, out))
    return 0 if records else 1


if __name__ == "__main__":
    sys.exit(main())
