"""Load the Keras model named by a SPEC: ``model.keras`` or ``file.py:function``."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import keras

from converter.errors import ModelSpecError


def load_model(spec: str) -> keras.Model:
    """Return the Keras model described by ``spec``.

    ``path/to/model.keras`` loads a saved model (with its compile config);
    ``path/to/file.py:function`` imports the file, and ``package.module:function``
    the module, then calls ``function()``, which must return a (compiled or
    uncompiled) ``keras.Model``.
    """
    if spec.endswith(".keras") or spec.endswith(".h5"):
        path = Path(spec)
        if not path.is_file():
            raise ModelSpecError(f"model file {path} does not exist")
        try:
            return keras.models.load_model(path)
        except Exception as exc:  # keras raises many types for a bad file
            raise ModelSpecError(f"cannot load {path} as a Keras model: {exc}") from exc
    if ":" not in spec:
        raise ModelSpecError(
            f"SPEC {spec!r} must be a .keras file or 'file.py:function' (a function returning a keras.Model)"
        )
    source, function_name = spec.rsplit(":", 1)
    module = _import_file(Path(source)) if source.endswith(".py") else _import_module(source)
    factory = getattr(module, function_name, None)
    if not callable(factory):
        raise ModelSpecError(f"{source} has no function {function_name!r}")
    try:
        model = factory()
    except Exception as exc:
        raise ModelSpecError(f"{source}:{function_name}() failed: {exc!r}") from exc
    if not isinstance(model, keras.Model):
        raise ModelSpecError(f"{source}:{function_name}() returned {type(model).__name__}, not a keras.Model")
    return model


def _import_module(name: str):
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise ModelSpecError(f"cannot import module {name!r}: {exc}") from exc


def _import_file(path: Path):
    if not path.is_file():
        raise ModelSpecError(f"Python file {path} does not exist")
    module_name = f"_litefed_spec_{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ModelSpecError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise ModelSpecError(f"importing {path} failed: {exc!r}") from exc
    return module
