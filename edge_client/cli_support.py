"""What every litefed command line shares: exit codes, logging, stop signals, error lines.

``litefed-client``, ``-coordinator``, ``-emulate``, ``-simulate``, ``-broker``,
``-plot`` and ``-convert`` all use it, so they exit with the same codes, log in
the same format and stop the same way on Ctrl+C. It lives in ``edge_client``,
the package the other two build on, and imports only the standard library:
``--help`` of every command stays instant.

A command's ``main(argv) -> int`` is decorated with :func:`command` and
returns its exit status; only ``__main__`` (or the console script) calls
``sys.exit``.
"""

from __future__ import annotations

import functools
import logging
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from edge_client.errors import LitefedError

if TYPE_CHECKING:
    import argparse

EXIT_OK = 0
EXIT_RUNTIME = 1  # something failed while running: the broker, the disk, the data
EXIT_USAGE = 2  # bad options or configuration: nothing was started
EXIT_INTERRUPTED = 130  # a second Ctrl+C (128 + SIGINT, as shells report it)

LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
STOP_SIGNALS: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)
STOPPING = "stopping (press Ctrl+C again to stop at once)"

log = logging.getLogger("litefed")

P = ParamSpec("P")
T = TypeVar("T")


class UsageError(LitefedError):
    """Options that cannot work together; the command prints its usage and this message, and exits 2."""


class Interrupted(KeyboardInterrupt):
    """A second stop signal: stop at once, without the graceful shutdown."""


def setup_logging(verbosity: int = 0, *, level: int = logging.INFO) -> None:
    """Timestamped lines on stderr: ``level`` and up, everything from ``-v`` on.

    Left alone if the host program (a test, a notebook) configured logging.
    """
    logging.basicConfig(level=logging.DEBUG if verbosity > 0 else level, format=LOG_FORMAT, stream=sys.stderr)


def new_parser(prog: str, description: str, epilog: str | None = None) -> argparse.ArgumentParser:
    """A command's parser, its help text laid out as written (so the examples keep their lines)."""
    import argparse  # stdlib, and cheap: imported here only to keep this module's import list minimal

    formatter = argparse.RawDescriptionHelpFormatter
    return argparse.ArgumentParser(prog=prog, description=description, epilog=epilog, formatter_class=formatter)


def add_verbose_argument(parser: argparse.ArgumentParser) -> None:
    """``-v``/``--verbose``, counted: what :func:`setup_logging` takes."""
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v: debug)")


def print_error(prog: str, message: object, *, label: str = "error") -> None:
    """``prog: error: message`` on stderr: one line saying what went wrong and what to do."""
    print(f"{prog}: {label}: {message}", file=sys.stderr)


def fail(prog: str, message: object, status: int = EXIT_RUNTIME) -> int:
    """:func:`print_error`, then return ``status``: ``return fail(PROG, exc)`` ends a ``main``."""
    print_error(prog, message)
    return status


def parse_settings(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None, settings: Callable[[argparse.Namespace], T]
) -> tuple[argparse.Namespace, T]:
    """Parse ``argv`` and build the command's settings from the arguments, once.

    A :class:`UsageError` from ``settings`` is reported as argparse reports
    its own (usage, then ``prog: error: message``; exit 2), before anything
    is loaded.
    """
    args = parser.parse_args(argv)
    try:
        return args, settings(args)
    except UsageError as exc:
        parser.error(str(exc))


def run_service(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    settings: Callable[[argparse.Namespace], T],
    body: Callable[[T, threading.Event], int],
) -> int:
    """What a service command's ``main`` does: options checked into ``settings`` (exit 2 on a usage
    error), logging set from ``-v``, then ``body(settings, stop)`` under :class:`StopSignals`."""
    args, built = parse_settings(parser, argv, settings)
    setup_logging(args.verbose)
    with StopSignals() as signals:
        return body(built, signals.stop)


def exit_status(exc: SystemExit) -> int:
    """The status a ``SystemExit`` stands for, as the interpreter would exit with it."""
    if exc.code is None:
        return EXIT_OK
    if isinstance(exc.code, int):
        return exc.code
    print(exc.code, file=sys.stderr)  # sys.exit("message") prints it and exits 1
    return EXIT_RUNTIME


def command(main: Callable[P, int]) -> Callable[P, int]:
    """Decorate a command's ``main`` so that it always returns its exit status.

    argparse's ``SystemExit`` (``--help``, a usage error it has printed)
    becomes its status, and an interrupt that escapes ``main`` (Ctrl+C before
    the stop handlers are installed, or a second one) becomes 130, without a
    traceback.
    """

    @functools.wraps(main)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except SystemExit as exc:
            return exit_status(exc)
        except KeyboardInterrupt:
            return EXIT_INTERRUPTED

    return wrapper


class StopSignals:
    """Ctrl+C and SIGTERM as a graceful stop, while the ``with`` block runs.

    The first signal sets :attr:`stop` (the event a run loop polls) and logs
    ``SIGINT received: stopping (press Ctrl+C again to stop at once)``. A
    second one raises :class:`Interrupted`, or calls ``on_repeat`` instead
    when the caller's clean-up must never be cut short by an exception.
    ``announce=False`` logs nothing (the caller says it). The previous
    handlers come back on exit, so in-process callers (tests, notebooks) keep
    theirs. Off the main thread, where Python cannot set handlers, it does
    nothing.
    """

    def __init__(
        self,
        stop: threading.Event | None = None,
        *,
        signals: Sequence[int] = STOP_SIGNALS,
        on_repeat: Callable[[], None] | None = None,
        announce: bool = True,
    ) -> None:
        self.stop = threading.Event() if stop is None else stop
        self.signals = tuple(signals)
        self.on_repeat = on_repeat
        self.announce = announce
        self.received: int | None = None  # the first signal's number
        self.repeated = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        previous, self._previous = self._previous, {}
        for signum, handler in previous.items():
            # None: the handler was not set from Python; the default is the closest there is.
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)

    def _handle(self, signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = signum
            self.stop.set()
            if self.announce:
                log.warning("%s received: %s", name, STOPPING)
            return
        self.repeated = True
        if self.on_repeat is None:
            raise Interrupted(f"{name} received twice")
        self.on_repeat()
