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


class MissingExtraError(ConverterError, ImportError):
    """A package of an extra is not installed: TensorFlow, on an ``edge``-only install.

    Also an :class:`ImportError`, which is what it replaces. The message is one
    line naming the ``pip install`` that fixes it.
    """

    def __init__(self, subject: str, package: str, extra: str):
        super().__init__(f"{subject} needs {package}: pip install 'litefed[{extra}]'")
        self.package = package
        self.extra = extra
