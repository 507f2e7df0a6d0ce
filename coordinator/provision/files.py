"""The provisioned files' contents: the ACL, mosquitto.conf, a board's client.toml, unit and install script."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from coordinator.provision.spec import BOARD_ETC, SERVICE_USER, SIGNING_KEY, STATE_ROOT, TRUST_KEY, UNIT, FleetSpec

# -- the files' contents -------------------------------------------------------------------


def acl_text(spec: FleetSpec) -> str:
    """Mosquitto's ``acl_file``: per identity (a certificate's CN), its topics; anything else is denied."""
    t = spec.topics
    model, weights = f"{t.base}/model/#", f"{t.base}/global/#"
    lines = [
        f"# Topic ACL of federation {spec.federation!r} (prefix {spec.topic_prefix!r}), written by litefed-provision.",
        "# A user is the CN of a certificate signed by the fleet's CA (or a board's login name, with passwords).",
        "# What is not granted here is denied.",
        "# Re-run litefed-provision to change it, then reload mosquitto (SIGHUP) or restart it.",
        "",
        "# The coordinator: the only writer of the model, the global weights, the round and the acks.",
        f"user {spec.coordinator}",
        *(f"topic write {topic}" for topic in (model, weights, t.round, _every_client(t.ack))),
        *(f"topic read {topic}" for topic in (t.updates, t.presences)),
    ]
    for device in spec.devices:
        lines += [
            "",
            f"# Board {device}: writes its own update and presence; reads the model, the weights, the round, its acks.",
            f"user {device}",
            *(f"topic write {topic}" for topic in (t.update(device), t.presence(device))),
            *(f"topic read {topic}" for topic in (model, weights, t.round, t.ack(device))),
        ]
    return "\n".join(lines) + "\n"


def _every_client(topic_of: Callable[[str], str]) -> str:
    """``topic_of``'s topic with its client level a ``+`` (Topics has ``updates`` and ``presences``, no ``acks``)."""
    return topic_of("x").rpartition("/")[0] + "/+"


def mosquitto_conf(spec: FleetSpec, directory: str) -> str:
    """A Mosquitto 2 configuration: a TLS listener on ``spec.port`` that requires a certificate of the CA.

    With passwords, boards log in on a second TLS listener, ``spec.password_port``, with their id as user
    name and a password from ``password_file``; the coordinator keeps its certificate on the first.
    """
    d = directory.rstrip("/") or "/"
    tls = [f"cafile {d}/ca.pem", f"certfile {d}/server.crt", f"keyfile {d}/server.key", "tls_version tlsv1.2"]
    security = ["allow_anonymous false", f"acl_file {d}/acl"]
    # The client id is the user name too: no one can take over (and disconnect) another identity's session.
    certificates = ["require_certificate true", "use_identity_as_username true", "use_username_as_clientid true"]
    head = [
        f"# Mosquitto configuration of the litefed federation {spec.federation!r}, written by litefed-provision.",
        f"# Run it with: mosquitto -c {d}/mosquitto.conf",
        "# (or link it into /etc/mosquitto/conf.d/, with these files where the paths below say).",
        "# A client presents a certificate signed by ca.pem: its CN becomes its user name and client id,",
        "# and acl says what each name may read and write.",
    ]
    if spec.password_port is None:
        listeners = ["per_listener_settings false", *security, "", f"listener {spec.port}", *tls, *certificates]
    else:
        listeners = [
            f"# Boards log in on port {spec.password_port} with their id and the password in their client.toml.",
            "per_listener_settings true",
            "",
            f"listener {spec.port}",
            *security,
            *tls,
            *certificates,
            "",
            f"listener {spec.password_port}",
            *security,
            f"password_file {d}/passwd",
            "use_username_as_clientid true",
            *tls,
        ]
    return "\n".join([*head, *listeners, ""])


def client_toml(spec: FleetSpec, device: str, password: str | None = None) -> str:
    """A board's ``client.toml``: loads with :func:`edge_client.config.load_config`; the operator edits ``[data]``.

    With a password, ``broker_url`` holds it (the file is then 0600) and there is no client certificate.
    """
    if password is None:
        tls = [
            "# TLS, relative to this file: the fleet's CA, this board's certificate and its private key (0600).",
            'ca_file = "ca.pem"',
            'cert_file = "client.crt"',
            'key_file = "client.key"',
        ]
    else:
        tls = ["# TLS, relative to this file: the fleet's CA. broker_url holds the password: keep this file 0600.",
               'ca_file = "ca.pem"']  # fmt: skip
    return "\n".join(
        [
            f"# litefed edge client {device!r} of federation {spec.federation!r}, written by litefed-provision.",
            f"# Edit [data] below, then run install.sh: it copies this folder to {BOARD_ETC}/{device}/.",
            "# client_id is this board's identity on the broker (the CN of its certificate, or its user name).",
            f'client_id = "{device}"',
            f'broker_url = "{spec.board_url(device, password)}"',
            f'federation = "{spec.federation}"',
            f'topic_prefix = "{spec.topic_prefix}"',
            "# The model, the weights and the progress, under the systemd unit's StateDirectory.",
            f'state_dir = "{STATE_ROOT}/{device}"',
            *tls,
            "# The coordinator's public key: this board acts only on the model, weights and rounds it signed.",
            f'trust_key = "{TRUST_KEY}"',
            "",
            "[data]",
            "# EDIT: this board's training data, readable by the user litefed (litefed-client --help says more):",
            '# kind "npz" (arrays x and y), "images" (one folder per label) or "csv" (numeric columns).',
            'kind = "npz"',
            f'path = "{STATE_ROOT}-data/{device}.npz"',
            "",
        ]
    )


def systemd_unit(device: str) -> str:
    """The board's ``litefed-client.service``: an unprivileged user, restarted on failure."""
    return "\n".join(
        [
            f"# litefed edge client {device!r}, written by litefed-provision; install.sh installs it.",
            "[Unit]",
            f"Description=litefed edge client {device}",
            "Wants=network-online.target",
            # TLS needs a right clock: boards without a real-time clock should enable systemd-time-wait-sync.
            "After=network-online.target time-sync.target",
            "",
            "[Service]",
            "Type=simple",
            f"User={SERVICE_USER}",
            f"Group={SERVICE_USER}",
            f"StateDirectory={Path(STATE_ROOT).name}",
            "StateDirectoryMode=0700",
            f"ExecStart=litefed-client --config {BOARD_ETC}/{device}/client.toml",
            "Restart=on-failure",
            "RestartSec=10",
            "# Exit status 2 is a bad configuration: restarting cannot fix it.",
            "RestartPreventExitStatus=2",
            "NoNewPrivileges=true",
            "ProtectSystem=full",
            "PrivateTmp=true",
            "",
            "[Install]",
            "WantedBy=multi-user.target",
            "",
        ]
    )


def install_script(device: str, passwords: bool = False) -> str:
    """``install.sh``: run as root on the board, from the unpacked bundle; secrets end up 0640 root:litefed."""
    dest = f"{BOARD_ETC}/{device}"
    public, secret = (
        ((TRUST_KEY, "ca.pem"), ("client.toml",))
        if passwords
        else (("client.toml", "ca.pem", TRUST_KEY, "client.crt"), ("client.key",))
    )
    public_files = " ".join(f'"$here/{name}"' for name in public)
    secret_files = " ".join(f'"$here/{name}"' for name in secret)
    return f"""#!/bin/sh
# Install litefed board {device}: run as root on the board, from the unpacked bundle (sudo ./{device}/install.sh).
# Edit client.toml's [data] first. Needs litefed-client on PATH (pip install 'litefed[edge]'), or LITEFED_CLIENT=PATH.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
dest={dest}
client=${{LITEFED_CLIENT:-$(command -v litefed-client || true)}}
if [ -z "$client" ]; then
    echo "install.sh: litefed-client not found; pip install 'litefed[edge]', or set LITEFED_CLIENT=/path/to/it" >&2
    exit 1
fi
getent passwd {SERVICE_USER} >/dev/null ||
    useradd --system --home-dir {STATE_ROOT} --shell /usr/sbin/nologin {SERVICE_USER}
install -d -m 0750 -o root -g {SERVICE_USER} "$dest"
if [ "$here" != "$dest" ]; then
    install -m 0644 -o root -g {SERVICE_USER} {public_files} "$dest/"
    install -m 0640 -o root -g {SERVICE_USER} {secret_files} "$dest/"
fi
sed "s#^ExecStart=litefed-client #ExecStart=$client #" "$here/{UNIT}" >/etc/systemd/system/{UNIT}
systemctl daemon-reload
systemctl enable --now {UNIT}
echo "install.sh: {device} installed in $dest; follow it with: journalctl -u {UNIT} -f"
"""


def coordinator_script(spec: FleetSpec) -> str:
    """``coordinator.sh``: litefed-coordinator with the broker, the federation and the TLS identity."""
    prefix = "" if spec.topic_prefix == "litefed" else f" --topic-prefix '{spec.topic_prefix}'"
    return f"""#!/bin/sh
# The coordinator of federation {spec.federation!r} with its TLS identity, written by litefed-provision.
# Usage: coordinator.sh --model MODEL.tflite [more litefed-coordinator options]
# Presence from ids not in devices.txt (the provisioned boards) is ignored; what boards download is
# signed with signing.key, whose public half every board trusts.
here=$(cd "$(dirname "$0")" && pwd)
exec litefed-coordinator --broker {spec.broker_url} --federation {spec.federation}{prefix} \\
    --ca-file "$here/ca.pem" --cert-file "$here/coordinator.crt" --key-file "$here/coordinator.key" \\
    --signing-key "$here/{SIGNING_KEY}" --clients-file "$here/devices.txt" "$@"
"""


def devices_text(spec: FleetSpec) -> str:
    """The provisioned ids, one a line: ``--clients-file`` of the coordinator, ``--devices-file`` of a re-run."""
    header = f"# The boards of federation {spec.federation!r}, written by litefed-provision.\n"
    return header + "".join(f"{device}\n" for device in spec.devices)
