"""``litefed-emulate``: a whole federation on one machine.

Starts a broker (embedded Mosquitto, or amqtt when Mosquitto is missing),
splits a dataset among N clients, starts N separate ``litefed-client``
processes, each with its own partition, state directory and log, and runs
the coordinator in this process. Writes ``OUT/metrics.jsonl``,
``OUT/metrics.png`` and a summary.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger("litefed.emulate")

EPILOG = """\
examples:
  litefed-emulate --clients 4 --rounds 5 --partition iid --out runs/demo
  litefed-emulate --clients 10 --rounds 30 --partition dirichlet:0.3 --data ../shared/data/mnist.npz --out runs/noniid
  litefed-emulate --model build/model.tflite --data train.npz --test-data test.npz --clients 3 --out runs/custom

With no --model the built-in MNIST CNN is used (converted on first use and
cached); with no --data, the MNIST subset bundled with litefed (6,000 training
and 1,000 test images), so the default run needs no network.
"""


@dataclass
class ClientProcess:
    client_id: str
    process: subprocess.Popen
    log_path: Path


def build_parser() -> argparse.ArgumentParser:
    from coordinator.cli.coordinate import add_local_federation_arguments, add_round_arguments

    p = argparse.ArgumentParser(
        prog="litefed-emulate",
        description=__doc__.split("\n\n")[1],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_local_federation_arguments(p, clients=4, clients_help="client processes to start", out="runs/emulation")
    p.add_argument(
        "--broker", default="auto", help="auto, mosquitto, amqtt, or the URL of a running broker (default %(default)s)"
    )
    add_round_arguments(
        p, min_available=None, min_fit=None, seed_help="seed of the partition and client sampling (default %(default)s)"
    )
    return p


def write_client_files(out: Path, x, y, parts, broker_url: str, federation: str, seed: int) -> list[Path]:
    """One directory per client: its data partition and its ``client.toml``."""
    configs = []
    for index, indices in enumerate(parts):
        client_id = f"client-{index:03d}"
        directory = out / "clients" / client_id
        directory.mkdir(parents=True, exist_ok=True)
        np.savez(directory / "data.npz", x=x[indices], y=y[indices])
        config = directory / "client.toml"
        config.write_text(
            f'client_id = "{client_id}"\n'
            f'broker_url = "{broker_url}"\n'
            f'federation = "{federation}"\n'
            f'state_dir = "state"\n'
            f"num_threads = 1\n"  # N clients share this machine's cores
            f"seed = {seed + index}\n"
            "\n[data]\n"
            'kind = "npz"\n'
            'path = "data.npz"\n'
        )
        configs.append(config)
    return configs


def start_clients(configs: list[Path]) -> list[ClientProcess]:
    clients = []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for config in configs:
        log_path = config.parent / "client.log"
        with open(log_path, "ab") as log_file:
            process = subprocess.Popen(
                [sys.executable, "-m", "edge_client", "--config", str(config)],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
            )
        clients.append(ClientProcess(config.parent.name, process, log_path))
    return clients


def stop_clients(clients: list[ClientProcess], timeout: float = 15.0) -> None:
    """SIGINT (a client's graceful stop), then SIGKILL whatever is left after ``timeout``."""
    for c in clients:
        if c.process.poll() is None:
            c.process.send_signal(signal.SIGINT)
    deadline = time.monotonic() + timeout
    for c in clients:
        try:
            c.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within %.0f s; killing it", c.client_id, timeout)
            c.process.kill()
            c.process.wait(timeout=5)


def _watch_clients(clients: list[ClientProcess], stop: threading.Event, done: threading.Event) -> None:
    """Report clients that die during the run (the federation itself tolerates it)."""
    reported: set[str] = set()
    while not done.wait(1.0):
        for c in clients:
            if c.process.poll() is not None and c.client_id not in reported:
                reported.add(c.client_id)
                log.warning("%s exited with code %s; see %s", c.client_id, c.process.returncode, c.log_path)
        if len(reported) == len(clients):
            log.error("every client process exited; stopping")
            stop.set()


def main(argv: list[str] | None = None) -> int:
    from coordinator.cli.coordinate import check_round_arguments, make_transport, setup_logging, signal_handlers

    parser = build_parser()
    args = parser.parse_args(argv)
    check_round_arguments(parser, args)
    setup_logging(args.verbose)
    if args.clients < 1:
        print("litefed-emulate: error: --clients must be at least 1", file=sys.stderr)
        return 2
    stop = threading.Event()
    try:
        with signal_handlers(stop):
            return _emulate(args, stop, make_transport)
    except KeyboardInterrupt:
        return 130


def _emulate(args: argparse.Namespace, stop: threading.Event, make_transport) -> int:
    from coordinator.broker import EmbeddedBroker
    from coordinator.cli.wiring import build_coordinator, prepare_local_federation, report_local_run, run_with_progress
    from coordinator.errors import CoordinatorError
    from edge_client.errors import EdgeClientError

    started = time.monotonic()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    try:
        x, y, parts = prepare_local_federation(args)
    except (CoordinatorError, EdgeClientError, FileNotFoundError, ValueError) as exc:
        print(f"litefed-emulate: error: {exc}", file=sys.stderr)
        return 1
    args.wait_for_clients = args.wait_for_clients or 300.0

    broker = None
    if "://" in args.broker:
        url = args.broker
    else:
        broker = EmbeddedBroker(kind=args.broker)
        url = broker.start()
        log.info("broker: %s (%s)", url, broker.kind)
    args.broker = url  # the coordinator connects to the broker actually running
    clients: list[ClientProcess] = []
    done = threading.Event()
    try:
        clients = start_clients(write_client_files(out, x, y, parts, url, args.federation, args.seed))
        threading.Thread(target=_watch_clients, args=(clients, stop, done), daemon=True).start()
        coordinator = build_coordinator(args, make_transport)
        history = run_with_progress(coordinator, stop, progress=not args.no_progress)
    except (CoordinatorError, EdgeClientError, FileNotFoundError, ValueError) as exc:
        print(f"litefed-emulate: error: {exc}", file=sys.stderr)
        return 1
    finally:
        done.set()
        stop_clients(clients)
        if broker is not None:
            broker.stop()
    report_local_run(history, started, out, f"{args.clients} clients, {args.partition}", "litefed emulation")
    return 0 if history else 1


if __name__ == "__main__":
    sys.exit(main())
