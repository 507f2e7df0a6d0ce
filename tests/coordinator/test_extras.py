"""On an ``edge``-only install, the commands that need another extra say which, in one line.

Each command runs in a child process in which the packages that only the
``coordinator`` and ``converter`` extras bring cannot be imported (see
tests/blockers.py), as on a board that ran ``pip install 'litefed[edge]'``.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess

import pytest

from coordinator.metrics import append_jsonl
from tests.blockers import blocked_env

# In the coordinator or converter extras, not in edge.
NOT_ON_A_BOARD = ("tensorflow", "keras", "tf_keras", "matplotlib", "amqtt", "tqdm", "dp_accounting")


def run_on_a_board(tmp_path, *command: str) -> subprocess.CompletedProcess:
    exe = shutil.which(command[0])
    assert exe, f"{command[0]} is not installed; run scripts/setup.sh"
    env = blocked_env(tmp_path / "site", NOT_ON_A_BOARD)
    return subprocess.run([exe, *command[1:]], capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)


def test_the_packages_are_installed_here_so_the_blocker_is_what_removes_them():
    assert all(importlib.util.find_spec(name) is not None for name in ("matplotlib", "amqtt", "tensorflow"))


def test_litefed_plot_without_matplotlib(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    append_jsonl(run / "metrics.jsonl", {"round": 1, "test_accuracy": 0.5, "test_loss": 1.0})
    done = run_on_a_board(tmp_path, "litefed-plot", str(run), "--out", str(tmp_path / "plot.png"))
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        "litefed-plot: error: plotting needs matplotlib: pip install 'litefed[coordinator]'"
    ]
    assert not (tmp_path / "plot.png").exists()


def test_litefed_broker_kind_amqtt_without_amqtt(tmp_path):
    done = run_on_a_board(tmp_path, "litefed-broker", "--kind", "amqtt", "--port", "0")
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        "litefed-broker: error: the amqtt broker needs amqtt: pip install 'litefed[coordinator]', "
        "or use mosquitto (apt-get install mosquitto)"
    ]


@pytest.mark.parametrize("command", [("litefed-plot", "--help"), ("litefed-broker", "--help")])
def test_help_works_on_a_board(tmp_path, command):
    done = run_on_a_board(tmp_path, *command)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage:")
