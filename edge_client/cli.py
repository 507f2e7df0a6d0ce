"""``litefed-client``: run one edge client of a federation until interrupted."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from edge_client.config import DATA_KINDS, ClientConfig, load_config, parse_data_spec
from edge_client.errors import BrokerUrlError, ConfigError, DataError, EdgeClientError, StateError
from edge_client.transport import Message, Transport, redact_url

log = logging.getLogger("edge_client.cli")

EXIT_OK, EXIT_RUNTIME, EXIT_CONFIG = 0, 1, 2
EXIT_INTERRUPTED = 130

DESCRIPTION = """\
Run a litefed edge client: connect to the federation's MQTT broker, download
the model and the global weights, train on local data when a round selects
this device, and send the weight update. State (model, global weights,
progress) is kept in --state-dir, so a board that loses power resumes where
it stopped.

Settings come from a TOML file (--config); flags override it. Ctrl-C or
SIGTERM stops gracefully (offline presence, clean disconnect); a second one
exits at once.
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
    p = argparse.ArgumentParser(
        prog="litefed-client",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", type=Path, metavar="FILE.toml", help="TOML settings file (see below)")
    p.add_argument("--broker", metavar="URL", help="broker URL, mqtt://[user:pass@]host[:port] or mqtts://...")
    p.add_argument("--client-id", metavar="ID", help="this device's id, unique in the federation")
    p.add_argument("--federation", metavar="NAME", help="federation name (default 'default')")
    p.add_argument("--data", metavar="KIND:PATH", help=f"training data; KIND is one of {', '.join(DATA_KINDS)}")
    p.add_argument("--x-key", metavar="NAME", help="npz data: the inputs' array (default 'x', else 'x_train')")
    p.add_argument("--y-key", metavar="NAME", help="npz data: the labels' array (default 'y', else 'y_train')")
    p.add_argument("--state-dir", type=Path, metavar="DIR", help="where the model, weights and progress are kept")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v: debug)")
    return p


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The flags that were given, under the config file's key names."""
    overrides: dict[str, Any] = {
        "broker_url": args.broker,
        "client_id": args.client_id,
        "federation": args.federation,
        "state_dir": args.state_dir,
    }
    data: dict[str, Any] = parse_data_spec(args.data) if args.data is not None else {}
    data.update({k: v for k, v in (("x_key", args.x_key), ("y_key", args.y_key)) if v is not None})
    if data:
        overrides["data"] = data
    return {k: v for k, v in overrides.items() if v is not None}


def make_transport(config: ClientConfig, will: Message) -> Transport:
    """The MQTT transport for ``config``: the one place that knows MqttTransport's constructor."""
    from edge_client.mqtt import BrokerUrl, MqttTransport  # paho is imported only here

    url = BrokerUrl.parse(
        config.broker_url, ca_file=config.ca_file, cert_file=config.cert_file, key_file=config.key_file
    )
    return MqttTransport(url, config.client_id, will=will)


def setup_logging(verbosity: int) -> None:
    """Timestamped log lines on stderr (left alone if the host program configured logging)."""
    logging.basicConfig(
        level=logging.DEBUG if verbosity > 0 else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )


class _Interrupted(KeyboardInterrupt):
    """A second SIGINT/SIGTERM: stop at once, without the graceful shutdown."""


def _install_signal_handlers(stop: threading.Event) -> Callable[[], None]:
    """First signal: set ``stop``; second: raise :class:`_Interrupted`. Returns an undo function."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None  # signal handlers can only be set from the main thread

    def handler(signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if stop.is_set():
            raise _Interrupted(f"{name} received twice")
        log.info("%s received: stopping (send it again to exit at once)", name)
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}

    def restore() -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)

    return restore


def main(argv: Sequence[str] | None = None, *, transport_factory: Callable[..., Transport] | None = None) -> int:
    """Run the client; return the exit status (only ``__main__`` calls ``sys.exit``)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse has already printed
        return exc.code if isinstance(exc.code, int) else EXIT_CONFIG
    setup_logging(args.verbose)
    try:
        config = load_config(args.config, overrides_from_args(args))
    except ConfigError as exc:
        print(f"litefed-client: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG

    from edge_client.client import EdgeClient, last_will  # after logging is set up: loads LiteRT

    stop = threading.Event()
    restore_signals = _install_signal_handlers(stop)
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
            transport = (transport_factory or make_transport)(config, last_will(config))
            client = EdgeClient(config, transport)
            client.start()
        except (BrokerUrlError, DataError, StateError, ConfigError) as exc:
            log.error("%s", exc)
            return EXIT_CONFIG
        client.run(stop)
        return EXIT_OK
    except _Interrupted:
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
        try:
            if client is not None:
                client.close()
        except KeyboardInterrupt:  # interrupted again while shutting down
            pass
        finally:
            restore_signals()
