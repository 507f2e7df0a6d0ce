"""``litefed-broker`` as a user runs it: piped into tee, stopped by signals, killed hard, on a taken port.

Each test runs the real command in a child process with ``TMPDIR`` pointing at
its own folder, so the broker's temporary folder (``litefed-mosquitto-*``) and
its mosquitto process can be found and checked, whatever else runs on the machine.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from coordinator.broker import find_mosquitto, free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

KINDS = ("mosquitto", "amqtt")
WAIT = 20.0  # seconds: generous upper bound for a start or a stop on a loaded 2-core machine


def accepts_tcp(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_until(condition: Callable[[], bool], timeout: float = WAIT) -> bool:
    """Poll ``condition`` every 50 ms until it holds or ``timeout`` seconds passed; its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def mosquittos_using(folder: Path) -> list[int]:
    """PIDs of live processes whose command line mentions ``folder`` (the broker's mosquitto.conf is in it)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = next(line for line in (proc / "status").read_text().splitlines() if line.startswith("State:"))
        except (OSError, StopIteration):
            continue  # exited meanwhile
        if str(folder) in cmdline and "mosquitto" in cmdline and "zombie" not in state:
            pids.append(int(proc.name))
    return pids


def children(pid: int, name: str) -> list[int]:
    """PIDs of the live children of ``pid`` whose command name is ``name``."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            stat = (proc / "stat").read_text() if proc.name.isdigit() else ""
        except OSError:
            continue
        if stat:
            comm, rest = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :].split()
            if comm == name and int(rest[1]) == pid and rest[0] != "Z":
                found.append(int(proc.name))
    return found


def broker_folders(tmpdir: Path) -> list[Path]:
    return sorted(tmpdir.glob("litefed-mosquitto-*"))


@pytest.fixture()
def child_env(tmp_path) -> Iterator[tuple[dict[str, str], Path]]:
    """An environment whose TMPDIR is a fresh folder, and that folder; kills what a failed test leaves there."""
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    yield dict(os.environ, TMPDIR=str(tmpdir)), tmpdir
    for pid in mosquittos_using(tmpdir):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def exe() -> str:
    found = shutil.which("litefed-broker")
    assert found, "litefed-broker is not installed; run scripts/setup.sh"
    if find_mosquitto() is None:
        pytest.fail("mosquitto is not installed; run scripts/setup.sh --dev")
    return found


def start_mosquitto_broker(exe: str, env: dict, port: int, output: int) -> subprocess.Popen:
    """``litefed-broker --kind mosquitto`` in its own session, stdout and stderr to ``output`` (PIPE: text)."""
    return subprocess.Popen(
        [exe, "--kind", "mosquitto", "--port", str(port)],
        env=env,
        stdout=output,
        stderr=output,
        start_new_session=True,
        text=True,
    )


def stop_group(proc: subprocess.Popen) -> None:
    """Teardown: never leave a pipeline behind, whatever the test did."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


def assert_cleaned_up(port: int, tmpdir: Path) -> None:
    assert wait_until(lambda: not accepts_tcp(port)), f"port {port} still accepts connections"
    assert wait_until(lambda: not mosquittos_using(tmpdir)), f"mosquitto left running: {mosquittos_using(tmpdir)}"
    assert broker_folders(tmpdir) == [], "the broker's temporary folder was left behind"


@pytest.mark.parametrize("kind", KINDS)
def test_ctrl_c_on_a_pipeline_into_tee_stops_the_broker_and_cleans_up(exe, child_env, tmp_path, kind):
    # The terminal sends SIGINT to the whole foreground pipeline: tee dies at once, so
    # litefed-broker's goodbye lines meet a broken pipe. Which of the two handles its
    # SIGINT first is a race; the test makes tee win it every time, then signals the group.
    env, tmpdir = child_env
    port, out = free_port(), tmp_path / "broker.out"
    pipeline = subprocess.Popen(
        ["bash", "-c", f'"{exe}" --kind {kind} --port {port} | tee "{out}"'],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
        text=True,
    )
    try:
        assert wait_until(lambda: out.is_file() and f"mqtt://127.0.0.1:{port}\n" in out.read_text()), "no URL"
        assert accepts_tcp(port)
        if kind == "mosquitto":
            assert len(broker_folders(tmpdir)) == 1 and len(mosquittos_using(tmpdir)) == 1
        (tee,) = children(pipeline.pid, "tee")
        os.kill(tee, signal.SIGINT)
        assert wait_until(lambda: not children(pipeline.pid, "tee")), "tee survived SIGINT"
        os.killpg(pipeline.pid, signal.SIGINT)
        _, err = pipeline.communicate(timeout=WAIT)
    finally:
        stop_group(pipeline)
    assert_cleaned_up(port, tmpdir)
    assert "Traceback" not in err, err


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_stop_gracefully(exe, child_env, signum):
    env, tmpdir = child_env
    port = free_port()
    broker = start_mosquitto_broker(exe, env, port, subprocess.PIPE)
    try:
        assert broker.stdout.readline().strip() == f"mqtt://127.0.0.1:{port}"
        assert wait_until(lambda: accepts_tcp(port))
        broker.send_signal(signum)
        _, err = broker.communicate(timeout=WAIT)
    finally:
        stop_group(broker)
    assert broker.returncode == 0, err
    assert "stopping" in err and "Traceback" not in err, err
    assert_cleaned_up(port, tmpdir)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's prctl")
def test_mosquitto_dies_with_a_killed_litefed_broker(exe, child_env):
    env, tmpdir = child_env
    port = free_port()
    broker = start_mosquitto_broker(exe, env, port, subprocess.DEVNULL)
    try:
        assert wait_until(lambda: accepts_tcp(port)) and len(mosquittos_using(tmpdir)) == 1
        broker.kill()  # SIGKILL: no handler runs, nothing of ours cleans up
        broker.wait(WAIT)
    finally:
        stop_group(broker)
    assert wait_until(lambda: not mosquittos_using(tmpdir)), "mosquitto outlived litefed-broker"
    assert wait_until(lambda: not accepts_tcp(port))


@pytest.mark.parametrize("kind", KINDS)
def test_a_port_in_use_is_one_line_and_exit_1(exe, child_env, kind):
    env, tmpdir = child_env
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        done = subprocess.run(
            [exe, "--kind", kind, "--port", str(port)], env=env, capture_output=True, text=True, timeout=60
        )
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        f"litefed-broker: error: 127.0.0.1:{port} is in use (another broker?); pass --port N or --port 0 for a free one"
    ]
    assert broker_folders(tmpdir) == []


def test_the_default_port_is_1883(exe):
    # Every other command's default broker URL is mqtt://127.0.0.1:1883.
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60, check=True).stdout
    assert "1883" in out
    from coordinator.broker import DEFAULT_PORT, build_parser

    assert DEFAULT_PORT == 1883 and build_parser().parse_args([]).port == 1883
