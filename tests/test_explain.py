"""`python -m gateway explain` and `routes` (gateway/explain.py): answers for every route of
the shipped config, the chain in the order app.py really builds it, and the key parts a
request's headers decide — all without contacting anything."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway.app import build_chain
from gateway.cli import main
from gateway.config import GatewayConfig, load_config, parse_config
from gateway.explain import POLICY_ORDER, explain, parse_header
from gateway.routecheck import probe_paths
from gateway.routing import RouteTable
from gateway.runtime import Runtime

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = load_config(ROOT / "config.yaml", env={})

POLICY_CLASSES = {
    "AuthPolicy": "auth",
    "RateLimitPolicy": "rate_limit",
    "ConcurrencyPolicy": "concurrency",
    "RefreshPolicy": "refresh",
    "HeartbeatPolicy": "heartbeat",
    "CachePolicy": "cache",
    "BreakerPolicy": "breaker",
}


def request_for(cfg: GatewayConfig, index: int) -> tuple[str, str]:
    """A request line the route at `index` answers: its first method, a probe path of its
    template that the table routes to it, and its query."""
    table = RouteTable(cfg.routes)
    route = table.routes[index]
    method = (route.config.match.methods or ["GET"])[0]
    query = "&".join(f"{k}={v}" for k, v in (route.config.match.query or {}).items())
    for path in probe_paths(route.config.match.path):
        scope = {"type": "http", "method": method, "path": path, "query_string": query.encode()}
        found = table.match(scope)
        if found is not None and found[0] is route:
            return method, path + (f"?{query}" if query else "")
    raise AssertionError(f"no request reaches routes[{index}]")


@pytest.mark.parametrize("index", range(len(SHIPPED.routes)), ids=[r.name for r in SHIPPED.routes])
def test_explain_answers_for_every_shipped_route(
    index: int, capsys: pytest.CaptureFixture[str]
) -> None:
    route = SHIPPED.routes[index]
    method, target = request_for(SHIPPED, index)
    code = main(["explain", "--config", str(ROOT / "config.yaml"), method, target])
    out = capsys.readouterr().out
    assert code == 0
    assert out.startswith(f"{method} {target}\n")
    assert f"route routes[{index}] {route.name!r}" in out
    steps = [line.split(". ", 1)[1] for line in out.splitlines() if line[:5].strip()[:1].isdigit()]
    expected = [f"auth {route.auth.mode}"] + [
        p for p in POLICY_ORDER[1:] if getattr(route, p) is not None
    ]
    assert [s.split(" ")[0] for s in steps[:-1]] == [e.split(" ")[0] for e in expected]
    assert steps[0] == f"auth {route.auth.mode}"
    assert steps[-1] == f"proxy to upstream {route.upstream!r}"
    assert SHIPPED.upstreams[route.upstream].url + target in out


def chain_names(handler: Any) -> list[str]:
    names = []
    while type(handler).__name__ in POLICY_CLASSES:
        names.append(POLICY_CLASSES[type(handler).__name__])
        handler = handler.next
    assert type(handler).__name__ == "Proxy"
    return names


async def test_policy_order_is_the_order_app_builds() -> None:
    cfg = parse_config(
        """
upstreams: {app: {url: "http://127.0.0.1:9"}}
auth: {hs256_secret: an-hs256-secret-long-enough}
routes:
  - name: everything
    match: {methods: [GET], path: "/w/{webinar_id}"}
    upstream: app
    auth: required
    rate_limit: [{by: user, rate: 1/s}]
    concurrency: {max: 2}
    heartbeat: {}
    cache: {ttl: 1s}
    breaker: {group: g}
  - name: refresh
    match: {methods: [POST], path: /token}
    upstream: app
    auth: optional
    refresh: {}
""",
        {},
    )
    rt = Runtime(cfg)
    table = RouteTable(cfg.routes)
    built = [chain_names(build_chain(route, rt)) for route in table.routes]
    assert built[0] == [p for p in POLICY_ORDER if p != "refresh"]
    assert built[1] == ["auth", "refresh"]


CONFIG = """
server: {trusted_proxies: ["10.0.0.0/8"]}
upstreams: {app: {url: "http://app.internal:3000"}}
auth: {hs256_secret: an-hs256-secret-long-enough}
routes:
  - name: chat
    match: {methods: [GET], path: "/api/webinars/{webinar_id}/chat"}
    upstream: app
    auth: required
    rate_limit: [{by: "header:X-Api-Key", rate: 10/min, burst: 3}, {by: webinar, rate: 5/s}]
    cache: {ttl: 10s, vary_query: [page], vary_claims: [org], ignore_vary: [Accept-Language]}
  - name: ping
    match: {methods: [POST], path: "/api/webinars/{webinar_id}/ping"}
    upstream: app
    auth: optional
    heartbeat: {key: [user, "cookie:guest", ip]}
"""


def test_headers_decide_the_key_parts() -> None:
    cfg = parse_config(CONFIG, {})
    out = explain(
        cfg,
        "get",
        "/api/webinars/w1/chat?page=2&other=x",
        [("X-Api-Key", "k1"), ("X-Forwarded-For", "203.0.113.9"), ("Authorization", "Bearer t")],
        peer="10.1.2.3",
    ).render()
    assert "client ip: 203.0.113.9" in out
    assert '"header:x-api-key";q=3;w=18: 10/min, burst 3, key h:k1' in out
    assert '"webinar";q=1;w=1: 5/s, burst 1, key w:w1' in out
    assert "key: route chat, webinar_id=w1, query page=['2'], claim org" in out
    assert "the answer's Vary headers add a secondary key, except Accept-Language" in out
    assert "redirects to the upstream's own origin are rewritten to the client's" in out
    assert "token: Authorization: Bearer (found; explain does not verify it)" in out
    assert "http://app.internal:3000/api/webinars/w1/chat?page=2&other=x" in out
    # Without the header the rule does not apply; an untrusted peer's XFF is ignored.
    bare = explain(cfg, "GET", "/api/webinars/w1/chat", [("X-Forwarded-For", "1.2.3.4")])
    text = bare.render()
    assert "(X-Api-Key header absent: rule skipped)" in text
    assert "client ip: 127.0.0.1" in text
    assert "token: none in this request" in text


def test_heartbeat_viewer_sources_follow_the_request() -> None:
    cfg = parse_config(CONFIG, {})
    out = explain(cfg, "POST", "/api/webinars/w1/ping", [("Cookie", "guest=abc")]).render()
    assert (
        "webinar: w1; viewer: first of user=<verified sub>, cookie:guest=present, ip=127.0.0.1"
        in out
    )
    assert "sample: at most one per viewer per 300s reaches the app" in out


@pytest.mark.parametrize(
    ("method", "target", "outcome", "summary"),
    [
        ("GET", "/api/../admin", "bad_path", "400 bad_path"),
        ("GET", "/api/webinars/w1/chat -H Host:bad host", "bad_host", "400 bad_host"),
        ("GET", "/api/webinars/w1//chat", "bad_path", "400 bad_path"),
        ("POST", "/api/webinars/w1/chat", "no_route", "404 no_route"),
        ("GET", "/_edge/client-config", "edge", "answered by the gateway: the client intervals"),
        ("GET", "/_edge/webinars/w1/presence", "edge", "answered by the gateway: live presence"),
        ("GET", "/_edge/nosuch", "edge", "404 not_found"),
    ],
)
def test_requests_the_chain_never_sees(
    method: str, target: str, outcome: str, summary: str
) -> None:
    target, _, host = target.partition(" -H Host:")
    res = explain(parse_config(CONFIG, {}), method, target, [("Host", host)] if host else [])
    assert res.outcome == outcome
    assert res.summary.startswith(summary)
    assert res.steps == []


def test_websocket_chain_is_auth_and_the_websocket_proxy() -> None:
    res = explain(
        parse_config(CONFIG, {}), "GET", "/api/webinars/w1/chat", [("Upgrade", "websocket")]
    )
    assert [s.name for s in res.steps] == ["auth required", "WebSocket proxy to upstream 'app'"]
    assert res.steps[1].lines[0] == "ws://app.internal:3000/api/webinars/w1/chat"


def test_routes_prints_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["routes", "--config", str(ROOT / "config.yaml")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "#", "name", "methods", "path", "query", "upstream", "auth", "policies"
    ]  # fmt: skip
    assert len(lines) == 1 + len(SHIPPED.routes)
    assert lines[5].split() == [
        "4", "chat_poll", "GET", "/api/webinars/{webinar_id}/chat/messages", "-", "app",
        "required", "rate_limit,breaker",
    ]  # fmt: skip


@pytest.mark.parametrize(
    "argv",
    [
        ["explain", "GET"],
        ["explain", "GET", "/", "-H", "no colon"],
        ["check", "extra"],
    ],
)
def test_bad_arguments_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--config", str(ROOT / "config.yaml")])
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_parse_header() -> None:
    assert parse_header("X-Api-Key:  v: with colon ") == ("X-Api-Key", "v: with colon")
    with pytest.raises(ValueError, match="expected 'Name: value'"):
        parse_header(": v")
