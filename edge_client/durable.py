"""The one durable, atomic file write, for every file litefed keeps.

A board loses power, a coordinator is killed: a file written here is then
either its old or its new content, never a mix, and once the call returns
the new content survives a crash. The recipe: a uniquely named temporary
file in the same directory, fsync'd, renamed over the target, then the
directory fsync'd so the rename itself is on disk. Client state, the
coordinator's checkpoint, manifests and converted models all use it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

TMP_PREFIX = ".tmp-"  # temporaries left by a crash start with this, so their owner can sweep them


def atomic_write(path: str | Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves either the old or the new content."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + path.name + ".", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Make a rename durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
