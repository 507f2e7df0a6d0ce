"""Writing a fleet's folder: plan what to provision, then write keys, certificates, configuration and bundles."""

from __future__ import annotations

import contextlib
import io
import os
import secrets
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from coordinator.provision.files import (
    acl_text,
    client_toml,
    coordinator_script,
    devices_text,
    install_script,
    mosquitto_conf,
    systemd_unit,
)
from coordinator.provision.pki import (
    Identity,
    PrivateKey,
    cert_pem,
    issue,
    key_pem,
    load_cert,
    load_key,
    new_key,
    still_good,
)
from coordinator.provision.spec import (
    DEFAULT_DAYS,
    MANIFEST,
    MOSQUITTO_PASSWD,
    PASSWORD_BYTES,
    SIGNING_KEY,
    SUBDIRS,
    SUMMARY_BOARDS,
    TRUST_KEY,
    UNIT,
    FleetSpec,
    ProvisionError,
)
from edge_client.broker_url import BrokerUrl
from edge_client.config import read_toml
from edge_client.durable import TMP_PREFIX, atomic_write
from edge_client.errors import KeyFileError, LitefedError
from edge_client.signing import SigningKey, TrustKey

# -- writing -------------------------------------------------------------------------------


@dataclass
class ProvisionResult:
    """What :func:`provision` did: the fleet, which identities are new, and every file written."""

    out: Path
    spec: FleetSpec
    ca_created: bool = False
    new_devices: list[str] = field(default_factory=list)
    removed_devices: list[str] = field(default_factory=list)
    renewed: list[str] = field(default_factory=list)  # identities whose certificate was issued again, same key
    updated: list[str] = field(default_factory=list)  # kept boards whose client.toml changed
    written: list[Path] = field(default_factory=list)

    def board_archive(self, device: str) -> Path:
        return self.out / "boards" / f"{device}.tar.gz"

    @property
    def broker_config(self) -> Path:
        """The broker's ``mosquitto.conf``."""
        return self.out / "mosquitto" / "mosquitto.conf"

    @property
    def signing_key(self) -> Path:
        """The coordinator's Ed25519 signing key (``--signing-key``)."""
        return self.out / "coordinator" / SIGNING_KEY

    def trust_key(self, device: str) -> Path:
        """Board ``device``'s copy of the signing key's public half (its ``trust_key``)."""
        return self.out / "boards" / device / TRUST_KEY

    def tls_files(self, identity: str) -> dict[str, Path]:
        """``ca_file``, ``cert_file`` and ``key_file`` of a device or of the coordinator (``spec.coordinator``).

        The keys are :class:`~edge_client.broker_url.BrokerUrl`'s (and a ``client.toml``'s). A board of a fleet
        with passwords has no certificate: ``ca_file`` only.
        """
        if identity == self.spec.coordinator:
            folder, name = self.out / "coordinator", "coordinator"
        elif identity in self.spec.devices:
            folder, name = self.out / "boards" / identity, "client"
        else:
            raise ProvisionError(f"{identity!r} is not an identity of {self.out}; provision it first")
        files = {"ca_file": folder / "ca.pem"}
        if name == "coordinator" or not self.spec.passwords:
            files |= {"cert_file": folder / f"{name}.crt", "key_file": folder / f"{name}.key"}
        return files

    def summary(self) -> str:
        """What was written where, and the commands to run next."""
        spec, out = self.spec, self.out
        kept = len(spec.devices) - len(self.new_devices)
        removed = f", {len(self.removed_devices)} removed" if self.removed_devices else ""
        ca_state = "new" if self.ca_created else "kept"
        hosts = ", ".join(spec.broker_hosts)
        shown = spec.devices[:SUMMARY_BOARDS]
        lines = [
            f"federation {spec.federation!r}: {len(spec.devices)} board(s), {len(self.new_devices)} new, {kept} kept"
            + removed,
            f"  CA           {out / 'ca/ca.pem'} ({ca_state}; keep {out / 'ca/ca.key'} offline)",
            f"  broker       {out / 'mosquitto'}/ (mosquitto.conf, acl; certificate for {hosts}, port {spec.port})",
            f"  coordinator  {out / 'coordinator'}/ (identity {spec.coordinator})",
            *(f"  board        {self.board_archive(d)}" for d in shown),
        ]
        if len(spec.devices) > len(shown):
            lines.append(f"  ...          and {len(spec.devices) - len(shown)} more in {out / 'boards'}/")
        if spec.password_port is not None:
            lines.append(
                f"  passwords    boards log in on port {spec.password_port} (mosquitto/passwd; each client.toml 0600)"
            )
        if self.updated:
            lines.append(f"  updated      client.toml of {', '.join(self.updated)}: ship their archives again")
        if self.renewed:
            lines.append(f"  reissued     certificates of {', '.join(self.renewed)} (same keys): copy them again")
        board = spec.devices[0]
        lines += [
            "next:",
            f"  mosquitto -c {out / 'mosquitto/mosquitto.conf'}   # on the broker host; after a re-run, reload it",
            f"  {out / 'coordinator/coordinator.sh'} --model MODEL.tflite --rounds 10",
            f"  scp {self.board_archive(board)} {board}:   # on the board: tar -xzf {board}.tar.gz,",
            f"      # edit {board}/client.toml [data], then: sudo ./{board}/install.sh",
        ]
        return "\n".join(lines)


class _Writer:
    """Writes files atomically, keys 0600, and remembers what it wrote."""

    def __init__(self, result: ProvisionResult):
        self.result = result

    def file(self, path: Path, data: bytes | str, mode: int = 0o644) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, data.encode() if isinstance(data, str) else data)  # created 0600, then opened up
        os.chmod(path, mode)
        self.result.written.append(path)

    def key(self, path: Path, key: PrivateKey) -> None:
        self.file(path, key_pem(key), 0o600)


def _identity(
    writer: _Writer,
    key_path: Path,
    cert_path: Path,
    name: str,
    ca: Identity,
    days: int,
    usage: str,
    hosts: Sequence[str] = (),
    label: str | None = None,
) -> Identity:
    """The identity at ``key_path``/``cert_path``: kept if still good, its certificate renewed if not, else new.

    ``label`` names it in :attr:`ProvisionResult.renewed` (default: ``name``).
    """
    if key_path.is_file():
        key = load_key(key_path)
        cert = load_cert(cert_path)
        if cert is not None and still_good(Identity(key, cert), ca, name, hosts):
            return Identity(key, cert)
        writer.result.renewed.append(label or name)
    else:
        key = new_key()
        writer.key(key_path, key)
    identity = Identity(key, issue(key, name, ca, days, usage, hosts))
    writer.file(cert_path, cert_pem(identity.cert))
    return identity


def _authority(writer: _Writer, directory: Path, federation: str, days: int, provisioned: bool) -> Identity:
    key_path, cert_path = directory / "ca.key", directory / "ca.pem"
    if key_path.is_file():
        key = load_key(key_path)
        cert = load_cert(cert_path)
        if cert is None:
            raise ProvisionError(
                f"{cert_path} is missing or unreadable; restore it, or pass --force (re-keys every board)"
            )
        return Identity(key, cert)
    if provisioned:
        raise ProvisionError(f"{key_path} is missing but boards were provisioned with it; restore it, or pass --force")
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    key = new_key()
    writer.key(key_path, key)
    cert = issue(key, f"litefed CA {federation}", None, 2 * days, "ca")
    writer.file(cert_path, cert_pem(cert))
    writer.result.ca_created = True
    return Identity(key, cert)


def _archive(folder: Path) -> bytes:
    """``folder`` as a gzipped tar under its own name, files owned by root with their modes (the key stays 0600)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            info = tar.gettarinfo(str(path), arcname=f"{folder.name}/{path.relative_to(folder)}")
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            info.mtime = int(time.time())
            with path.open("rb") as f:
                tar.addfile(info, f)
    return buffer.getvalue()


def _board(
    writer: _Writer, out: Path, spec: FleetSpec, device: str, ca: Identity, days: int, trust: TrustKey
) -> str | None:
    """Write board ``device``'s folder and archive; return its password (None: it has a certificate)."""
    folder = out / "boards" / device
    new = not (folder / ("client.toml" if spec.passwords else "client.key")).is_file()
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    password = None
    if spec.passwords:
        password = _kept_password(folder / "client.toml", device) or secrets.token_urlsafe(PASSWORD_BYTES)
    else:
        _identity(writer, folder / "client.key", folder / "client.crt", device, ca, days, "client")
    writer.file(folder / "ca.pem", cert_pem(ca.cert))
    writer.file(writer.result.trust_key(device), trust.pem())
    config = client_toml(spec, device, password)
    if not new and _read(folder / "client.toml") != config:
        writer.result.updated.append(device)  # a new broker host or port: the board needs its bundle again
    writer.file(folder / "client.toml", config, 0o644 if password is None else 0o600)
    writer.file(folder / UNIT, systemd_unit(device))
    writer.file(folder / "install.sh", install_script(device, spec.passwords), 0o755)
    archive = out / "boards" / f"{device}.tar.gz"
    writer.file(archive, _archive(folder), 0o600)
    if new:
        writer.result.new_devices.append(device)
    return password


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _kept_password(path: Path, device: str) -> str | None:
    """The password in an existing ``client.toml`` of ``device``, so a re-run does not change it."""
    try:
        url = BrokerUrl.parse(str(read_toml(path).get("broker_url", "")))
    except LitefedError:  # missing or unreadable: a new password
        return None
    password = url.password if url.username == device else None
    # One "user:password" line each in the password file: a password edited to hold ':' or a newline cannot stay.
    return password if password and not any(c in password for c in ":\r\n") else None


def _password_file(writer: _Writer, folder: Path, passwords: dict[str, str]) -> None:
    """Mosquitto's ``password_file``, hashed by ``mosquitto_passwd -U`` (no password on a command line)."""
    binary = shutil.which("mosquitto_passwd") or next((p for p in MOSQUITTO_PASSWD if Path(p).is_file()), None)
    if binary is None:
        raise ProvisionError(
            "passwords need mosquitto_passwd (Debian: apt-get install mosquitto), or leave out --passwords "
            "to give boards client certificates"
        )
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + "passwd.", dir=folder)  # 0600 from the start
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.writelines(f"{user}:{password}\n" for user, password in passwords.items())
        done = subprocess.run([binary, "-U", tmp], capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            raise ProvisionError(f"mosquitto_passwd -U failed: {(done.stderr or done.stdout).strip()}")
        writer.file(folder / "passwd", Path(tmp).read_bytes(), 0o600)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _broker(writer: _Writer, out: Path, spec: FleetSpec, ca: Identity, days: int, broker_dir: str | None) -> None:
    folder = out / "mosquitto"
    folder.mkdir(parents=True, exist_ok=True)
    key, cert = folder / "server.key", folder / "server.crt"
    _identity(writer, key, cert, spec.broker_hosts[0], ca, days, "server", spec.broker_hosts, label="the broker")
    writer.file(folder / "ca.pem", cert_pem(ca.cert))
    writer.file(folder / "acl", acl_text(spec))
    writer.file(folder / "mosquitto.conf", mosquitto_conf(spec, broker_dir or str(folder.resolve())))


def _signing_key(writer: _Writer) -> SigningKey:
    """The coordinator's Ed25519 signing key, kept across re-runs: boards trust its public half only.

    Written after the coordinator's folder (0700). A missing key is made anew unless a board already
    trusts one (a fleet provisioned before signing had none to trust).
    """
    path = writer.result.signing_key
    if path.is_file():
        try:
            return SigningKey.load(path)
        except KeyFileError as exc:
            raise ProvisionError(f"{exc}; restore it, or pass --force (every board needs its new bundle)") from None
    if any(writer.result.trust_key(device).is_file() for device in writer.result.spec.devices):
        raise ProvisionError(f"{path} is missing but boards trust it; restore it, or pass --force")
    key = SigningKey.generate()
    key.save(path)
    writer.result.written.append(path)
    return key


def _coordinator(writer: _Writer, out: Path, spec: FleetSpec, ca: Identity, days: int) -> None:
    folder = out / "coordinator"
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    _identity(writer, folder / "coordinator.key", folder / "coordinator.crt", spec.coordinator, ca, days, "client")
    writer.file(folder / "ca.pem", cert_pem(ca.cert))
    writer.file(folder / "devices.txt", devices_text(spec))
    writer.file(folder / "coordinator.sh", coordinator_script(spec), 0o755)


def plan(
    out: Path,
    *,
    devices: Sequence[str] = (),
    remove: Sequence[str] = (),
    federation: str | None = None,
    topic_prefix: str | None = None,
    broker_hosts: Sequence[str] | None = None,
    port: int | None = None,
    passwords: bool = False,
    password_port: int | None = None,
    force: bool = False,
) -> FleetSpec:
    """The fleet to write: the manifest in ``out`` (unless ``force``), with these changes.

    A federation or topic prefix other than the manifest's is refused (the
    coordinator's identity and every board's topics would change), and so is
    switching boards from certificates to passwords; broker hosts and ports
    may change (the server certificate and the board files are written again,
    the keys kept). ``devices`` are added, ``remove`` removed. ``passwords``
    (or a ``password_port``) gives boards passwords, on ``port + 1`` unless
    told; a fleet provisioned with passwords keeps them.
    """
    manifest = out / MANIFEST
    base = FleetSpec(federation or "default", topic_prefix or "litefed")
    if manifest.is_file() and not force:
        base = FleetSpec.from_json(manifest.read_bytes(), manifest)
        for flag, given, kept in (
            ("--federation", federation, base.federation),
            ("--topic-prefix", topic_prefix, base.topic_prefix),
        ):
            if given is not None and given != kept:
                raise ProvisionError(
                    f"{out} was provisioned with {flag} {kept}; pass that (or leave it out), another --out, "
                    "or --force to start over (re-keys every board)"
                )
        if (passwords or password_port is not None) and not base.passwords:
            raise ProvisionError(
                f"{out} gives boards client certificates; pass --force to switch them to passwords "
                "(a new CA, and every board needs its new bundle)"
            )
    unknown = [d for d in remove if d not in base.devices and d not in devices]
    if unknown:
        raise ProvisionError(f"cannot remove {', '.join(unknown)}: not provisioned in {out}")
    wanted = [d for d in dict.fromkeys([*base.devices, *devices]) if d not in remove]
    if not wanted:
        raise ProvisionError("no devices: pass --device ID (repeatable) or --devices-file FILE (one id a line)")
    port = base.port if port is None else port
    if password_port is None and (passwords or base.passwords):
        password_port = base.password_port or port + 1
    return replace(
        base,
        broker_hosts=tuple(dict.fromkeys(broker_hosts)) if broker_hosts else base.broker_hosts,
        port=port,
        devices=tuple(wanted),
        password_port=password_port,
    )


def provision(
    out: Path, spec: FleetSpec, *, days: int = DEFAULT_DAYS, force: bool = False, broker_dir: str | None = None
) -> ProvisionResult:
    """Write everything ``spec`` needs under ``out`` (see the module's docstring); return what was done.

    Existing keys are kept and their certificates kept or renewed; with
    ``force`` the folders this function owns are removed first, so the fleet
    gets a new CA and every identity a new key. Boards in the manifest but not
    in ``spec`` lose their folder and their ACL entry. ``broker_dir`` is where
    the ``mosquitto`` folder will be on the broker host (default: its
    absolute path here).
    """
    if not 1 <= days <= 100 * 365:
        raise ProvisionError(f"certificate validity {days} days is out of range; use 1..36500")
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / MANIFEST
    before = () if force or not manifest.is_file() else FleetSpec.from_json(manifest.read_bytes(), manifest).devices
    if force:
        for name in SUBDIRS:
            shutil.rmtree(out / name, ignore_errors=True)
    result = ProvisionResult(out, spec)
    writer = _Writer(result)
    provisioned = bool(before) or any((out / "boards").glob("*/client.key"))
    ca = _authority(writer, out / "ca", spec.federation, days, provisioned)
    _broker(writer, out, spec, ca, days, broker_dir)
    _coordinator(writer, out, spec, ca, days)
    trust = _signing_key(writer).trust_key
    passwords = {device: _board(writer, out, spec, device, ca, days, trust) for device in spec.devices}
    if spec.passwords:
        _password_file(writer, out / "mosquitto", {d: p for d, p in passwords.items() if p is not None})
    for device in before:
        if device not in spec.devices:
            shutil.rmtree(out / "boards" / device, ignore_errors=True)
            (out / "boards" / f"{device}.tar.gz").unlink(missing_ok=True)
            result.removed_devices.append(device)
    writer.file(manifest, spec.to_json())
    return result
