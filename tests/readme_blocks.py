"""Run README.md's code blocks in order, as a newcomer pasting them would.

``python -m tests.readme_blocks WORKDIR`` copies the checkout into WORKDIR
and runs every ``sh`` and ``python`` block of README.md there, top to
bottom, in one shared working directory (later blocks use what earlier ones
made). The test suite runs it inside a fresh network namespace, so the
README's commands use their real defaults (a broker on 127.0.0.1:1883)
without touching the machine's network, and offline.

A block is steered by ``<!-- readme-test: ... -->`` comments on the lines
just above its fence (invisible on a rendered page):

- ``skip REASON``: not run (the reason is printed; the test suite lists them).
- ``replace "OLD" "NEW"``: run with OLD replaced (smaller settings for a test).
- ``background``: each command line starts in the background and runs until
  the next foreground block, which first stops it with SIGINT.
- ``wait-port N``: after starting the block, wait until 127.0.0.1:N accepts.
- ``await``: background, but the next foreground block first waits for it
  to exit by itself, with status 0 (a coordinator that finishes its rounds).
- ``config NAME``: a TOML block, written to NAME and loaded as a client config.
- ``timeout S``: seconds the block may take (default 900).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DIRECTIVE = re.compile(r"^<!--\s*readme-test:\s*(.*?)\s*-->\s*$")
FENCE = re.compile(r"^```(\w*)\s*$")
RUNNABLE = ("sh", "python")
IGNORED = (".git", "runs", "build", "__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis", "*.egg-info")


@dataclass
class Block:
    """One fenced code block and the directives above it."""

    line: int
    lang: str
    text: str
    directives: list[str] = field(default_factory=list)

    def directive(self, name: str) -> str | None:
        """The argument of directive ``name`` ("" when it has none), or None when absent."""
        for d in self.directives:
            word, _, rest = d.partition(" ")
            if word == name:
                return rest.strip()
        return None

    @property
    def label(self) -> str:
        return f"README.md:{self.line} ({self.lang})"

    def script(self) -> str:
        """The text to run, with every ``replace`` applied (each must match)."""
        text = self.text
        for d in self.directives:
            word, _, rest = d.partition(" ")
            if word == "replace":
                old, new = shlex.split(rest)
                if old not in text:
                    raise AssertionError(f"{self.label}: replace {old!r} matches nothing; update the directive")
                text = text.replace(old, new)
        return text


def parse(markdown: str) -> list[Block]:
    """Every fenced block of ``markdown`` with its directives, in order."""
    blocks, pending, current, body = [], [], None, []
    for number, line in enumerate(markdown.splitlines(), 1):
        if current is not None:
            if line.strip() == "```":
                current.text = "\n".join(body) + "\n"
                blocks.append(current)
                current, body = None, []
            else:
                body.append(line)
            continue
        if m := DIRECTIVE.match(line.strip()):
            pending.append(m.group(1))
        elif m := FENCE.match(line.strip()):
            current, pending = Block(number, m.group(1), "", pending), []
        elif line.strip():
            pending = []  # directives bind to the block directly below them
    if current is not None:
        raise AssertionError(f"README.md:{current.line}: unclosed code block")
    return blocks


def copy_checkout(workdir: Path) -> None:
    """The repository's files, without build outputs and caches, into ``workdir``."""
    shutil.copytree(ROOT, workdir, ignore=shutil.ignore_patterns(*IGNORED), dirs_exist_ok=True)


class Runner:
    """Runs blocks in one working directory, tracking background processes."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.env = {
            **os.environ,
            "XDG_STATE_HOME": str(workdir / ".state"),  # boards' state dirs, fresh for this run
            "MPLBACKEND": "Agg",
            "PYTHONUNBUFFERED": "1",
            "KERAS_HOME": str(keras_home(workdir)),  # `--data mnist` finds the data set offline
        }
        self.background: list[tuple[str, subprocess.Popen, bool, Path]] = []
        self.logs = workdir / ".readme-logs"
        self.logs.mkdir(exist_ok=True)

    def run(self, block: Block, index: int) -> None:
        if block.lang == "toml" and (name := block.directive("config")) is not None:
            self._check_config(block, name)
            return
        background = block.directive("background") is not None or block.directive("await") is not None
        if not background:
            self.settle()
        script = block.script()
        timeout = float(block.directive("timeout") or 900)
        if background:
            self._start(block, index, script, awaited=block.directive("await") is not None)
        elif block.lang == "python":
            path = self.workdir / f".readme_block_{index}.py"
            path.write_text(script)
            self._foreground(block, [sys.executable, path.name], timeout)
        else:
            self._foreground(block, ["bash", "-euo", "pipefail", "-c", script], timeout)
        if (port := block.directive("wait-port")) is not None:
            wait_for_port(int(port), 30.0, block.label)

    def _foreground(self, block: Block, argv: list[str], timeout: float) -> None:
        try:
            done = subprocess.run(
                argv, cwd=self.workdir, env=self.env, capture_output=True, text=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(f"{block.label} did not finish within {timeout:.0f} s") from exc
        if done.returncode != 0:
            raise AssertionError(f"{block.label} exited {done.returncode}:\n{tail(done.stdout + done.stderr)}")

    def _start(self, block: Block, index: int, script: str, awaited: bool) -> None:
        script = script.replace("\\\n", " ")  # one command per logical line
        lines = [ln for ln in script.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
        for k, command in enumerate(lines):
            log_path = self.logs / f"block{index}-{k}.log"
            with log_path.open("w") as log:
                proc = subprocess.Popen(
                    ["bash", "-c", f"exec {command}"], cwd=self.workdir, env=self.env, stdout=log, stderr=log
                )
            self.background.append((f"{block.label}: {command.strip()}", proc, awaited, log_path))

    def settle(self, timeout: float = 600.0) -> None:
        """Wait for awaited processes (exit 0 required), then stop the others with SIGINT."""
        deadline = time.monotonic() + timeout
        for label, proc, awaited, log in self.background:
            if awaited:
                try:
                    code = proc.wait(max(deadline - time.monotonic(), 1.0))
                except subprocess.TimeoutExpired:
                    raise AssertionError(f"{label} did not finish within {timeout:.0f} s:\n{self._logs()}") from None
                if code != 0:
                    raise AssertionError(f"{label} exited {code}:\n{tail(log.read_text())}")
        for _, proc, awaited, _ in self.background:
            if not awaited and proc.poll() is None:
                proc.send_signal(signal.SIGINT)  # Ctrl+C in its terminal
        for label, proc, _, log in self.background:
            try:
                proc.wait(30.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise AssertionError(f"{label} did not stop within 30 s of Ctrl+C") from None
            if proc.returncode not in (0, 130, -signal.SIGINT):
                raise AssertionError(f"{label} ended with {proc.returncode}:\n{tail(log.read_text())}")
        self.background.clear()

    def _logs(self) -> str:
        """The end of every background process's output, for a failure message."""
        return "\n".join(f"--- {label}\n{tail(log.read_text(), 15)}" for label, _, _, log in self.background)

    def _check_config(self, block: Block, name: str) -> None:
        (self.workdir / name).write_text(block.script())
        check = f"from edge_client.config import load_config; load_config({name!r})"
        self._foreground(block, [sys.executable, "-c", check], 60.0)

    def kill_all(self) -> None:
        for _, proc, _, _ in self.background:
            if proc.poll() is None:
                proc.kill()


def wait_for_port(port: int, timeout: float, label: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            s.settimeout(1.0)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"{label}: nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


def keras_home(workdir: Path) -> Path:
    """A Keras home whose cache holds MNIST when ``../shared/data/mnist.npz`` is beside the checkout."""
    home = workdir / ".keras"
    (home / "datasets").mkdir(parents=True, exist_ok=True)
    shared = ROOT.parent / "shared" / "data" / "mnist.npz"
    target = home / "datasets" / "mnist.npz"
    if shared.is_file() and not target.exists():
        target.symlink_to(shared)
    return home


def tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


def bring_up_loopback() -> None:
    """In a new network namespace, loopback starts down."""
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m tests.readme_blocks WORKDIR", file=sys.stderr)
        return 2
    workdir = Path(argv[0]).resolve()
    bring_up_loopback()
    copy_checkout(workdir)
    blocks = parse((ROOT / "README.md").read_text())
    runner = Runner(workdir)
    try:
        for index, block in enumerate(blocks):
            if block.lang not in RUNNABLE and block.directive("config") is None:
                continue
            reason = block.directive("skip")
            if reason is not None:
                print(f"skip {block.label}: {reason}", flush=True)
                continue
            start = time.monotonic()
            runner.run(block, index)
            print(f"ok   {block.label} in {time.monotonic() - start:.1f} s", flush=True)
        runner.settle()
    except AssertionError as exc:
        print(f"FAIL {exc}", flush=True)
        return 1
    finally:
        runner.kill_all()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
