"""One root for every error litefed raises on purpose: ``except LitefedError`` catches them all."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from edge_client.errors import LitefedError, MissingExtraError

ROOT = Path(__file__).resolve().parents[2]


def exception_classes() -> list[tuple[str, str]]:
    """``(module, class)`` of every public class in the packages whose bases look like exceptions."""
    found = []
    for package in ("edge_client", "coordinator", "converter"):
        for path in sorted((ROOT / package).rglob("*.py")):
            module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            for node in ast.parse(path.read_text()).body:
                if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                    bases = [ast.unparse(b) for b in node.bases]
                    if any(b.endswith(("Error", "Exception", "Interrupt", "Diverged", "Unavailable")) for b in bases):
                        found.append((module, node.name))
    return found


CLASSES = exception_classes()


def test_the_scan_finds_the_package_roots():
    names = {name for _, name in CLASSES}
    assert {"EdgeClientError", "CoordinatorError", "ConverterError", "ProtocolError", "AggregationError"} <= names


@pytest.mark.parametrize(("module", "name"), CLASSES, ids=[f"{m}.{n}" for m, n in CLASSES])
def test_every_litefed_exception_derives_from_the_root(module, name):
    cls = getattr(importlib.import_module(module), name)
    if issubclass(cls, KeyboardInterrupt):  # a second Ctrl+C must not be caught as an error
        assert not issubclass(cls, LitefedError)
    else:
        assert issubclass(cls, LitefedError), f"{module}.{name} bases: {[b.__name__ for b in cls.__mro__]}"


def test_the_package_roots_are_distinct_children_of_the_root():
    from converter.errors import ConverterError
    from coordinator.errors import CoordinatorError
    from edge_client.errors import EdgeClientError

    roots = (EdgeClientError, CoordinatorError, ConverterError)
    assert all(r.__bases__ == (LitefedError,) for r in roots)


def test_a_missing_extra_is_an_import_error_of_its_package_naming_the_install():
    from converter.errors import MissingExtraError as ConverterMissing
    from coordinator.errors import CoordinatorError
    from coordinator.errors import MissingExtraError as CoordinatorMissing

    error = CoordinatorMissing("litefed-plot", "matplotlib", "coordinator", "use --no-plot")
    assert all(isinstance(error, cls) for cls in (ImportError, MissingExtraError, CoordinatorError))
    assert str(error) == "litefed-plot needs matplotlib: pip install 'litefed[coordinator]', or use --no-plot"
    assert issubclass(ConverterMissing, MissingExtraError) and issubclass(ConverterMissing, ImportError)
