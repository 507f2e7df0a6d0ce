"""``litefed-client``: run one edge client of a federation until interrupted."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_client.broker_url import redact_url
from edge_client.cli_support import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_RUNTIME,
    EXIT_USAGE,
    Interrupted,
    StopSignals,
    add_verbose_argument,
    command,
    new_parser,
    print_error,
    setup_logging,
)
from edge_client.config import DATA_KINDS, ClientConfig, load_config, parse_data_spec
from edge_client.errors import BrokerUrlError, ConfigError, DataError, EdgeClientError, KeyFileError, StateError
from edge_client.transport import BOARD_QUEUE_BYTES, Message, Transport

if TYPE_CHECKING:
    from edge_client.client import EdgeClient

log = logging.getLogger("edge_client.cli")

PROG = "litefed-client"

DESCRIPTION = """\
Run a litefed edge client: connect to the federation's MQTT broker, download
the model and the global weights, train on local data when a round selects
this device, and send the weight update. State (model, global weights,
progress) is kept in --state-dir, so a board that loses power resumes where
it stopped.

Settings come from a TOML file (--config); flags override it. A broker that
cannot be reached is retried (with backoff) until it answers, at start as
after a lost connection. Ctrl-C or SIGTERM stops gracefully (offline presence,
clean disconnect); a second one exits at once.
"""

EPILOG = f"""\
example config file (client.toml); only client_id and [data] are required:

  client_id = "pi-17"                 # 1-64 of A-Z a-z 0-9 _ . -
  broker_url = "mqtts://pi-17:secret@broker.example.com:8883"
  federation = "default"
  state_dir = "/var/lib/litefed/pi-17"  # default ~/.local/state/litefed/<federation>/<client_id>
  ack_timeout = 30                    # seconds before an unacknowledged update is resent
  max_resends = 5
  # num_threads = 2                   # LiteRT threads;  seed = 17  # shuffling seed
  # ca_file = "ca.pem"                # mqtts only; cert_file + key_file for mutual TLS
  # trust_key = "coordinator.pub"     # accept only models, weights and rounds the coordinator signed

  [data]
  kind = "npz"                        # {" | ".join(DATA_KINDS)}
  path = "data/part-3.npz"            # relative to the config file
  x_key = "x"                         # npz: array names
  y_key = "y"
  # images: labels = ["cat", "dog"]   (folders path/<label>/*.png, resized to the model input)
  # csv:    label_column = -1, has_header = true, delimiter = ","

examples:
  litefed-client --config client.toml
  litefed-client --client-id pi-17 --broker mqtt://192.168.1.10:1883 --data npz:part-3.npz
  litefed-client --config client.toml --data csv:readings.csv -v
  litefed-client --client-id pi-3 --data npz:mnist.npz --x-key x_test --y-key y_test

exit status: 0 stopped normally, 1 runtime error (broker, disk), 2 bad configuration or data,
130 stopped by a second interrupt
"""


def build_parser() -> argparse.ArgumentParser:
    p = new_parser(PROG, DESCRIPTION, EPILOG)
    p.add_argument("--config", type=Path, metavar="FILE.toml", help="TOML settings file (see below)")
    p.add_argument("--broker", metavar="URL", help="broker URL, mqtt://[user:pass@]host[:port] or mqtts://...")
    p.add_argument("--client-id", metavar="ID", help="this device's id, unique in the federation")
    p.add_argument("--federation", metavar="NAME", help="federation name (default 'default')")
    p.add_argument("--data", metavar="KIND:PATH", help=f"training data; KIND is one of {', '.join(DATA_KINDS)}")
    p.add_argument("--x-key", metavar="NAME", help="npz data: the inputs' array (default 'x', else 'x_train')")
    p.add_argument("--y-key", metavar="NAME", help="npz data: the labels' array (default 'y', else 'y_train')")
    p.add_argument("--state-dir", type=Path, metavar="DIR", help="where the model, weights and progress are kept")
    p.add_argument(
        "--trust-key",
        type=Path,
        metavar="FILE.pem",
        help="the coordinator's public key: accept only what it signed (litefed-provision writes coordinator.pub)",
    )
    add_verbose_argument(p)
    return p


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The flags that were given, under the config file's key names."""
    overrides: dict[str, Any] = {
        "broker_url": args.broker,
        "client_id": args.client_id,
        "federation": args.federation,
        "state_dir": args.state_dir,
        "trust_key": args.trust_key,
    }
    data: dict[str, Any] = parse_data_spec(args.data) if args.data is not None else {}
    data.update({k: v for k, v in (("x_key", args.x_key), ("y_key", args.y_key)) if v is not None})
    if data:
        overrides["data"] = data
    return {k: v for k, v in overrides.items() if v is not None}


def make_transport(config: ClientConfig, will: Message) -> Transport:
    """The MQTT transport for ``config``: the one place that knows MqttTransport's constructor."""
    from edge_client.mqtt import MqttTransport  # paho is imported only here

    # A board's receive queue is bounded lower than the coordinator's: it holds retained state, not updates.
    return MqttTransport(config.broker(), config.client_id, will=will, queue_bytes=BOARD_QUEUE_BYTES)


@command
def main(argv: Sequence[str] | None = None, *, transport_factory: Callable[..., Transport] | None = None) -> int:
    """Run the client; return the exit status (only ``__main__`` calls ``sys.exit``)."""
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        config = load_config(args.config, overrides_from_args(args))
    except ConfigError as exc:
        print_error(PROG, exc, label="configuration error")
        return EXIT_USAGE
    with StopSignals() as signals:
        return _run(config, signals, transport_factory or make_transport)


def _run(config: ClientConfig, signals: StopSignals, transport_factory: Callable[..., Transport]) -> int:
    """Start the client and run it until ``signals`` says stop; the exit status."""
    from edge_client.client import EdgeClient, last_will  # after logging is set up: loads LiteRT

    client = None
    try:
        log.info(
            "client %r, federation %r, broker %s, data %s, state %s",
            config.client_id,
            config.federation,
            redact_url(config.broker_url),
            config.data.describe() if config.data else "none",
            config.state_dir,
        )
        try:
            client = EdgeClient(config, transport_factory(config, last_will(config)))
            client.start(signals.stop)  # a broker that is down is retried until it answers (or a stop)
        except (BrokerUrlError, DataError, StateError, ConfigError, KeyFileError) as exc:
            log.error("%s", exc)
            return EXIT_USAGE
        client.run(signals.stop)
        return EXIT_OK
    except Interrupted:
        log.warning("interrupted twice: exiting without a clean shutdown")
        client = None  # no offline presence: the broker's Last Will says it
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:  # e.g. SIGINT while handlers could not be installed
        return EXIT_INTERRUPTED
    except EdgeClientError as exc:
        log.error("%s", exc)
        return EXIT_RUNTIME
    except Exception:
        log.exception("unexpected error")
        return EXIT_RUNTIME
    finally:
        _close(client)


def _close(client: EdgeClient | None) -> None:
    """Close ``client`` (offline presence, clean disconnect) unless a second interrupt cuts it short."""
    try:
        if client is not None:
            client.close()
    except KeyboardInterrupt:  # interrupted again while shutting down
        pass
