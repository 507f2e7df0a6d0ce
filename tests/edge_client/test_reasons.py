"""The rejection reasons are listed once, documented, and never spelled out elsewhere."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from edge_client import reasons
from edge_client.reasons import REASONS

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("edge_client", "coordinator", "converter")


def documented_reasons() -> list[str]:
    text = (ROOT / "docs" / "protocol.md").read_text()
    table = text.split("## Rejection reasons", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `([a-z0-9_]+)` \|", table, flags=re.MULTILINE)


def test_the_protocol_doc_lists_every_reason_once_in_the_same_order():
    assert documented_reasons() == list(REASONS)


def test_reasons_are_unique_stable_codes_and_all_listed():
    constants = {name: value for name, value in vars(reasons).items() if name.isupper() and isinstance(value, str)}
    assert sorted(constants.values()) == sorted(REASONS)
    assert len(set(REASONS)) == len(REASONS)
    assert all(re.fullmatch(r"[a-z][a-z0-9_]{2,31}", r) for r in REASONS)
    assert all(name == value.upper() for name, value in constants.items())


def literal_reasons(path: Path) -> list[tuple[int, str]]:
    """String literals equal to a reason code in ``path`` (docstrings and comments excluded)."""
    tree = ast.parse(path.read_text(), str(path))
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and node.value in REASONS and id(node) not in docstrings
    ]


def test_no_module_spells_a_reason_out_instead_of_using_the_constant():
    found = {
        f"{path.relative_to(ROOT)}:{line}": value
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
        if path.name != "reasons.py"
        for line, value in literal_reasons(path)
    }
    assert found == {}, "use edge_client.reasons constants for these reason codes"


def test_the_literal_scan_finds_a_spelled_out_reason(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text('"""bad_json in a docstring is fine."""\nraise ProtocolError("bad_json", "x")\n')
    assert literal_reasons(sample) == [(2, "bad_json")]
