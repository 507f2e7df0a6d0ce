"""Helpers shared by the benchmark scripts: what machine and which versions a result is from."""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path


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
