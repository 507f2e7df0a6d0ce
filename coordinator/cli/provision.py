"""``litefed-provision``: TLS identities, a Mosquitto configuration with ACLs, and a bundle per board."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from edge_client.cli_support import EXIT_OK, command, fail, new_parser

PROG = "litefed-provision"

DESCRIPTION = """\
Provision a federation's fleet into --out: a certificate authority, a client
certificate per device (its CN is the device id) and for the coordinator, the
broker's server certificate, a Mosquitto configuration (a TLS listener that
requires a certificate, and an ACL: a board writes only its own update and
presence topics, only the coordinator writes the model, the weights, the round
and the acks), and per board a folder and a .tar.gz with its client.toml, key
material, a systemd unit and install.sh.

Re-running with the same --out adds the new devices and keeps the CA and every
existing key, so adding boards never re-keys the fleet; --force starts over.
Everything is local: no broker or network is needed.
"""

EPILOG = """\
examples:
  litefed-provision --federation greenhouse --device pi-1 --device pi-2 --out fleet
  litefed-provision --out fleet --devices-file more-boards.txt      # adds boards, keeps the others
  litefed-provision --out fleet --broker-host broker.lan --broker-host 192.168.1.10 --port 8883
  litefed-provision --out fleet --remove pi-2                       # pi-2 loses its ACL entry

docs/security.md explains the threat model and the steps on the broker, the
coordinator and the boards.
"""


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text} is not a TCP port; use 1..65535 (8883 is MQTT over TLS)")
    return port


def build_parser() -> argparse.ArgumentParser:
    p = new_parser(PROG, DESCRIPTION, EPILOG)
    p.add_argument("--out", type=Path, default=Path("fleet"), help="output folder (default %(default)s)")
    p.add_argument("--device", action="append", default=[], metavar="ID", help="a device id (repeatable)")
    p.add_argument("--devices-file", type=Path, metavar="FILE", help="device ids, one a line ('#' comments)")
    p.add_argument("--remove", action="append", default=[], metavar="ID", help="drop a provisioned device (repeatable)")
    p.add_argument("--federation", help="federation name (default: the one in --out, else 'default')")
    p.add_argument("--topic-prefix", help="topic prefix (default: the one in --out, else 'litefed')")
    p.add_argument(
        "--broker-host",
        action="append",
        metavar="NAME",
        help="a DNS name or IP address boards reach the broker by, for its certificate; the first one goes "
        "into the boards' broker_url (repeatable; default: the ones in --out, else 127.0.0.1 and localhost)",
    )
    p.add_argument("--port", type=_port, help="the broker's TLS port (default: the one in --out, else 8883)")
    p.add_argument(
        "--passwords",
        action="store_true",
        help="boards log in with their id and a password (in their client.toml) instead of a client certificate, "
        "on a second TLS listener; the coordinator keeps its certificate (needs mosquitto_passwd)",
    )
    p.add_argument("--password-port", type=_port, help="that listener's port (default: --port + 1)")
    p.add_argument(
        "--broker-dir",
        metavar="DIR",
        help="where the mosquitto folder will be on the broker host, for mosquitto.conf's paths "
        "(default: its absolute path here)",
    )
    p.add_argument("--days", type=int, default=3650, help="validity of new certificates in days (default %(default)s)")
    p.add_argument("--force", action="store_true", help="start over: a new CA and new keys for every identity")
    return p


@command
def main(argv: Sequence[str] | None = None) -> int:
    """Provision the fleet; return the exit status (only ``__main__`` calls ``sys.exit``)."""
    args = build_parser().parse_args(argv)
    from coordinator.errors import CoordinatorError  # after --help: cryptography loads with provision

    try:
        from coordinator import provision
    except ImportError as exc:  # MissingExtraError is an ImportError with the pip line
        return fail(PROG, exc)
    try:
        devices = list(args.device)
        if args.devices_file is not None:
            devices += provision.read_devices_file(args.devices_file)
        spec = provision.plan(
            args.out,
            devices=devices,
            remove=args.remove,
            federation=args.federation,
            topic_prefix=args.topic_prefix,
            broker_hosts=args.broker_host,
            port=args.port,
            passwords=args.passwords,
            password_port=args.password_port,
            force=args.force,
        )
        result = provision.provision(args.out, spec, days=args.days, force=args.force, broker_dir=args.broker_dir)
    except CoordinatorError as exc:
        return fail(PROG, exc)
    except OSError as exc:
        return fail(PROG, f"cannot write {exc.filename or args.out}: {exc.strerror or exc}; pick another --out")
    print(result.summary())
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
