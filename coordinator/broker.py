"""An MQTT broker started from Python, for local emulation and tests.

:class:`EmbeddedBroker` runs mosquitto as a subprocess with a generated
configuration, or amqtt in a background thread with its own asyncio loop.
Either way it listens on 127.0.0.1 only, on a free port unless told one.
Mosquitto can also serve a fleet's configuration from ``litefed-provision``
(TLS, client certificates, the topic ACL), its listener moved to that address.
``litefed-broker`` (:func:`main`) runs one from the command line, on the MQTT
default port 1883 unless told another.

Mosquitto's configuration and log live in a temporary folder named
``litefed-mosquitto-*`` (under ``$TMPDIR``), removed when the broker stops.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import errno
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from coordinator.errors import CoordinatorError, MissingExtraError
from edge_client.cli_support import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_RUNTIME,
    STOP_SIGNALS,
    STOPPING,
    StopSignals,
    command,
    setup_logging,
)
from edge_client.transport import DEFAULT_QUEUE_SIZE

log = logging.getLogger(__name__)

KINDS = ("auto", "mosquitto", "amqtt")
DEFAULT_PORT = 1883  # litefed-broker's: the MQTT default, which every command's default broker URL assumes
TEMPDIR_PREFIX = "litefed-mosquitto-"
MOSQUITTO_FALLBACK = Path("/usr/sbin/mosquitto")  # Debian's package installs it outside a user's PATH
_PORT_ATTEMPTS = 3  # a free port can be taken between choosing and binding it: retry that race
_LOG_TAIL_LINES = 20
_LISTENER = re.compile(r"(?m)^listener [0-9]+[^\n]*$")


class EmbeddedBrokerError(CoordinatorError):
    """The embedded broker cannot be found, started or stopped."""


class PortInUseError(EmbeddedBrokerError):
    """Another server listens on the port the broker was asked to use."""

    def __init__(self, host: str, port: int):
        super().__init__(f"{host}:{port} is already in use (another broker?); use another port, or 0 for a free one")
        self.host = host
        self.port = port


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
    then refuses every client), to exercise the refusal path.

    ``tls_config`` is a ``mosquitto.conf`` written by ``litefed-provision``:
    mosquitto serves it as written (the fleet's CA and server certificate, a
    client certificate required, its CN the user name, the ACL), but for its
    one listener, moved to ``host:port``; :attr:`url` is then ``mqtts://``
    and ``allow_anonymous`` is the configuration's (false). Mosquitto only:
    amqtt has no client-certificate identities. Use as a context manager, or
    call :meth:`start` and :meth:`stop`.
    """

    def __init__(
        self,
        kind: str = "auto",
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        allow_anonymous: bool = True,
        tls_config: Path | None = None,
    ):
        if kind not in KINDS:
            raise ValueError(f"broker kind must be one of {KINDS}, got {kind!r}")
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be in 0..65535 (0 picks a free one), got {port}")
        if tls_config is not None and kind == "amqtt":
            raise ValueError(
                "amqtt cannot serve a provisioned mosquitto.conf (client certificates, ACL); use mosquitto"
            )
        self.requested_kind = kind
        self.host = host
        self.requested_port = port
        self.allow_anonymous = allow_anonymous
        self.tls_config = tls_config
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
        """``mqtt://HOST:PORT`` of the running broker (``mqtts://`` with a ``tls_config``)."""
        if self.port is None:
            raise EmbeddedBrokerError("the embedded broker is not running; call start() first")
        return f"{'mqtt' if self.tls_config is None else 'mqtts'}://{self.host}:{self.port}"

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
            kind = "mosquitto" if find_mosquitto() or self.tls_config is not None else "amqtt"
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
                    raise PortInUseError(self.host, port) from None
            except BaseException:
                self.stop()
                raise
        self.kind, self.port = kind, port
        log.info("embedded %s broker listening on %s", kind, self.url)
        return self.url

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the broker and wait for it; safe to call more than once."""
        try:
            if self._process is not None:
                self._stop_mosquitto(timeout)
            if self._thread is not None:
                self._stop_amqtt(timeout)
        finally:  # even if interrupted: mosquitto is dead by now (see _stop_mosquitto)
            if self._tempdir is not None:
                shutil.rmtree(self._tempdir, ignore_errors=True)
                self._tempdir = None
            self.port = None

    def kill(self) -> None:
        """Kill mosquitto at once (a forced stop); :meth:`stop` still cleans up. amqtt's thread is a daemon."""
        process = self._process
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()

    @property
    def tempdir(self) -> Path | None:
        """Mosquitto's private folder (configuration and log) while it runs, else None."""
        return self._tempdir

    # -- mosquitto ---------------------------------------------------------------------
    def _start_mosquitto(self, port: int, timeout: float) -> None:
        binary = find_mosquitto()
        if binary is None:
            raise EmbeddedBrokerError(
                "mosquitto is not installed; run scripts/setup.sh --dev (or apt-get install mosquitto), "
                "or use kind='amqtt'"
            )
        self._tempdir = Path(tempfile.mkdtemp(prefix=TEMPDIR_PREFIX))
        config = self._tempdir / "mosquitto.conf"
        log_file = self._tempdir / "mosquitto.log"
        if self.tls_config is None:
            text = _mosquitto_config(self.host, port, log_file, self.allow_anonymous)
        else:
            text = _provisioned_config(self.tls_config, self.host, port, log_file)
        config.write_text(text, encoding="utf-8")
        output = (self._tempdir / "mosquitto.out").open("wb")
        try:
            # A session of its own: Ctrl+C in a terminal reaches only us, and we stop mosquitto in order.
            # If we die without stopping it (SIGKILL, a crash), the parent-death signal stops it.
            self._process = subprocess.Popen(
                [str(binary), "-c", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent(),
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
        broker_class = _import_amqtt()  # here, not in the thread: a missing amqtt is the caller's error
        # amqtt logs every connection and packet at INFO; keep its warnings only.
        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.WARNING)
        self._amqtt_started.clear()
        self._amqtt_error = None
        self._thread = threading.Thread(
            target=self._run_amqtt, args=(broker_class, port), name=f"amqtt:{port}", daemon=True
        )
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

    def _run_amqtt(self, broker_class: type, port: int) -> None:
        """The amqtt thread: its own event loop, until :meth:`_stop_amqtt` sets the stop event."""
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{port}"}},
            # Only authentication: no $SYS publisher nor packet-logging plugins.
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": self.allow_anonymous}},
        }

        async def serve() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop_event = asyncio.Event()
            broker = broker_class(config)
            # amqtt logs a failed start with a 17-line traceback; start() raises it as one line instead.
            startup_errors = _DropErrorsOfThisThread()
            amqtt_log = logging.getLogger("amqtt.broker")
            amqtt_log.addFilter(startup_errors)
            try:
                await broker.start()
            except Exception as exc:  # amqtt wraps bind errors in BrokerError
                self._amqtt_error = exc
                self._amqtt_started.set()
                return
            finally:
                amqtt_log.removeFilter(startup_errors)
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


def _import_amqtt() -> type:
    try:
        from amqtt.broker import Broker
    except ImportError as exc:
        raise MissingExtraError(
            "the amqtt broker", "amqtt", "coordinator", "use mosquitto (apt-get install mosquitto)"
        ) from exc
    return Broker


class _DropErrorsOfThisThread(logging.Filter):
    """Drops the ERROR records logged by the thread that made the filter."""

    def __init__(self) -> None:
        super().__init__()
        self.thread = threading.get_ident()

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and record.thread == self.thread)


_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child receive SIGTERM when we die (Linux), else None.

    The kernel sends it when the *thread* that started the child ends, so it is
    used only from the main thread, whose end is the process's: a broker started
    from a worker thread must outlive that thread.
    """
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    # Everything resolved before fork: the child only makes one call.
    option, signum, parent = ctypes.c_int(_PR_SET_PDEATHSIG), ctypes.c_ulong(signal.SIGTERM), os.getpid()

    def preexec() -> None:
        prctl(option, signum)
        if os.getppid() != parent:  # we died between fork and prctl: nobody will send the signal
            os._exit(1)

    return preexec


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
            *_embedded_settings(log_file),
        ]
    )


def _provisioned_config(path: Path, host: str, port: int, log_file: Path) -> str:
    """litefed-provision's ``mosquitto.conf`` at ``path``, its one listener on ``host:port``, with our settings."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise EmbeddedBrokerError(f"cannot read the broker configuration {path} ({exc}); provision it again") from None
    listeners = _LISTENER.findall(text)
    if len(listeners) != 1:
        raise EmbeddedBrokerError(
            f"{path} has {len(listeners)} listeners; an embedded broker serves one: provision without --passwords"
        )
    moved = _LISTENER.sub(f"listener {port} {host}", text)
    header = f"# litefed (coordinator/broker.py): {path}, its listener moved to {host}:{port}."
    # General settings: with per_listener_settings false they may follow the listener's.
    return "\n".join([header, moved, "# The embedded broker's own settings.", *_embedded_settings(log_file)])


def _embedded_settings(log_file: Path) -> list[str]:
    """What every embedded mosquitto sets: no persistence, its queue bound, its log in ``log_file``."""
    return [
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


# -- command line ----------------------------------------------------------------------

PROG = "litefed-broker"
_STOP_SIGNALS = STOP_SIGNALS + ((signal.SIGHUP,) if hasattr(signal, "SIGHUP") else ())


def _port(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a TCP port; use 1..65535, or 0 for a free one")
    return port


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Run an MQTT broker on 127.0.0.1 for a local litefed federation. "
        "Prints its URL, then runs until Ctrl+C (or SIGTERM, SIGHUP).",
    )
    p.add_argument("--kind", choices=KINDS, default="auto", help="mosquitto, amqtt, or auto: mosquitto if installed")
    p.add_argument(
        "--port",
        type=_port,
        default=DEFAULT_PORT,
        metavar="N",
        help="TCP port (default %(default)s, the MQTT port the other commands assume; 0 picks a free one)",
    )
    return p


@command
def main(argv: list[str] | None = None) -> int:
    """Run the broker until a stop signal; return the exit status (130 if a second one forced it)."""
    args = build_parser().parse_args(argv)
    setup_logging(level=logging.WARNING)  # the URL and the stop are said on stdout/stderr, not logged
    broker = EmbeddedBroker(args.kind, port=args.port)
    # The handlers only record the request, never raise: an exception could strike in the middle
    # of the clean-up and leave mosquitto or its folder behind. A second signal kills mosquitto.
    with StopSignals(signals=_STOP_SIGNALS, on_repeat=broker.kill, announce=False) as signals:
        try:
            code = _serve(broker, signals)
        finally:  # whatever happened to stdout (a dead tee), to us (a signal) or to the broker
            broker.stop()
    return EXIT_INTERRUPTED if signals.repeated else code


def _serve(broker: EmbeddedBroker, signals: StopSignals) -> int:
    try:
        url = broker.start()
    except PortInUseError as exc:
        _say(f"{PROG}: error: {exc.host}:{exc.port} is in use (another broker?); "
             "pass --port N or --port 0 for a free one", sys.stderr)  # fmt: skip
        return EXIT_RUNTIME
    except CoordinatorError as exc:
        _say(f"{PROG}: error: {exc}", sys.stderr)
        return EXIT_RUNTIME
    _say(url, sys.stdout)
    hint = "the other commands' default --broker" if broker.port == DEFAULT_PORT else f"pass --broker {url}"
    _say(f"{PROG}: {broker.kind} listening on {url} ({hint}); Ctrl+C stops it", sys.stderr)
    while not signals.stop.is_set() and broker.running:
        time.sleep(0.1)
    if not signals.stop.is_set():
        _say(f"{PROG}: error: the {broker.kind} broker stopped unexpectedly", sys.stderr)
        return EXIT_RUNTIME
    _say(f"{PROG}: {STOPPING}", sys.stderr)
    return EXIT_OK


def _say(text: str, stream) -> None:
    """Print a line; if the reader is gone (a tee killed by Ctrl+C), carry on silently."""
    try:
        print(text, file=stream, flush=True)
    except (OSError, ValueError):
        # Point the stream at /dev/null, so that Python's final flush does not fail too.
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, stream.fileno())
            os.close(devnull)


if __name__ == "__main__":
    raise SystemExit(main())
