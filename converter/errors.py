"""Exceptions raised by the converter; messages tell the user what to do."""

from __future__ import annotations

from edge_client import errors as _edge_errors


class ConverterError(_edge_errors.LitefedError):
    """Base class for every error raised by :mod:`converter`."""


class ModelSpecError(ConverterError):
    """The model SPEC (``file.py:function`` or ``.keras``) cannot be loaded."""


class UnsupportedModelError(ConverterError):
    """The model uses a layer, option, loss or optimizer litefed cannot lower."""


class VerificationError(ConverterError):
    """The converted model is not builtin-only or does not match TensorFlow."""


class MissingExtraError(ConverterError, _edge_errors.MissingExtraError):
    """A package of an extra is not installed: TensorFlow, on an ``edge``-only install.

    Also an :class:`ImportError`, which is what it replaces; the message is one
    line naming the ``pip install`` that fixes it.
    """
