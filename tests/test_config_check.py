"""`gateway check` refuses the silent mistakes with the dotted key of each, all in one
pass: malformed path templates, unknown methods, unknown upstreams beside type errors,
empty store URLs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import ConfigError, parse_config

ROOT = Path(__file__).resolve().parent.parent

HEAD = """
upstreams:
  app: {url: http://127.0.0.1:3000}
auth: {hs256_secret: s3cret}
routes:
"""
DEFAULT = '  - {name: default, match: {path: "/{path:path}"}, upstream: app, auth: optional}\n'


def issues(text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        parse_config(text, env or {})
    return [str(i) for i in exc.value.issues]


def test_every_error_in_one_pass() -> None:
    # A type error in one route used to hide the unknown upstreams until it was fixed.
    text = HEAD + (
        "  - {name: a, match: {path: /a}, upstream: nosuch, cache: {ttl: 10}}\n"
        "  - {name: b, match: {path: /b}, upstream: gone, heartbeat: {flush_upstream: nope}}\n"
        "  - {name: a, match: {path: /c, methods: [POST]}, upstream: app, cache: {ttl: 5s}}\n"
        + DEFAULT
        + "server: {workers: 2, listen: 'x'}\n"
    )
    found = issues(text)
    assert "routes[0].cache.ttl: duration 10 has no unit; write e.g. '10s' or '10ms'" in found
    assert "server.listen: expected HOST:PORT, got 'x'" in found
    assert "routes[0].upstream: unknown upstream 'nosuch'" in found
    assert "routes[1].upstream: unknown upstream 'gone'" in found
    assert "routes[1].heartbeat.flush_upstream: unknown upstream 'nope'" in found
    assert "routes[2].name: duplicate route name 'a' (also routes[0])" in found
    # Checks on a route that validated run too.
    assert "routes[2].cache: only GET/HEAD routes can be cached" in found


def test_cross_section_checks_run_beside_type_errors() -> None:
    text = HEAD.replace("auth: {hs256_secret: s3cret}", "auth: {leeway: 5}") + DEFAULT
    text += "  - {name: x, match: {path: /x}, upstream: app, auth: required}\n"
    text += "server: {workers: 2}\n"
    found = issues(text)
    assert "auth.leeway: duration 5 has no unit; write e.g. '5s' or '5ms'" in found
    # The auth section is invalid, so whether it has keys is unknown: not reported.
    assert not any(f.startswith("auth: routes verify tokens") for f in found)
    assert any(f.startswith("store.url: memory:// is per process") for f in found)


@pytest.mark.parametrize(
    ("path", "message"),
    [
        (
            "/api/webinars/{webinar_id/chat/messages",
            "'{' at character 15 of '/api/webinars/{webinar_id/chat/messages' is not closed",
        ),
        ("/api/{id", "'{' at character 6 of '/api/{id' is not closed by '}'"),
        ("/api/id}/x", "stray '}' at character 8 of '/api/id}/x'"),
        ("/api/{}/x", "{} in '/api/{}/x' is not a parameter"),
        ("/api/{a b}", "{a b} in '/api/{a b}' is not a parameter"),
        ("/api/{{id}}", "'{' at character 6 of '/api/{{id}}' is not closed by '}'"),
        ("/api/{id:nosuch}", "invalid path template: Unknown path convertor 'nosuch'"),
    ],
)
def test_malformed_templates_are_errors(path: str, message: str) -> None:
    text = HEAD + f'  - {{name: r, match: {{path: "{path}"}}, upstream: app}}\n' + DEFAULT
    found = issues(text)
    assert len(found) == 1, found
    assert found[0].startswith("routes[0].match.path: " + message), found


@pytest.mark.parametrize("methods", ["[GTE]", "[get, POTS]", "[]", "[PROPFIND]"])
def test_unknown_or_empty_methods_are_errors(methods: str) -> None:
    text = HEAD + f"  - {{name: r, match: {{path: /r, methods: {methods}}}, upstream: app}}\n"
    found = issues(text + DEFAULT)
    assert len(found) == 1 and found[0].startswith("routes[0].match.methods: "), found


def test_methods_are_case_insensitive() -> None:
    text = HEAD + "  - {name: r, match: {path: /r, methods: [get, Post, DELETE]}, upstream: app}\n"
    cfg = parse_config(text + DEFAULT, {})
    assert cfg.routes[0].match.methods == ["GET", "POST", "DELETE"]


def test_empty_store_url_is_refused() -> None:
    base = HEAD + DEFAULT + "store: {url: '${REDIS_URL-memory://}'}\n"
    # Unset: the default. Set but empty: refused, not guessed.
    assert parse_config(base, {}).store.url == "memory://"
    assert issues(base, {"REDIS_URL": ""}) == [
        "store.url: is empty; set memory:// or a redis:// URL"
    ]
    # `:-` keeps the shell meaning: unset or empty takes the default.
    shell = base.replace("REDIS_URL-", "REDIS_URL:-")
    assert parse_config(shell, {"REDIS_URL": ""}).store.url == "memory://"


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )


def test_cli_check_reports_a_typo_in_one_pass(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        HEAD + '  - {name: chat, match: {methods: [GTE], path: "/api/webinars/{webinar_id/chat"},'
        " upstream: appp}\n" + DEFAULT
    )
    r = run_cli("check", "--config", str(path))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = [line.strip() for line in r.stderr.splitlines()[1:]]
    assert [line.split(":", 1)[0] for line in lines] == [
        "routes[0].match.methods",
        "routes[0].match.path",
        "routes[0].upstream",
    ]
