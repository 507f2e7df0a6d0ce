"""The options the coordinator's commands share: rounds, client training, aggregation, DP, local runs.

``litefed-coordinator``, ``litefed-emulate`` and ``litefed-simulate`` define
their arguments with these functions, and :mod:`coordinator.cli.settings`
turns the parsed arguments into frozen settings. Only what ``--help`` needs
is imported here (the strategy classes, for their defaults), so it stays quick.
"""

from __future__ import annotations

import argparse
import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from edge_client.cli_support import add_verbose_argument

if TYPE_CHECKING:
    from coordinator.strategies import FedAvg


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
        r.add_argument(
            "--broker-outage-timeout",
            type=float,
            default=600.0,
            help="seconds the broker may stay unreachable (publishes retried meanwhile) before the coordinator "
            "stops with an error (default %(default)s)",
        )
    if mqtt:
        _add_bound_arguments(p)
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
    add_verbose_argument(p)


def _add_bound_arguments(p: argparse.ArgumentParser) -> None:
    """What the coordinator takes from clients at most: no message may stop it (docs/protocol.md, "Hostile input")."""
    b = p.add_argument_group("bounds on what clients send")
    b.add_argument(
        "--max-clients", type=int, default=10_000, help="online clients considered at most (default %(default)s)"
    )
    b.add_argument(
        "--presence-rate",
        type=int,
        default=12,
        help="presence changes per client per minute; beyond, its presence is ignored for the rest of the minute "
        "(default %(default)s)",
    )
    b.add_argument(
        "--clients-file",
        type=Path,
        help="file of allowed client ids, one per line (# comments); presence of any other id is ignored "
        "(default: any id)",
    )
    b.add_argument(
        "--max-examples",
        type=int,
        default=10_000_000,
        help="largest num_examples an update may claim (also never more than its presence) (default %(default)s)",
    )
    b.add_argument(
        "--max-update-norm",
        type=float,
        help="refuse updates whose L2 norm exceeds this (default: no bound)",
    )


def _default(cls: type, parameter: str) -> object:
    """The default of ``cls(parameter=...)``: the class is the one place that holds it."""
    return inspect.signature(cls).parameters[parameter].default


def _server_lr_defaults(strategies: Mapping[str, type[FedAvg]]) -> str:
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


def codec_name(value: str) -> str:
    """argparse type: a codec the clients can be asked to use."""
    from edge_client.codecs import get_codec
    from edge_client.errors import ProtocolError

    try:
        get_codec(value)
    except ProtocolError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value
