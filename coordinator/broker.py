"""An MQTT broker started from Python, for local emulation and tests.

:class:`EmbeddedBroker` runs mosquitto as a subprocess with a generated
configuration, or amqtt in a background thread with its own asyncio loop.
Either way it listens on 127.0.0.1 only, on a free port unless told one.
``litefed-broker`` (:func:`main`) runs one from the command line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from coordinator.errors import CoordinatorError
from edge_client.transport import DEFAULT_QUEUE_SIZE

log = logging.getLogger(__name__)

KINDS = ("auto", "mosquitto", "amqtt")
MOSQUITTO_FALLBACK = Path("/usr/sbin/mosquitto")  # Debian's package installs it outside a user's PATH
_PORT_ATTEMPTS = 3  # a free port can be taken between choosing and binding it: retry that race
_LOG_TAIL_LINES = 20


class EmbeddedBrokerError(CoordinatorError):
    """The embedded broker cannot be found, started or stopped."""


def find_mosquitto() -> Path | None:
    """The mosquitto binary on PATH, else Debian's /usr/sbin/mosquitto, else None."""
    found = shutil.which("mosquitto")
    if found:
        return Path(found)
    return MOSQUITTO_FALLBACK if MOSQUITTO_FALLBACK.is_file() else None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _log_says_running(log_file: Path) -> bool:
    try:
        return " running" in log_file.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return False


def _accepts_tcp(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


class EmbeddedBroker:
    """An MQTT broker on ``host:port``: mosquitto (subprocess) or amqtt (thread).

    ``kind="auto"`` uses mosquitto when its binary is installed, else amqtt.
    ``port=0`` picks a free port. ``allow_anonymous=False`` makes a broker that
    refuses clients without credentials (mosquitto, having no password file,
    then refuses every client), to exercise the refusal path. Use as a context
    manager, or call :meth:`start` and :meth:`stop`.
    """

    def __init__(self, kind: str = "auto", host: str = "127.0.0.1", port: int = 0, *, allow_anonymous: bool = True):
        if kind not in KINDS:
            raise ValueError(f"broker kind must be one of {KINDS}, got {kind!r}")
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be in 0..65535 (0 picks a free one), got {port}")
        self.requested_kind = kind
        self.host = host
        self.requested_port = port
        self.allow_anonymous = allow_anonymous
        self.kind: str | None = None  # resolved by start()
        self.port: int | None = None
        self._process: subprocess.Popen | None = None
        self._tempdir: Path | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._amqtt_started = threading.Event()
        self._amqtt_error: BaseException | None = None

    def __repr__(self) -> str:
        where = f"{self.host}:{self.port}" if self.port else "not started"
        return f"EmbeddedBroker({self.kind or self.requested_kind}, {where})"

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """``mqtt://HOST:PORT`` of the running broker."""
        if self.port is None:
            raise EmbeddedBrokerError("the embedded broker is not running; call start() first")
        return f"mqtt://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        if self._process is not None:
            return self._process.poll() is None
        return self._thread is not None and self._thread.is_alive()

    def start(self, timeout: float = 10.0) -> str:
        """Start the broker, wait until it accepts connections and return its URL."""
        if self.port is not None:
            raise EmbeddedBrokerError(f"{self!r} is already running; stop() it first")
        kind = self.requested_kind
        if kind == "auto":
            kind = "mosquitto" if find_mosquitto() else "amqtt"
            log.info("embedded broker: using %s", kind)
        starter = self._start_mosquitto if kind == "mosquitto" else self._start_amqtt
        attempts = 1 if self.requested_port else _PORT_ATTEMPTS
        for attempt in range(attempts):
            port = self.requested_port or free_port(self.host)
            try:
                starter(port, timeout)
                break
            except _PortTaken:
                self.stop()
                if attempt == attempts - 1:
                    raise EmbeddedBrokerError(
                        f"port {port} on {self.host} is already in use; choose another port (or 0 for a free one)"
                    ) from None
            except BaseException:
                self.stop()
                raise
        self.kind, self.port = kind, port
        log.info("embedded %s broker listening on %s", kind, self.url)
        return self.url

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the broker and wait for it; safe to call more than once."""
        if self._process is not None:
            self._stop_mosquitto(timeout)
        if self._thread is not None:
            self._stop_amqtt(timeout)
        if self._tempdir is not None:
            shutil.rmtree(self._tempdir, ignore_errors=True)
            self._tempdir = None
        self.port = None

    # -- mosquitto ---------------------------------------------------------------------
    def _start_mosquitto(self, port: int, timeout: float) -> None:
        binary = find_mosquitto()
        if binary is None:
            raise EmbeddedBrokerError(
                "mosquitto is not installed; run scripts/setup.sh --dev (or apt-get install mosquitto), "
                "or use kind='amqtt'"
            )
        self._tempdir = Path(tempfile.mkdtemp(prefix="litefed-mosquitto-"))
        config = self._tempdir / "mosquitto.conf"
        log_file = self._tempdir / "mosquitto.log"
        config.write_text(_mosquitto_config(self.host, port, log_file, self.allow_anonymous), encoding="utf-8")
        output = (self._tempdir / "mosquitto.out").open("wb")
        try:
            # A session of its own: Ctrl+C in a terminal reaches only us, and we stop mosquitto in order.
            self._process = subprocess.Popen(
                [str(binary), "-c", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            output.close()
        log.debug("mosquitto log: %s", log_file)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self._process.poll()
            if code is not None:
                tail = self._mosquitto_log_tail()
                if "in use" in tail:
                    raise _PortTaken
                raise EmbeddedBrokerError(f"mosquitto exited at start (code {code}); its log ends with:\n{tail}")
            # "running" is logged once every listener is bound. Probing the port instead could
            # reach another server that holds it while mosquitto fails to bind.
            if _log_says_running(log_file) and _accepts_tcp(self.host, port):
                return
            time.sleep(0.02)
        raise EmbeddedBrokerError(
            f"mosquitto did not accept connections on {self.host}:{port} within {timeout:g} s; "
            f"its log ends with:\n{self._mosquitto_log_tail()}"
        )

    def _mosquitto_log_tail(self) -> str:
        lines: list[str] = []
        for name in ("mosquitto.out", "mosquitto.log"):
            path = None if self._tempdir is None else self._tempdir / name
            if path is not None and path.is_file():
                lines += path.read_text(encoding="utf-8", errors="replace").splitlines()
        return "\n".join(lines[-_LOG_TAIL_LINES:]) or "(mosquitto wrote no log)"

    def _stop_mosquitto(self, timeout: float) -> None:
        process = self._process
        if process is None:
            return
        try:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout)
                except subprocess.TimeoutExpired:
                    log.warning("mosquitto did not stop within %g s of SIGTERM; killing it", timeout)
                    process.kill()
                    process.wait(timeout)
        finally:
            if process.poll() is None:  # interrupted (a second Ctrl+C): never leave it running
                process.kill()
                process.wait()
            self._process = None

    # -- amqtt -------------------------------------------------------------------------
    def _start_amqtt(self, port: int, timeout: float) -> None:
        # amqtt logs every connection and packet at INFO; keep its warnings only.
        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.WARNING)
        self._amqtt_started.clear()
        self._amqtt_error = None
        self._thread = threading.Thread(target=self._run_amqtt, args=(port,), name=f"amqtt:{port}", daemon=True)
        self._thread.start()
        if not self._amqtt_started.wait(timeout):
            self._stop_amqtt(1.0)
            raise EmbeddedBrokerError(f"amqtt did not start on {self.host}:{port} within {timeout:g} s")
        if self._amqtt_error is not None:
            error, self._amqtt_error = self._amqtt_error, None
            self._thread.join(timeout)
            self._thread = None
            cause = error.__cause__
            if (isinstance(cause, OSError) and cause.errno == errno.EADDRINUSE) or "in use" in str(error):
                raise _PortTaken from error
            raise EmbeddedBrokerError(f"amqtt failed to start on {self.host}:{port}: {error}") from error

    def _run_amqtt(self, port: int) -> None:
        """The amqtt thread: its own event loop, until :meth:`_stop_amqtt` sets the stop event."""
        from amqtt.broker import Broker

        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{port}"}},
            # Only authentication: no $SYS publisher nor packet-logging plugins.
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": self.allow_anonymous}},
        }

        async def serve() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop_event = asyncio.Event()
            broker = Broker(config)
            try:
                await broker.start()
            except Exception as exc:  # amqtt wraps bind errors in BrokerError
                self._amqtt_error = exc
                self._amqtt_started.set()
                return
            self._amqtt_started.set()
            await self._stop_event.wait()
            await broker.shutdown()

        try:
            asyncio.run(serve())
        except Exception as exc:
            log.warning("amqtt broker on port %d stopped with an error: %s", port, exc)

    def _stop_amqtt(self, timeout: float) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        loop, event = self._loop, self._stop_event
        if loop is not None and event is not None and not loop.is_closed():
            # RuntimeError: the loop closed meanwhile, so the thread is ending anyway.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(event.set)
        thread.join(timeout)
        if thread.is_alive():
            log.warning("amqtt broker thread did not stop within %g s; leaving it (daemon) behind", timeout)
        self._loop = self._stop_event = None


def _is_root() -> bool:
    return getattr(os, "geteuid", lambda: -1)() == 0


class _PortTaken(Exception):
    """The broker could not bind its port (someone took it after we chose it)."""


def _mosquitto_config(host: str, port: int, log_file: Path, allow_anonymous: bool) -> str:
    return "\n".join(
        [
            "# Generated by litefed (coordinator/broker.py) for an embedded broker.",
            f"listener {port} {host}",
            f"allow_anonymous {'true' if allow_anonymous else 'false'}",
            "persistence false",
            # At the end of a round every client's update arrives at once; mosquitto's default
            # (1000) could drop QoS 1 messages queued for a busy coordinator. Same bound as the
            # clients' own receive queue.
            f"max_queued_messages {DEFAULT_QUEUE_SIZE}",
            "set_tcp_nodelay true",
            # Started as root, mosquitto would switch to user "mosquitto", which cannot write its
            # log into our private temp dir; an embedded broker runs as whoever started it.
            *(["user root"] if _is_root() else []),
            f"log_dest file {log_file}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "",
        ]
    )


# -- command line ----------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="litefed-broker",
        description="Run an MQTT broker on 127.0.0.1 for a local litefed federation. "
        "Prints its URL, then runs until Ctrl+C.",
    )
    p.add_argument("--kind", choices=KINDS, default="auto", help="mosquitto, amqtt, or auto: mosquitto if installed")
    p.add_argument("--port", type=int, default=0, metavar="N", help="TCP port (default 0: a free port)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    broker = EmbeddedBroker(args.kind, port=args.port)
    try:
        url = broker.start()
    except (EmbeddedBrokerError, ValueError) as exc:
        print(f"litefed-broker: {exc}", flush=True)
        return 1
    print(url, flush=True)
    # SIGTERM (systemd, docker stop) stops gracefully, as Ctrl+C does.
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        while broker.running:
            time.sleep(0.2)
        print(f"litefed-broker: the {broker.kind} broker stopped unexpectedly", flush=True)
        broker.stop()
        return 1
    except KeyboardInterrupt:
        pass
    print("litefed-broker: stopping (Ctrl+C again to force)", flush=True)
    try:
        broker.stop()
    except KeyboardInterrupt:  # stop() kills mosquitto on its way out; amqtt's thread is a daemon
        print("litefed-broker: forced exit", flush=True)
        return 130
    return 0


def _raise_keyboard_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    raise SystemExit(main())
