"""docs/config-reference.md is generated from the config models (tools/config_reference.py):
these tests fail when a key has no description, the committed file is stale, or a value
rule the reference states (durations, rates, URLs, environment variables) is not what
`gateway check` does with its examples."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway.cli import main
from gateway.config import load_config

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import config_reference  # noqa: E402


def test_every_key_has_a_type_default_and_description() -> None:
    rows = config_reference.rows()
    assert len(rows) > 100
    undocumented = [path for path, _typ, _default, desc in rows if not desc]
    assert undocumented == [], (
        "describe these keys (a comment above the field, Field(description=...), or "
        f"EXTRA in tools/config_reference.py): {undocumented}"
    )
    by_path = {path: (typ, default) for path, typ, default, _ in rows}
    assert by_path["store.url"] == ("str", '`"memory://"`')
    assert by_path["store.timeout"] == ("duration", "`50ms`")
    assert by_path["routes[].rate_limit[].rate"] == ("rate", "required")
    assert by_path["routes[].cache.authorize.in"][1] == "required"


def test_committed_reference_matches_the_models() -> None:
    committed = config_reference.OUTPUT.read_text()
    assert committed == config_reference.render(), (
        "docs/config-reference.md is stale: run .venv/bin/python tools/config_reference.py"
    )


def test_check_mode_exits_nonzero_only_when_stale() -> None:
    ok = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "config_reference.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert ok.returncode == 0, ok.stdout


CASES = [(rule, ex) for rule in config_reference.RULES for ex in rule.examples]
ENV_NAMES = {name for _, ex in CASES for name in ex.env}


def value_at(node: Any, dotted: str) -> Any:
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", dotted):
        if part.startswith("["):
            node = node[int(part[1:-1])]
        elif isinstance(node, dict):
            node = node[part]
        else:
            node = getattr(node, part)
    return node


@pytest.mark.parametrize(
    ("rule", "example"),
    CASES,
    ids=[f"{rule.title}:{ex.yaml}:{sorted(ex.env.items())}" for rule, ex in CASES],
)
def test_every_value_rule_in_the_reference_is_what_check_does(
    rule: config_reference.Rule,
    example: config_reference.Example,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    for name, value in example.env.items():
        monkeypatch.setenv(name, value)
    path = tmp_path / "config.yaml"
    path.write_text(config_reference.example_config(rule, example))
    code = main(["check", "--config", str(path)])
    err = capsys.readouterr().err
    if example.error:
        assert code == 2
        assert f"  {rule.key}: {example.error}" in err.splitlines(), err
        return
    assert code == 0, err
    value = value_at(load_config(path), example.at or rule.key)
    if isinstance(example.result, float):
        assert value == pytest.approx(example.result)
    else:
        assert value == example.result


def test_the_rules_cover_what_the_reference_promises() -> None:
    titles = {rule.title for rule in config_reference.RULES}
    assert titles >= {"Durations", "Rates", "Environment variables", "Store URLs"}
    assert "## Value rules" in config_reference.OUTPUT.read_text()
