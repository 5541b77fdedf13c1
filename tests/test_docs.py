"""The README and docs/ against the code: every error code the gateway can answer is in the
README's table, and every relative link resolves to a file inside the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def gateway_error_codes() -> set[tuple[str, str]]:
    """(status, code) pairs written in the source: `send_error(send, 404, "not_found", ...)`,
    `return 504, "upstream_timeout", ...`; codes passed to error_body() without a status
    nearby get status "?"."""
    found: set[tuple[str, str]] = set()
    for path in (ROOT / "gateway").rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        found.update(re.findall(r'\b([1-5]\d\d),\s*"([a-z_]+)"', text))
        found.update(("?", code) for code in re.findall(r'error_body\(\s*"([a-z_]+)"', text))
    return found


def readme_error_table() -> dict[str, set[str]]:
    """code -> statuses, from the README's error table."""
    table: dict[str, set[str]] = {}
    for status, codes in re.findall(
        r"^\s*\| (\d{3}) \| ((?:`[a-z_]+`(?:, )?)+) \|", (ROOT / "README.md").read_text(), re.M
    ):
        for code in re.findall(r"`([a-z_]+)`", codes):
            table.setdefault(code, set()).add(status)
    return table


def test_readme_lists_every_error_code_with_its_status() -> None:
    table = readme_error_table()
    source = gateway_error_codes()
    assert len(source) > 15, source
    missing = sorted(
        (status, code)
        for status, code in source
        if code not in table or (status != "?" and status not in table[code])
    )
    assert missing == [], "add these to the README's error table"
    assert table["not_found"] == {"404"}


@pytest.mark.parametrize("doc", DOCS, ids=[d.name for d in DOCS])
def test_relative_links_stay_inside_the_repository(doc: Path) -> None:
    text = doc.read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if re.match(r"^[a-z]+:", target):
            continue  # an absolute URL
        resolved = (doc.parent / target).resolve()
        assert resolved.is_relative_to(ROOT), f"{doc.name}: {target} leaves the repository"
        assert resolved.exists(), f"{doc.name}: {target} does not exist"
    # Paths written as code spans are links too, to a reader.
    assert "../shared/" not in text
