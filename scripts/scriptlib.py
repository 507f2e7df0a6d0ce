"""Helpers shared by the scripts: blocking TensorFlow in edge-side processes, and what
machine and which versions a benchmark result is from. Standard library only, so a
script can import it before it installs the TensorFlow blocker."""

from __future__ import annotations

import contextlib
import os
import platform
import sys
from pathlib import Path

BLOCKED = ("tensorflow", "keras", "tf_keras")


class TensorFlowBlocker:
    """A ``sys.meta_path`` finder that makes TensorFlow (and Keras) unimportable.

    Installed first thing in a process that stands for a board, it proves the
    edge side never needs TensorFlow; ``attempts`` records what tried anyway.
    """

    def __init__(self) -> None:
        self.attempts: list[str] = []

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".", 1)[0] in BLOCKED:
            self.attempts.append(fullname)
            raise ModuleNotFoundError(
                f"import of {fullname!r} is blocked: the edge side runs without TensorFlow", name=fullname
            )
        return None


def block_tensorflow() -> TensorFlowBlocker:
    """Install a :class:`TensorFlowBlocker` in front of every other finder and return it."""
    blocker = TensorFlowBlocker()
    sys.meta_path.insert(0, blocker)
    return blocker


def machine() -> dict:
    """Cores, CPU model, platform and load average (the machine is shared: load matters)."""
    model_name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model_name = line.split(":", 1)[1].strip()
                break
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"nproc": os.cpu_count(), "cpu_model": model_name, "platform": platform.platform(), "loadavg": load}


def package_versions(*packages: str) -> dict:
    """Python's version and each installed package's; missing packages are left out."""
    # Imported here, not at module level: it pulls in email, csv & co., which would
    # inflate the RSS of a benchmark worker that stands for an edge process.
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for package in packages:
        with contextlib.suppress(PackageNotFoundError):
            out[package] = version(package)
    return out
