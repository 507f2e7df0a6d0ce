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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from coordinator.cli.options import add_local_federation_arguments, add_round_arguments
from coordinator.cli.settings import EmulateSettings
from edge_client.broker_url import BrokerUrl
from edge_client.cli_support import (
    EXIT_OK,
    EXIT_RUNTIME,
    command,
    fail,
    new_parser,
    run_service,
)

if TYPE_CHECKING:
    from coordinator.broker import EmbeddedBroker

log = logging.getLogger("litefed.emulate")

PROG = "litefed-emulate"

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
    p = new_parser(PROG, __doc__.split("\n\n")[1], EPILOG)
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


@command
def main(argv: Sequence[str] | None = None) -> int:
    """Run the emulation; return the exit status (only ``__main__`` calls ``sys.exit``)."""
    return run_service(build_parser(), argv, EmulateSettings.from_args, _emulate)


def _emulate(settings: EmulateSettings, stop: threading.Event) -> int:
    from coordinator.broker import EmbeddedBroker
    from coordinator.cli.coordinate import make_transport
    from coordinator.cli.wiring import build_coordinator, prepare_local_federation, report_local_run, run_with_progress
    from coordinator.errors import CoordinatorError
    from edge_client.errors import EdgeClientError

    errors = (CoordinatorError, EdgeClientError, FileNotFoundError, ValueError)
    started = time.monotonic()
    run, local = settings.run, settings.local
    run.out.mkdir(parents=True, exist_ok=True)
    try:
        federation = prepare_local_federation(run, local)
    except errors as exc:
        return fail(PROG, exc)
    broker = EmbeddedBroker(kind=settings.broker_kind) if settings.broker_url is None else None
    clients: list[ClientProcess] = []
    done = threading.Event()
    try:
        url = settings.broker_url if broker is None else _start(broker)  # the coordinator connects to it
        assert url is not None  # there is an embedded broker exactly when no URL is given
        files = write_client_files(run.out, federation.x, federation.y, federation.parts, url.geturl(redact=False),
                                   settings.service.federation, run.seed)  # fmt: skip
        clients = start_clients(files)
        threading.Thread(target=_watch_clients, args=(clients, stop, done), daemon=True).start()
        coordinator = build_coordinator(settings.coordinator(federation.run, url), make_transport)
        history = run_with_progress(coordinator, stop, progress=run.progress)
    except errors as exc:
        return fail(PROG, exc)
    finally:
        done.set()
        stop_clients(clients)
        if broker is not None:
            broker.stop()
    report_local_run(history, started, run.out, f"{local.clients} clients, {local.partition}", "litefed emulation")
    return EXIT_OK if history else EXIT_RUNTIME


def _start(broker: EmbeddedBroker) -> BrokerUrl:
    url = broker.start()
    log.info("broker: %s (%s)", url, broker.kind)
    return BrokerUrl.parse(url)


if __name__ == "__main__":
    sys.exit(main())
