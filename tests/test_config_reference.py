"""docs/config-reference.md is generated from the config models (tools/config_reference.py):
these tests fail when a key has no description or the committed file is stale."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
