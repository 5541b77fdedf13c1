"""The route table (gateway/routing.py): path parameters as the policies read them."""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

from gateway.config import parse_config
from gateway.routing import RouteTable, unsafe_path


def _table(*paths: str) -> RouteTable:
    routes = "\n".join(
        f"  - {{name: r{i}, match: {{path: '{p}'}}, upstream: app, auth: 'off'}}"
        for i, p in enumerate(paths)
    )
    cfg = parse_config(f"upstreams:\n  app: {{url: 'http://127.0.0.1:9'}}\nroutes:\n{routes}\n")
    return RouteTable(cfg.routes)


def _match(table: RouteTable, path: str) -> tuple[str, dict[str, Any]] | None:
    found = table.match({"type": "http", "method": "GET", "path": path, "query_string": b""})
    return None if found is None else (found[0].name, found[1])


def test_str_and_path_params_are_the_matched_text() -> None:
    table = _table("/api/webinars/{webinar_id}/presence/ping", "/files/{rest:path}")
    assert table.routes[0].plain and table.routes[1].plain
    assert _match(table, "/api/webinars/W-1/presence/ping") == ("r0", {"webinar_id": "W-1"})
    assert _match(table, "/files/a/b.txt") == ("r1", {"rest": "a/b.txt"})
    assert _match(table, "/api/webinars//presence/ping") is None


def test_converted_params_are_normalised_strings() -> None:
    table = _table("/items/{n:int}", "/w/{id:uuid}")
    assert not table.routes[0].plain and not table.routes[1].plain
    assert _match(table, "/items/0042") == ("r0", {"n": "42"})
    uid = "5B1F0C3E-0000-4000-8000-00000000BE11"
    assert _match(table, f"/w/{uid.lower()}") == ("r1", {"id": uid.lower()})


def test_unsafe_paths_are_found_with_or_without_raw_path() -> None:
    """The byte pre-filter lets every unsafe form through to the pattern (uvicorn's
    `path` is the decoded `raw_path`), and paths with a dot that is not a segment stay
    acceptable."""
    unsafe = [b"/a/../b", b"/a/./b", b"/a/%2e%2E/b", b"/a//b", b"/a%2Fb", b"/a%5cb"]
    unsafe += [b"/a\\b", b"/a%00b", b"/a/.."]
    safe = [b"/api/webinars/w1/presence/ping", b"/files/a.b.txt", b"/a/...b", b"/a%20b"]
    for raw, expected in [(p, True) for p in unsafe] + [(p, False) for p in safe]:
        path = unquote(raw.decode("ascii"))
        assert unsafe_path({"raw_path": raw, "path": path}) is expected, raw
        if b"%" not in raw:
            assert unsafe_path({"path": path}) is expected, raw
    # What follows the path is not the path.
    assert not unsafe_path({"raw_path": b"/a?next=../b//c", "path": "/a"})
