"""The shape of the code: dependencies point one way, classes stay small, privates stay private."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("edge_client", "coordinator", "converter")
MAX_CLASS_LINES = 350


def modules(*packages: str) -> list[Path]:
    return [path for package in packages for path in sorted((ROOT / package).rglob("*.py"))]


def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), str(path))


def imported_modules(tree: ast.Module) -> set[str]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def test_the_edge_client_imports_neither_the_coordinator_nor_the_converter():
    offenders = {
        str(path.relative_to(ROOT)): sorted(m for m in imported_modules(parse(path)) if m.split(".")[0] in PACKAGES[1:])
        for path in modules("edge_client")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_coordinator_does_not_import_the_converter_at_module_level():
    # The coordinator converts the built-in model on a cache miss only, inside a function.
    offenders = []
    for path in modules("coordinator"):
        top_level = ast.Module([n for n in parse(path).body if isinstance(n, (ast.Import, ast.ImportFrom))], [])
        if any(m.split(".")[0] == "converter" for m in imported_modules(top_level)):
            offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


@pytest.mark.parametrize("package", ["edge_client", "coordinator"])
def test_no_class_is_over_the_size_limit(package):
    sizes = {
        f"{path.relative_to(ROOT)}:{node.name}": node.end_lineno - node.lineno + 1
        for path in modules(package)
        for node in ast.walk(parse(path))
        if isinstance(node, ast.ClassDef)
    }
    assert {name: lines for name, lines in sizes.items() if lines > MAX_CLASS_LINES} == {}


def private_imports(tree: ast.Module) -> list[str]:
    """``from x import _name`` of another module's private name (``__future__`` and dunders aside)."""
    return [
        f"{node.module}.{alias.name}"
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module != "__future__"
        for alias in node.names
        if alias.name.startswith("_") and not alias.name.startswith("__")
    ]


def test_no_module_imports_a_private_name_of_another():
    found = {str(path.relative_to(ROOT)): private_imports(parse(path)) for path in modules(*PACKAGES)}
    assert {k: v for k, v in found.items() if v} == {}


def test_the_private_import_scan_sees_one():
    assert private_imports(ast.parse("from edge_client.frames import _parse_header, Frame")) == [
        "edge_client.frames._parse_header"
    ]
