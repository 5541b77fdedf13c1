"""Warnings about valid route tables that do not do what they say (gateway/routecheck.py):
routes that never match, and `{x:path}` prefixes whose bare prefix falls to a weaker
route. `gateway check` prints them and exits 0."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import load_config, parse_config
from gateway.routecheck import probe_paths, route_warnings
from tests.test_config_check import DEFAULT, HEAD, ROOT, run_cli


def warnings(routes: str) -> list[str]:
    return [str(w) for w in route_warnings(parse_config(HEAD + routes, {}))]


def test_shipped_configs_have_no_warnings() -> None:
    key = {"SUPABASE_SERVICE_ROLE_KEY": "service-key"}
    assert route_warnings(load_config(ROOT / "config.yaml", env=key)) == []
    k8s = load_config(ROOT / "k8s/base/config.yaml", env={"SUPABASE_URL": "https://x.co", **key})
    assert route_warnings(k8s) == []


def test_an_empty_flush_credential_is_a_warning() -> None:
    """The shipped config without the service role key: every batch flush would get 401."""
    found = [str(w) for w in route_warnings(load_config(ROOT / "config.yaml", env={}))]
    assert found and all("heartbeat.flush_headers." in w and "is empty" in w for w in found)
    assert any(w.startswith("routes[0].heartbeat.flush_headers.Authorization") for w in found)
    assert any(w.startswith("routes[0].heartbeat.flush_headers.apikey") for w in found)


def test_a_route_after_a_catch_all_never_matches() -> None:
    found = warnings(DEFAULT + "  - {name: late, match: {path: /late}, upstream: app}\n")
    assert found == [
        "routes[1].match.path: route 'late' never matches: routes[0] 'default' comes first "
        "and takes every request it would (first match wins); move it above routes[0] or "
        "narrow routes[0]"
    ]


@pytest.mark.parametrize(
    ("earlier", "later", "shadowed"),
    [
        ("{path: '/n/{id:int}'}", "{path: '/n/{id:int}'}", True),
        ("{path: '/n/{id}'}", "{path: '/n/{id:int}'}", True),
        ("{path: '/n/{id:int}'}", "{path: '/n/{id}'}", False),
        ("{path: '/n/{id}'}", "{path: '/n/{id:path}'}", False),
        ("{path: '/n/{id}'}", "{path: '/n/{id}.json'}", True),
        ("{path: '/n/{id}.json'}", "{path: '/n/{id}'}", False),
        ("{path: '/n{rest:path}'}", "{path: '/nx/{id:uuid}'}", True),
        ("{path: /n, methods: [GET]}", "{path: /n, methods: [HEAD]}", True),
        ("{path: /n, methods: [GET]}", "{path: /n, methods: [GET, POST]}", False),
        ("{path: /n, methods: [GET]}", "{path: /n}", False),
        ("{path: /n, query: {a: '1'}}", "{path: /n}", False),
        ("{path: /n}", "{path: /n, query: {a: '1'}}", True),
    ],
)
def test_shadowing(earlier: str, later: str, shadowed: bool) -> None:
    found = warnings(
        f"  - {{name: first, match: {earlier}, upstream: app}}\n"
        f"  - {{name: second, match: {later}, upstream: app}}\n" + DEFAULT
    )
    never = [f for f in found if f.startswith("routes[1].match.path: route 'second' never")]
    assert bool(never) is shadowed, found


def test_bare_prefix_that_falls_to_a_weaker_route_is_a_warning() -> None:
    routes = (
        "  - {name: private, match: {path: '/api/private/{rest:path}'}, upstream: app,"
        " auth: required}\n" + DEFAULT
    )
    assert warnings(routes) == [
        "routes[0].match.path: GET /api/private (the bare prefix) does not match "
        "'/api/private/{rest:path}'; it goes to routes[1] 'default' (auth optional, no "
        "rate_limit), weaker than 'private' (auth required, no rate_limit): add a route for "
        "'/api/private' or match it here"
    ]
    # Same protection on the route that takes it (or no route at all): nothing to say.
    assert warnings(routes.replace("auth: required", "auth: optional")) == []
    assert warnings(routes.replace(DEFAULT, "")) == []
    # A missing guard is weaker too, and the prefix's own parameters are filled in.
    guarded = (
        "  - {name: w, match: {methods: [POST], path: '/w/{webinar_id}/files/{rest:path}'},"
        " upstream: app, auth: optional, rate_limit: [{by: ip, rate: 1/s}]}\n" + DEFAULT
    )
    found = warnings(guarded)
    assert len(found) == 1 and found[0].startswith(
        "routes[0].match.path: POST /w/x/files (the bare prefix) does not match"
    )


def test_probe_paths_skip_paths_refused_before_routing() -> None:
    assert "" not in probe_paths("/{p:path}")
    assert all("//" not in p for p in probe_paths("/a/{p:path}/b"))
    assert probe_paths("/a/{id:int}") == ["/a/0", "/a/42", "/a/007"]


def test_cli_check_prints_warnings_and_exits_zero(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(HEAD + DEFAULT + "  - {name: late, match: {path: /late}, upstream: app}\n")
    r = run_cli("check", "--config", str(path))
    assert r.returncode == 0, r.stderr
    assert f"{path}: warning: routes[1].match.path: route 'late' never matches" in r.stderr
    assert "1 warning(s)" in r.stdout
