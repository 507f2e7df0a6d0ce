"""``litefed-emulate``: a whole federation on one machine.

Provisions the emulated fleet (a CA, a certificate per client and for the
coordinator, a Mosquitto configuration with the topic ACL) into OUT/provision,
starts an embedded Mosquitto with it on a free port of 127.0.0.1 (TLS, a
client certificate required, the ACL applied), splits a dataset among N
clients, starts N separate ``litefed-client`` processes, each with its own
identity, partition, state directory and log, and runs the coordinator, with
its own certificate, in this process. Writes ``OUT/metrics.jsonl``,
``OUT/metrics.png`` and a summary. ``--insecure`` (or a broker without
client certificates: amqtt) runs it anonymous over plain TCP instead.
"""

from __future__ import annotations

import argparse
import dataclasses
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
from coordinator.cli.settings import CoordinatorSettings, EmulateSettings, RunSettings
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
    from coordinator.provision import ProvisionResult

log = logging.getLogger("litefed.emulate")

PROG = "litefed-emulate"
PROVISION_DIR = "provision"  # under --out: the emulated fleet's identities, as litefed-provision writes them

EPILOG = """\
examples:
  litefed-emulate --clients 4 --rounds 5 --partition iid --out runs/demo
  litefed-emulate --clients 10 --rounds 30 --partition dirichlet:0.3 --data ../shared/data/mnist.npz --out runs/noniid
  litefed-emulate --model build/model.tflite --data train.npz --test-data test.npz --clients 3 --out runs/custom

With no --model the built-in MNIST CNN is used (converted on first use and
cached); with no --data, the MNIST subset bundled with litefed (6,000 training
and 1,000 test images), so the default run needs no network.

The embedded broker is the secure one a fleet runs (docs/security.md): every
client and the coordinator connect over TLS with a certificate of the fleet's
CA (in OUT/provision, kept across runs), and the ACL lets a client write only
its own update and presence topics. --insecure (or --broker amqtt, or no
mosquitto installed) runs anonymous over plain TCP: any local process can then
publish on any topic.
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
    p.add_argument(
        "--insecure",
        action="store_true",
        help="INSECURE: anonymous clients over plain TCP, no ACL (default: TLS with provisioned identities and "
        "the ACL, on mosquitto)",
    )
    add_round_arguments(
        p, min_available=None, min_fit=None, seed_help="seed of the partition and client sampling (default %(default)s)"
    )
    return p


def client_ids(count: int) -> list[str]:
    """The emulated clients' ids: ``client-000``, ``client-001``, ..."""
    return [f"client-{index:03d}" for index in range(count)]


def write_client_files(
    out: Path,
    x,
    y,
    parts,
    broker_url: str,
    federation: str,
    seed: int,
    *,
    topic_prefix: str = "litefed",
    identities: ProvisionResult | None = None,
) -> list[Path]:
    """One directory per client: its data partition and its ``client.toml``.

    With ``identities`` (the provisioned fleet), each ``client.toml`` names
    its client's CA, certificate and key there, and the coordinator's public
    key (``trust_key``), relative to the file.
    """
    configs: list[Path] = []
    for client_id, indices in zip(client_ids(len(parts)), parts, strict=True):
        directory = out / "clients" / client_id
        directory.mkdir(parents=True, exist_ok=True)
        np.savez(directory / "data.npz", x=x[indices], y=y[indices])
        tls = {} if identities is None else identities.tls_files(client_id)
        if identities is not None:  # the coordinator signs: boards act only on what it signed
            tls["trust_key"] = identities.trust_key(client_id)
        config = directory / "client.toml"
        config.write_text(
            f'client_id = "{client_id}"\n'
            f'broker_url = "{broker_url}"\n'
            f'federation = "{federation}"\n'
            f'topic_prefix = "{topic_prefix}"\n'
            f'state_dir = "state"\n'
            f"num_threads = 1\n"  # N clients share this machine's cores
            f"seed = {seed + len(configs)}\n"
            + "".join(f'{key} = "{os.path.relpath(path, directory)}"\n' for key, path in tls.items())
            + "\n[data]\n"
            'kind = "npz"\n'
            'path = "data.npz"\n'
        )
        configs.append(config)
    return configs


def provision_fleet(folder: Path, ids: Sequence[str], federation: str, topic_prefix: str) -> ProvisionResult:
    """The emulated fleet's identities in ``folder``, written by litefed-provision's API.

    The broker's certificate names 127.0.0.1 and localhost. A re-run keeps
    the CA and every key, and drops the clients no longer emulated.
    """
    from coordinator.provision import FleetSpec, provision

    return provision(folder, FleetSpec(federation, topic_prefix, devices=tuple(ids)))


def secure_broker(fleet: ProvisionResult) -> EmbeddedBroker:
    """Mosquitto serving ``fleet``'s configuration (TLS, client certificates, the ACL) on a free port of 127.0.0.1."""
    from coordinator.broker import EmbeddedBroker

    return EmbeddedBroker(kind="mosquitto", tls_config=fleet.broker_config)


def runs_secure(settings: EmulateSettings) -> bool:
    """Whether the embedded broker serves provisioned identities; warns when it does not.

    Secure unless ``--insecure``, and unless the broker is amqtt (asked for,
    or mosquitto missing), which has no client-certificate identities.
    """
    from coordinator.broker import find_mosquitto

    insecure = "anonymous clients over plain TCP and no ACL: any local process can publish on any topic"
    if settings.insecure:
        log.warning("INSECURE emulation (--insecure): %s; leave out --insecure for TLS and the ACL", insecure)
        return False
    if settings.broker_kind == "amqtt" or (settings.broker_kind == "auto" and find_mosquitto() is None):
        why = "--broker amqtt" if settings.broker_kind == "amqtt" else "mosquitto is not installed"
        log.warning(
            "INSECURE emulation (%s: amqtt cannot require client certificates nor apply the ACL): %s; install "
            "mosquitto (scripts/setup.sh, or apt-get install mosquitto) for the secure path, or pass --insecure",
            why,
            insecure,
        )
        return False
    return True


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
    broker: EmbeddedBroker | None = None
    fleet: ProvisionResult | None = None
    clients: list[ClientProcess] = []
    done = threading.Event()
    try:
        if settings.broker_url is not None:
            url = settings.broker_url
        elif runs_secure(settings):
            fleet = _provision(run.out / PROVISION_DIR, settings)
            broker = secure_broker(fleet)
            url = _start(broker, fleet)
        else:
            broker = EmbeddedBroker(kind=settings.broker_kind)
            url = _start(broker)
        files = write_client_files(run.out, federation.x, federation.y, federation.parts, url.geturl(redact=False),
                                   settings.service.federation, run.seed, topic_prefix=settings.service.topic_prefix,
                                   identities=fleet)  # fmt: skip
        clients = start_clients(files)
        threading.Thread(target=_watch_clients, args=(clients, stop, done), daemon=True).start()
        coordinator = build_coordinator(_coordinator_settings(settings, federation.run, url, fleet), make_transport)
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


def _provision(folder: Path, settings: EmulateSettings) -> ProvisionResult:
    ids = client_ids(settings.local.clients)
    started = time.monotonic()
    fleet = provision_fleet(folder, ids, settings.service.federation, settings.service.topic_prefix)
    log.info(
        "secure emulation: %d clients and the coordinator on provisioned identities (TLS with client certificates, "
        "the topic ACL); their files are in %s (%.2f s)",
        len(ids),
        folder,
        time.monotonic() - started,
    )
    return fleet


def _start(broker: EmbeddedBroker, fleet: ProvisionResult | None = None) -> BrokerUrl:
    """Start ``broker``; the URL the coordinator connects to, with its TLS identity when ``fleet`` is given."""
    url = broker.start()
    if fleet is None:
        log.info("broker: %s (%s)", url, broker.kind)
        return BrokerUrl.parse(url)
    log.info("broker: %s (%s with %s)", url, broker.kind, fleet.broker_config)
    return BrokerUrl.parse(url, **fleet.tls_files(fleet.spec.coordinator))


def _coordinator_settings(
    settings: EmulateSettings, run: RunSettings, url: BrokerUrl, fleet: ProvisionResult | None
) -> CoordinatorSettings:
    """The coordinator's settings; on provisioned identities it signs with the fleet's key and, as
    coordinator.sh does, takes presence from the provisioned ids only (unless --clients-file says otherwise)."""
    coordinator = settings.coordinator(run, url)
    service = coordinator.service
    if fleet is None:
        return coordinator
    service = dataclasses.replace(service, signing_key=fleet.signing_key)
    if service.bounds.allowed_clients is None:
        bounds = dataclasses.replace(service.bounds, allowed_clients=frozenset(fleet.spec.devices))
        service = dataclasses.replace(service, bounds=bounds)
    return dataclasses.replace(coordinator, service=service)


if __name__ == "__main__":
    sys.exit(main())
