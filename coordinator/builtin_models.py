"""The built-in MNIST CNN, converted on first use and cached.

Only the first run needs TensorFlow (the ``converter`` extra); later runs,
and every client, use the cached ``.tflite`` + manifest. The cache key
includes the litefed version and the manifest format version, so an upgrade
re-converts, and a model from before a format change is never reused.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from edge_client import __version__
from edge_client.errors import EdgeClientError
from edge_client.manifest import FORMAT_VERSION, load_manifest, manifest_path_for

log = logging.getLogger(__name__)
BUILTIN = {"mnist_cnn": "converter.zoo:mnist_cnn"}


def cache_dir() -> Path:
    """``$LITEFED_CACHE``, else ``$XDG_CACHE_HOME/litefed/models`` (default ``~/.cache``)."""
    if os.environ.get("LITEFED_CACHE"):
        return Path(os.environ["LITEFED_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "litefed" / "models"


def builtin_model(name: str = "mnist_cnn", batch_size: int = 32, cache: Path | None = None) -> Path:
    """Path of the converted built-in model ``name`` (converting it if not cached)."""
    if name not in BUILTIN:
        raise ValueError(f"unknown built-in model {name!r}; choose one of {sorted(BUILTIN)}")
    path = (cache or cache_dir()) / f"{name}-b{batch_size}-v{__version__}-f{FORMAT_VERSION}.tflite"
    try:
        load_manifest(manifest_path_for(path))
        if path.is_file():
            return path
    except EdgeClientError:
        pass  # not cached yet, or a broken cache entry: convert again
    log.info("converting the built-in %s (batch %d) into %s; later runs reuse it", name, batch_size, path)
    from converter import ConvertConfig, convert  # TensorFlow: only on a cache miss

    convert(BUILTIN[name], path, ConvertConfig(batch_size=batch_size), log=log.info)
    return path
