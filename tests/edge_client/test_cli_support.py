"""What every command line shares (edge_client.cli_support): exit codes, stop signals, logging, error lines."""

from __future__ import annotations

import argparse
import logging
import signal
import subprocess
import sys
import threading

import pytest

from edge_client import cli_support
from edge_client.cli_support import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_RUNTIME,
    EXIT_USAGE,
    STOPPING,
    Interrupted,
    StopSignals,
    UsageError,
    command,
    fail,
    parse_settings,
    print_error,
)


def test_exit_codes():
    assert (EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, EXIT_INTERRUPTED) == (0, 1, 2, 130)


def test_imports_only_the_standard_library():
    code = (
        "import sys\n"
        "before = set(sys.modules)\n"
        "import edge_client.cli_support\n"
        "new = sorted(m.split('.')[0] for m in set(sys.modules) - before)\n"
        "print(sorted(set(n for n in new if n not in sys.stdlib_module_names)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "['edge_client']", out.stdout


# -- stop signals ----------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_first_signal_stops_gracefully_and_a_second_interrupts_at_once(signum, caplog):
    with caplog.at_level(logging.WARNING, logger="litefed"), StopSignals() as signals:
        signal.raise_signal(signum)
        assert signals.stop.is_set() and signals.received == signum and not signals.repeated
        with pytest.raises(Interrupted):
            signal.raise_signal(signum)
        assert signals.repeated
    assert f"{signal.Signals(signum).name} received: {STOPPING}" in caplog.text
    assert STOPPING == "stopping (press Ctrl+C again to stop at once)"
    assert issubclass(Interrupted, KeyboardInterrupt)  # an unprepared caller still stops


def test_a_sigterm_after_a_ctrl_c_interrupts_too():
    with StopSignals() as signals:
        signal.raise_signal(signal.SIGINT)
        with pytest.raises(Interrupted):
            signal.raise_signal(signal.SIGTERM)
    assert signals.repeated


def test_the_previous_handlers_come_back():
    seen: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        with StopSignals():
            assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler
        signal.raise_signal(signal.SIGTERM)
        assert seen == [signal.SIGTERM]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_the_handlers_come_back_after_an_interrupt_too():
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(Interrupted), StopSignals():
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


def test_a_stop_set_elsewhere_does_not_make_the_first_signal_a_second():
    stop = threading.Event()
    stop.set()  # e.g. litefed-emulate's watcher, when every client died
    with StopSignals(stop) as signals:
        signal.raise_signal(signal.SIGINT)  # does not raise
        assert signals.stop is stop and signals.received == signal.SIGINT


def test_on_repeat_replaces_the_exception_and_announce_false_logs_nothing(caplog):
    calls: list[str] = []
    with caplog.at_level(logging.DEBUG), StopSignals(on_repeat=lambda: calls.append("kill"), announce=False) as signals:
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGINT)
    assert signals.repeated and calls == ["kill", "kill"]
    assert STOPPING not in caplog.text


def test_other_signals_can_be_chosen():
    with StopSignals(signals=(signal.SIGUSR1,)) as signals:
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # untouched
        signal.raise_signal(signal.SIGUSR1)
        assert signals.stop.is_set()
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL


def test_off_the_main_thread_it_does_nothing():
    before = signal.getsignal(signal.SIGINT)
    errors: list[BaseException] = []

    def enter() -> None:
        try:
            with StopSignals() as signals:
                assert not signals.stop.is_set()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    worker = threading.Thread(target=enter)
    worker.start()
    worker.join(10)
    assert errors == [] and signal.getsignal(signal.SIGINT) is before


# -- command(), parse_settings() and the error line ------------------------------------


def test_command_returns_statuses_instead_of_raising():
    parser = argparse.ArgumentParser(prog="demo")
    parser.add_argument("--n", type=int)

    @command
    def main(argv: list[str] | None = None, *, fail_with: BaseException | None = None) -> int:
        """The demo command."""
        parser.parse_args(argv)
        if fail_with is not None:
            raise fail_with
        return 7

    assert main([]) == 7 and main.__doc__ == "The demo command."
    assert main(["--n", "x"]) == EXIT_USAGE
    assert main(["--help"]) == EXIT_OK
    assert main([], fail_with=KeyboardInterrupt()) == EXIT_INTERRUPTED
    assert main([], fail_with=Interrupted()) == EXIT_INTERRUPTED
    assert main([], fail_with=SystemExit(None)) == EXIT_OK
    assert main([], fail_with=SystemExit(5)) == 5
    with pytest.raises(ValueError):  # a bug keeps its traceback
        main([], fail_with=ValueError("bug"))


def test_sys_exit_with_a_message_prints_it_and_is_1(capsys):
    assert command(lambda: sys.exit("broken"))() == EXIT_RUNTIME
    assert capsys.readouterr().err == "broken\n"


def test_parse_settings_reports_a_usage_error_as_argparse_does(capsys):
    parser = argparse.ArgumentParser(prog="demo")
    parser.add_argument("--clients", type=int, default=1)

    def settings(args: argparse.Namespace) -> int:
        if args.clients < 1:
            raise UsageError(f"--clients must be >= 1, got {args.clients}")
        return args.clients * 10

    args, built = parse_settings(parser, ["--clients", "3"], settings)
    assert (args.clients, built) == (3, 30)
    with pytest.raises(SystemExit) as info:
        parse_settings(parser, ["--clients", "0"], settings)
    err = capsys.readouterr().err.splitlines()
    assert info.value.code == EXIT_USAGE and err[0].startswith("usage: demo")
    assert err[-1] == "demo: error: --clients must be >= 1, got 0"


def test_the_error_line(capsys):
    print_error("litefed-demo", ValueError("no such file; pass --data"))
    assert fail("litefed-demo", "broken", EXIT_USAGE) == EXIT_USAGE
    print_error("litefed-demo", "bad key", label="configuration error")
    assert capsys.readouterr().err.splitlines() == [
        "litefed-demo: error: no such file; pass --data",
        "litefed-demo: error: broken",
        "litefed-demo: configuration error: bad key",
    ]
    assert fail("litefed-demo", "x") == EXIT_RUNTIME


# -- logging ---------------------------------------------------------------------------


@pytest.mark.parametrize(("verbosity", "level", "expected"), [(0, None, "INFO"), (1, None, "DEBUG"),
                                                               (2, None, "DEBUG"), (0, "WARNING", "WARNING"),
                                                               (1, "WARNING", "DEBUG")])  # fmt: skip
def test_setup_logging_levels_and_format(verbosity, level, expected):
    call = f"setup_logging({verbosity}" + (f", level=logging.{level})" if level else ")")
    code = (
        "import logging\n"
        "from edge_client.cli_support import setup_logging\n"
        f"{call}\n"
        "print(logging.getLevelName(logging.getLogger().level))\n"
        "logging.getLogger('litefed.demo').warning('hello')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == expected
    assert out.stderr.rstrip().endswith("WARNING litefed.demo: hello"), out.stderr  # timestamp first


def test_setup_logging_leaves_a_configured_host_alone():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    sentinel = logging.NullHandler()
    root.addHandler(sentinel)
    try:
        cli_support.setup_logging(1)
        assert root.handlers == [*handlers, sentinel] and root.level == level
    finally:
        root.removeHandler(sentinel)
