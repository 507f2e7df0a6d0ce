"""``litefed-coordinator``: run federated rounds of a converted model over MQTT."""

from __future__ import annotations

import argparse
import contextlib
import inspect
import logging
import math
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

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
      --federation greenhouse --fraction-fit 0.1 --min-fit 10 --min-available 50 --round-timeout 600

Ctrl+C once stops after the current poll and closes cleanly; a restarted
coordinator resumes after the last completed round (checkpoint in --out).
Press Ctrl+C twice to stop at once.
"""


def add_round_arguments(
    p: argparse.ArgumentParser,
    min_available: int | None = 2,
    min_fit: int | None = 2,
    mqtt: bool = True,
    seed_help: str = "client sampling seed (default %(default)s)",
) -> None:
    """Options shared by ``litefed-coordinator``, ``litefed-emulate`` and (without ``mqtt``) ``litefed-simulate``.

    ``min_available`` / ``min_fit`` None: filled in from ``--clients`` (local runs).
    """
    from coordinator.strategies import STRATEGIES  # NumPy, no TensorFlow or LiteRT: --help stays quick

    if mqtt:
        p.add_argument(
            "--federation", default="default", help="federation name in the topic tree (default %(default)s)"
        )
        p.add_argument("--topic-prefix", default="litefed", help="topic prefix (default %(default)s)")
    r = p.add_argument_group("rounds")
    r.add_argument("--rounds", type=int, default=10, help="rounds to run in total (default %(default)s)")
    local = "(default: --clients)" if min_available is None else "(default %(default)s)"
    r.add_argument(
        "--min-available", type=int, default=min_available, help=f"clients online before a round starts {local}"
    )
    fit = "(default: fraction-fit x clients, at least 1)" if min_fit is None else "(default %(default)s)"
    r.add_argument("--min-fit", type=int, default=min_fit, help=f"updates needed to close a round {fit}")
    r.add_argument(
        "--fraction-fit", type=float, default=1.0, help="fraction of online clients selected (default %(default)s)"
    )
    if mqtt:
        r.add_argument(
            "--round-timeout", type=float, default=120.0, help="seconds clients get per round (default %(default)s)"
        )
        r.add_argument(
            "--max-attempts", type=int, default=3, help="tries per round before giving up (default %(default)s)"
        )
        r.add_argument(
            "--wait-for-clients",
            type=float,
            help="give up if not enough clients within this many seconds (default: wait until stopped)",
        )
    c = p.add_argument_group("client training")
    c.add_argument("--epochs", type=int, default=1, help="local epochs per round (default %(default)s)")
    c.add_argument("--lr", type=float, default=None, help="client learning rate (default: the manifest's)")
    c.add_argument(
        "--lr-decay",
        type=float,
        default=1.0,
        help="multiply the client learning rate by this every round, in (0, 1] (default %(default)s: constant)",
    )
    c.add_argument(
        "--mu",
        type=float,
        help=f"FedProx proximal weight (default 0; {_default(STRATEGIES['fedprox'], 'mu')} with --strategy fedprox)",
    )
    c.add_argument(
        "--codec",
        type=codec_name,
        default="float32",
        help="update encoding: float32, float16, int8, int8-channel, topk:FRACTION or topk16:FRACTION "
        "(default %(default)s)",
    )
    s = p.add_argument_group("aggregation")
    s.add_argument(
        "--strategy", choices=list(STRATEGIES), default="fedavg", help="server strategy (default %(default)s)"
    )
    s.add_argument("--server-lr", type=float, help=f"server learning rate (default: {_server_lr_defaults(STRATEGIES)})")
    s.add_argument(
        "--server-momentum",
        type=float,
        default=_default(STRATEGIES["fedavgm"], "server_momentum"),
        help="fedavgm momentum (default %(default)s)",
    )
    s.add_argument(
        "--trim-beta",
        type=float,
        default=_default(STRATEGIES["trimmed-mean"], "beta"),
        help="trimmed-mean: fraction cut at each end; needs --min-fit >= 1/beta (default %(default)s)",
    )
    s.add_argument(
        "--byzantine",
        type=int,
        default=_default(STRATEGIES["krum"], "num_byzantine"),
        help="krum: tolerated malicious clients f; needs --min-fit >= 2f + 3 (default %(default)s)",
    )
    d = p.add_argument_group("differential privacy (client-level, central)")
    d.add_argument("--dp-clip", type=float, help="clip each client's update to this L2 norm (enables DP; default off)")
    d.add_argument(
        "--dp-noise", type=float, default=0.0, help="noise multiplier z: std z*clip/clients (default %(default)s)"
    )
    d.add_argument("--dp-delta", type=float, default=1e-5, help="delta of the reported epsilon (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help=seed_help)
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _default(cls: type, parameter: str) -> object:
    """The default of ``cls(parameter=...)``: the class is the one place that holds it."""
    return inspect.signature(cls).parameters[parameter].default


def _server_lr_defaults(strategies: dict[str, type]) -> str:
    """``1.0 for fedavg, ...; 0.1 for fedadagrad; ...``, grouped by value, from the classes."""
    by_rate: dict[float, list[str]] = {}
    for name, cls in strategies.items():
        by_rate.setdefault(cls.DEFAULT_SERVER_LR, []).append(name)
    return "; ".join(f"{rate:g} for {', '.join(names)}" for rate, names in by_rate.items())


def add_local_federation_arguments(p: argparse.ArgumentParser, clients: int, clients_help: str, out: str) -> None:
    """Model, data and partition options shared by ``litefed-emulate`` and ``litefed-simulate``."""
    p.add_argument("--clients", type=int, default=clients, help=f"{clients_help} (default %(default)s)")
    p.add_argument(
        "--partition",
        type=partition_spec,
        default="iid",
        help="iid, dirichlet:ALPHA or shards:K (default %(default)s)",
    )
    p.add_argument("--out", type=Path, default=Path(out), help="output directory (default %(default)s)")
    p.add_argument("--model", type=Path, help="converted model (default: the built-in MNIST CNN)")
    p.add_argument("--batch-size", type=int, default=32, help="batch size of the built-in model (default %(default)s)")
    p.add_argument(
        "--data",
        default="mnist-small",
        help="training data: mnist-small (bundled), mnist (full; Keras cache or download), or an .npz file "
        "(default %(default)s)",
    )
    p.add_argument("--test-data", help="held-out set (default: the test split of --data, when it has one)")


def partition_spec(value: str):
    """argparse type for ``--partition``: a bad spec is a one-line usage error listing the valid forms."""
    from coordinator.errors import PartitionError
    from coordinator.partition import parse_partition

    try:
        return parse_partition(value)
    except PartitionError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def fill_local_round_sizes(args: argparse.Namespace) -> None:
    """Local runs: ``--min-available`` defaults to ``--clients``, ``--min-fit`` to ``fraction-fit x clients``."""
    args.min_available = args.min_available or args.clients
    args.min_fit = args.min_fit or max(1, math.ceil(args.fraction_fit * args.clients))


def strategy_options(args: argparse.Namespace) -> dict:
    """The keyword arguments of ``STRATEGIES[args.strategy]`` that the options set (defaults: the class's)."""
    options: dict = dict(
        fraction_fit=args.fraction_fit, min_fit=args.min_fit, min_available=args.min_available, lr_decay=args.lr_decay
    )
    if args.server_lr is not None:
        options["server_lr"] = args.server_lr
    extra = {
        "fedavgm": {"server_momentum": args.server_momentum},
        "fedprox": {} if args.mu is None else {"mu": args.mu},
        "trimmed-mean": {"beta": args.trim_beta},
        "krum": {"num_byzantine": args.byzantine},
    }
    return options | extra.get(args.strategy, {})


def check_round_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse option combinations that cannot work, before anything is loaded (exits with 2).

    Local runs (``args.clients`` set) get ``--min-available`` / ``--min-fit``
    filled in from ``--clients`` here. The strategy is built once, without
    data, so its own checks (Krum's and the trimmed mean's client counts,
    hyper-parameter ranges) are one-line usage errors too.
    """
    if args.dp_noise and args.dp_clip is None:
        parser.error("--dp-noise needs --dp-clip: the noise is calibrated to the clipping norm")
    if args.dp_clip is not None and not args.dp_clip > 0:
        parser.error(f"--dp-clip must be positive, got {args.dp_clip}")
    if not 0 < args.lr_decay <= 1:
        parser.error(f"--lr-decay must be in (0, 1], got {args.lr_decay}")
    if args.dp_noise < 0 or not 0 < args.dp_delta < 1:
        parser.error("--dp-noise must be >= 0 and --dp-delta in (0, 1)")
    if getattr(args, "clients", None) is not None:
        if args.clients < 1:
            parser.error(f"--clients must be >= 1, got {args.clients}")
        fill_local_round_sizes(args)
    from coordinator.errors import CoordinatorError
    from coordinator.strategies import STRATEGIES

    try:
        STRATEGIES[args.strategy](**strategy_options(args))
    except CoordinatorError as exc:
        parser.error(str(exc))


def codec_name(value: str) -> str:
    """argparse type: a codec the clients can be asked to use."""
    from edge_client.codecs import get_codec
    from edge_client.errors import ProtocolError

    try:
        get_codec(value)
    except ProtocolError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="litefed-coordinator",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, type=Path, help="converted model; its manifest is read from MODEL.json")
    p.add_argument(
        "--broker", default="mqtt://127.0.0.1:1883", help="broker URL (mqtt:// or mqtts://, default %(default)s)"
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


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def make_transport(url: str, client_id: str):
    from edge_client.mqtt import MqttTransport

    return MqttTransport(url, client_id)


@contextlib.contextmanager
def signal_handlers(stop: threading.Event) -> Iterator[None]:
    """First Ctrl+C/SIGTERM: set ``stop`` (graceful); a second Ctrl+C interrupts at once.

    The previous handlers come back on exit, so in-process callers (tests,
    notebooks) keep theirs.
    """
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def first(signum, frame):
        logging.getLogger("litefed").warning("stopping (press Ctrl+C again to stop at once)")
        stop.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    for sig in previous:
        signal.signal(sig, first)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_round_arguments(parser, args)
    setup_logging(args.verbose)
    from coordinator.cli.wiring import build_coordinator, run_with_progress
    from coordinator.errors import CoordinatorError
    from edge_client.errors import EdgeClientError

    stop = threading.Event()
    try:
        with signal_handlers(stop):
            coordinator = build_coordinator(args, make_transport)
            run_with_progress(coordinator, stop, progress=not args.no_progress)
    except (CoordinatorError, EdgeClientError, FileNotFoundError) as exc:
        print(f"litefed-coordinator: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
