"""litefed converter: Keras model -> trainable, builtin-only LiteRT model.

>>> from converter import ConvertConfig, convert
>>> convert("model.py:build", "out/model.tflite", ConvertConfig(batch_size=32))

The names below are imported on first use, not with the package: importing
``converter.cli`` (``litefed-convert --help``) or ``converter.errors`` must not
start TensorFlow, which takes seconds and may not even be installed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from converter.errors import ConverterError, ModelSpecError, UnsupportedModelError, VerificationError

if TYPE_CHECKING:
    from converter.api import ConvertConfig, ConvertedModel, convert, convert_model

_FROM_API = ("ConvertConfig", "ConvertedModel", "convert", "convert_model")

__all__ = [
    "ConvertConfig",
    "ConvertedModel",
    "ConverterError",
    "ModelSpecError",
    "UnsupportedModelError",
    "VerificationError",
    "convert",
    "convert_model",
]


def __getattr__(name: str):
    if name in _FROM_API:
        value = getattr(importlib.import_module("converter.api"), name)
        globals()[name] = value  # once: later lookups do not come back here
        return value
    raise AttributeError(f"module 'converter' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
