"""Exceptions raised by the converter; messages tell the user what to do."""

from __future__ import annotations


class ConverterError(Exception):
    """Base class for every error raised by :mod:`converter`."""


class ModelSpecError(ConverterError):
    """The model SPEC (``file.py:function`` or ``.keras``) cannot be loaded."""


class UnsupportedModelError(ConverterError):
    """The model uses a layer, option, loss or optimizer litefed cannot lower."""


class VerificationError(ConverterError):
    """The converted model is not builtin-only or does not match TensorFlow."""
