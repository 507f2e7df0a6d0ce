"""Run a litefed command as on an install that lacks some packages (an ``edge``-only board, say).

:func:`blocked_env` returns the environment for a child process in which the
named top-level packages (and their submodules) cannot be imported: a
``sitecustomize.py`` on ``PYTHONPATH`` installs :class:`ImportBlocker` in front
of every other finder before the program starts, so console scripts
(``litefed-convert`` ...) are covered too, not only ``python -c`` code. The
blocker raises :class:`ModuleNotFoundError`, as a missing package does, and
appends every blocked name to ``attempts_file``: a test can tell "never tried"
from "tried and coped".

Standard library only: this module is imported by the child before anything else.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
BLOCK_VAR = "LITEFED_TEST_BLOCK_IMPORTS"  # comma-separated top-level package names
ATTEMPTS_VAR = "LITEFED_TEST_BLOCKED_ATTEMPTS"  # file the child appends blocked names to

SITECUSTOMIZE = "import tests.blockers\ntests.blockers.install_from_env()\n"


class ImportBlocker:
    """A ``sys.meta_path`` finder that makes ``blocked`` packages unimportable."""

    def __init__(self, blocked: Iterable[str], attempts_file: str | None = None) -> None:
        self.blocked = frozenset(blocked)
        self.attempts_file = attempts_file

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".", 1)[0] not in self.blocked:
            return None
        if self.attempts_file:
            with open(self.attempts_file, "a", encoding="utf-8") as out:
                out.write(fullname + "\n")
        raise ModuleNotFoundError(f"No module named {fullname!r} (blocked by tests/blockers.py)", name=fullname)


def install_from_env() -> None:
    """Install an :class:`ImportBlocker` for the packages named in ``$LITEFED_TEST_BLOCK_IMPORTS``."""
    names = [n for n in os.environ.get(BLOCK_VAR, "").split(",") if n]
    early = [m for m in sys.modules if m.split(".", 1)[0] in names]
    if early:  # the blocker would prove nothing
        raise RuntimeError(f"imported before the blocker was installed: {early}")
    if names:
        sys.meta_path.insert(0, ImportBlocker(names, os.environ.get(ATTEMPTS_VAR)))


def blocked_env(site_dir: Path, blocked: Iterable[str], attempts_file: Path | None = None) -> dict[str, str]:
    """``os.environ`` plus what makes a child Python block ``blocked`` (writes ``site_dir/sitecustomize.py``)."""
    site_dir.mkdir(parents=True, exist_ok=True)
    (site_dir / "sitecustomize.py").write_text(SITECUSTOMIZE, encoding="utf-8")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site_dir), str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env[BLOCK_VAR] = ",".join(blocked)
    env.pop(ATTEMPTS_VAR, None)
    if attempts_file is not None:
        env[ATTEMPTS_VAR] = str(attempts_file)
    return env
