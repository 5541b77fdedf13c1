"""The code-shape rules the project holds itself to (STYLE.md), checked so they stay
true: no function in gateway/ or tests/ longer than 60 lines, decorators included."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GATEWAY = ROOT / "gateway"
TESTS = ROOT / "tests"
MAX_LINES = 60


def long_functions(root: Path) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                length = (node.end_lineno or node.lineno) - start + 1
                if length > MAX_LINES:
                    found.append(f"{path.relative_to(root.parent)}:{node.lineno} {node.name}")
    return found


def test_no_function_in_gateway_is_longer_than_60_lines() -> None:
    assert long_functions(GATEWAY) == []


def test_no_test_function_is_longer_than_60_lines() -> None:
    # A test that long holds a helper or two waiting to be named.
    assert long_functions(TESTS) == []


def test_the_check_sees_a_long_function(tmp_path: Path) -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))
    (tmp_path / "m.py").write_text(f"def long():\n{body}\n")
    assert long_functions(tmp_path) == [f"{tmp_path.name}/m.py:1 long"]
