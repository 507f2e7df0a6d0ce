"""Provisioning a fleet: a CA, TLS identities, a Mosquitto configuration with ACLs, and one bundle per board.

:func:`provision` writes, under one output folder::

    litefed-fleet.json      what was provisioned (federation, topic prefix, broker, devices): re-runs start here
    ca/ca.pem, ca/ca.key    the fleet's certificate authority (keep ca.key offline: it mints identities)
    mosquitto/              mosquitto.conf (a TLS listener that requires a client certificate), acl,
                            the broker's server certificate and key, ca.pem
    coordinator/            the coordinator's certificate (CN ``coordinator-<federation>``), key, ca.pem,
                            signing.key (Ed25519: signs what boards download), devices.txt, and
                            coordinator.sh, which runs litefed-coordinator with them
    boards/<id>/            client.toml, ca.pem, coordinator.pub (signing.key's public half, client.toml's
                            trust_key), client.crt (CN ``<id>``), client.key, litefed-client.service, install.sh
    boards/<id>.tar.gz      the same folder as one file to copy to the board

A certificate's common name is its holder's MQTT user name and client id on
the broker (``use_identity_as_username``, ``use_username_as_clientid``), and
the ACL grants each name exactly its topics, taken from
:class:`~edge_client.topics.Topics`: a board writes only its own ``update/<id>``
and ``presence/<id>`` and reads the model, the global weights, the round and
its own acks; only the coordinator writes those and reads updates and
presence. Keys are ECDSA P-256 (every TLS stack a board may have speaks it)
and are written 0600. Re-running with the same folder keeps the CA and every
existing key (adding a board never re-keys the fleet); ``force`` starts over.

With passwords (``FleetSpec.password_port``), boards log in with their id and
a generated password, kept in their ``client.toml`` (0600) and hashed into
Mosquitto's ``password_file`` by ``mosquitto_passwd``, on a second TLS
listener; the coordinator keeps its certificate on the first.
"""

from __future__ import annotations

from coordinator.provision.spec import (
    BACKDATE,
    BOARD_ETC,
    DEFAULT_DAYS,
    DEFAULT_HOSTS,
    DEFAULT_PORT,
    MANIFEST,
    MANIFEST_VERSION,
    MAX_CN,
    MOSQUITTO_PASSWD,
    PASSWORD_BYTES,
    RENEW_DAYS,
    SERVICE_USER,
    SIGNING_KEY,
    STATE_ROOT,
    SUBDIRS,
    SUMMARY_BOARDS,
    TRUST_KEY,
    UNIT,
    FleetSpec,
    ProvisionError,
    check_device_id,
    check_host,
    coordinator_identity,
    read_devices_file,
)
from coordinator.provision.writer import ProvisionResult, plan, provision

__all__ = [
    "BACKDATE",
    "BOARD_ETC",
    "DEFAULT_DAYS",
    "DEFAULT_HOSTS",
    "DEFAULT_PORT",
    "FleetSpec",
    "MANIFEST",
    "MANIFEST_VERSION",
    "MAX_CN",
    "MOSQUITTO_PASSWD",
    "PASSWORD_BYTES",
    "ProvisionError",
    "ProvisionResult",
    "RENEW_DAYS",
    "SERVICE_USER",
    "SIGNING_KEY",
    "STATE_ROOT",
    "SUBDIRS",
    "SUMMARY_BOARDS",
    "TRUST_KEY",
    "UNIT",
    "check_device_id",
    "check_host",
    "coordinator_identity",
    "plan",
    "provision",
    "read_devices_file",
]
