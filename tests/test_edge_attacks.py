"""Edge attack suite: requests as an attacker writes them, on real sockets, through the
real gateway; each case says what the client gets and what the app may see. Covers the
findings of issue 16 and the cases the gateway already refused, so none regresses.

JWT cases live in tests/test_auth_attacks.py (same table style); refresh-body and apikey
cases are at the end of this file.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from gateway.config import parse_config
from gateway.policies.refresh.policy import FLIGHTS
from gateway.store.memory import MemoryStore
from tests.fakes.app import FakeApp
from tests.fakes.clock import FakeClock
from tests.fakes.gotrue import FakeGoTrue
from tests.helpers import Running, make_config, run_gateway
from tests.test_proxy import raw_request
from tests.test_refresh import (
    CLIENT_HEADERS,
    TOKEN_PATH,
    client,
    refresh,
    refresh_config,
    sample,
    until,
)

# A deadline for events the gateway produces itself (a close, an answer): generous for a
# busy 2-core machine, never a measured duration.
EVENT_BOUND = 20.0


def status_of(resp: bytes) -> int:
    assert resp.startswith(b"HTTP/1.1 "), resp[:80]
    return int(resp[9:12])


def error_of(resp: bytes) -> str:
    doc = json.loads(resp.split(b"\r\n\r\n", 1)[1])
    assert set(doc) >= {"error", "message"}
    return str(doc["error"])


async def open_raw(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = url.removeprefix("http://").split(":")
    return await asyncio.open_connection(host, int(port))


async def read_until_closed(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it closes the connection."""
    out = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := await asyncio.wait_for(reader.read(65536), EVENT_BOUND):
            out += chunk
    return out


# ----------------------------------------------------------------- head size and time


async def test_a_huge_header_streamed_is_431_and_others_are_served_meanwhile(
    fake_app: FakeApp,
    gw: Running,
) -> None:
    """64 MB of one header value, written as fast as the socket takes it: the gateway
    answers 431 at 32 KiB and closes; the attacker's bytes never reach the parser beyond
    the limit, and a normal client on another connection is answered meanwhile."""
    reader, writer = await open_raw(gw.url)

    async def attack() -> None:
        writer.write(b"GET /x HTTP/1.1\r\nHost: a\r\nX-Big: ")
        chunk = b"x" * 65536
        with contextlib.suppress(ConnectionError):
            for _ in range(1024):  # 64 MB
                writer.write(chunk)
                await writer.drain()

    sender = asyncio.ensure_future(attack())
    resp = await read_until_closed(reader)
    normal = await raw_request(gw.url, b"GET /ok HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    await asyncio.wait_for(sender, EVENT_BOUND)
    writer.close()
    assert status_of(resp) == 431
    assert error_of(resp) == "header_too_large"
    assert status_of(normal) == 200
    assert [r["path"] for r in fake_app.requests] == ["/ok"]


async def test_an_unfinished_head_is_closed_at_header_timeout(fake_app: FakeApp) -> None:
    """Slowloris: a head that never ends. The connection is closed without an answer."""
    cfg = make_config(fake_app.url, server={"header_timeout": "300ms"})
    async with run_gateway(cfg) as gw:
        reader, writer = await open_raw(gw.url)
        writer.write(b"GET /x HTTP/1.1\r\nHost: a\r\nX-A: b\r\n")
        await writer.drain()
        assert await read_until_closed(reader) == b""
        writer.close()
    assert fake_app.requests == []


async def test_an_idle_new_connection_is_closed_at_header_timeout(fake_app: FakeApp) -> None:
    """Connections opened and never used (a connection flood) do not stay open."""
    cfg = make_config(fake_app.url, server={"header_timeout": "300ms"})
    async with run_gateway(cfg) as gw:
        conns = [await open_raw(gw.url) for _ in range(20)]
        for reader, writer in conns:
            assert await read_until_closed(reader) == b""
            writer.close()


async def test_limit_concurrency_answers_503_json(fake_app: FakeApp) -> None:
    cfg = make_config(fake_app.url, server={"limit_concurrency": 3})
    async with run_gateway(cfg) as gw:
        # Three connections held open by unfinished heads fill the limit.
        idle = [await open_raw(gw.url) for _ in range(3)]
        for _, writer in idle:
            writer.write(b"GET /x HTTP/1.1\r\nHost: a\r\n")
            await writer.drain()
        resp = await raw_request(gw.url, b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        for _, writer in idle:
            writer.close()
    assert status_of(resp) == 503
    assert error_of(resp) == "overloaded"
    assert b"retry-after: 1" in resp.lower()


# ----------------------------------------------------------------- the request table

Seen = dict[str, Any]  # what the fake app recorded for one request


def names(seen: Seen) -> list[str]:
    return [k.lower() for k, _ in seen["headers"]]


def header(seen: Seen, name: str) -> str | None:
    values = [v for k, v in seen["headers"] if k.lower() == name]
    assert len(values) <= 1, values
    return values[0] if values else None


def without(*gone: str) -> Callable[[Seen], bool]:
    return lambda seen: not set(gone) & set(names(seen))


def having(name: str, value: str | None) -> Callable[[Seen], bool]:
    return lambda seen: header(seen, name) == value


def all_of(*checks: Callable[[Seen], bool]) -> Callable[[Seen], bool]:
    return lambda seen: all(check(seen) for check in checks)


CLIENT_IP_AND_URL_OVERRIDES = (
    "client-ip",
    "x-cluster-client-ip",
    "fastly-client-ip",
    "x-originating-ip",
    "x-original-url",
    "x-rewrite-url",
    "x-real-ip",
    "true-client-ip",
    "cf-connecting-ip",
    "sb-forwarded-for",
    "x-client-ip",
    "x-forwarded-port",
    "x-forwarded-prefix",
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
)


@dataclass(frozen=True)
class Case:
    name: str
    request: bytes
    status: int
    # The gateway's own JSON error code, when it answers itself.
    error: str | None = None
    # What the app may see: None = the app is not called at all.
    app_sees: Callable[[Seen], bool] | None = None
    server: dict[str, Any] = field(default_factory=dict)


def req(*lines: str, body: bytes = b"", version: str = "1.1", target: str = "/t") -> bytes:
    head = "".join(f"{line}\r\n" for line in (f"GET {target} HTTP/{version}", *lines))
    if body:
        head = head.replace("GET ", "POST ", 1)
    return head.encode("latin-1") + b"Connection: close\r\n\r\n" + body


ALLOW_UNDERSCORES = {"allow_underscore_headers": True}
BIG = "v" * (32 * 1024)

CASES = [
    # --- header names with `_` (framing and identity read as `-` by CGI-style apps)
    Case(
        "underscore-transfer-encoding",
        req("Host: a", "Content-Length: 5", "Transfer_Encoding: chunked", body=b"hello"),
        200,
        app_sees=lambda s: "transfer_encoding" not in names(s) and s["body_len"] == 5,
    ),
    Case(
        "underscore-content-length",
        req("Host: a", "Content-Length: 5", "Content_Length: 100", body=b"hello"),
        200,
        app_sees=lambda s: "content_length" not in names(s) and s["body_len"] == 5,
    ),
    Case("underscore-any-name", req("Host: a", "X_Custom: 1"), 200, app_sees=without("x_custom")),
    Case(
        "underscore-allowed-keeps-other-names",
        req("Host: a", "X_Custom: 1"),
        200,
        app_sees=having("x_custom", "1"),
        server=ALLOW_UNDERSCORES,
    ),
    Case(
        "underscore-allowed-still-drops-framing-and-forwarding",
        req(
            "Host: a",
            "Content-Length: 5",
            "Transfer_Encoding: chunked",
            "Content_Length: 100",
            "X_Forwarded_For: 6.6.6.6",
            "X_Real_IP: 6.6.6.6",
            "Client_IP: 6.6.6.6",
            "X_Original_URL: /admin",
            body=b"hello",
        ),
        200,
        app_sees=without(
            "transfer_encoding",
            "content_length",
            "x_forwarded_for",
            "x_real_ip",
            "client_ip",
            "x_original_url",
        ),
        server=ALLOW_UNDERSCORES,
    ),
    Case(
        "underscore-identity-header",
        req("Host: a", "x_edge_user_id: admin", "X_Edge_User_Role: service_role"),
        200,
        app_sees=lambda s: not [n for n in names(s) if n.replace("_", "-").startswith("x-edge-")],
        server=ALLOW_UNDERSCORES,
    ),
    # --- Host
    # --- HTTP versions: llhttp parses `GET /` (0.9: no Host, no framing) and any x.y
    Case("http-0.9-simple-request", b"GET /t\r\n\r\n", 505, "http_version_not_supported"),
    Case("http-2.0-on-http-1", req("Host: a", version="2.0"), 505, "http_version_not_supported"),
    # (llhttp itself refuses an unknown 1.x minor version.)
    Case("http-1.2", req("Host: a", version="1.2"), 400, "bad_request"),
    Case("two-hosts", req("Host: a.example", "Host: evil.example"), 400, "bad_host"),
    Case("two-equal-hosts", req("Host: a.example", "Host: a.example"), 400, "bad_host"),
    Case("no-host-on-http-1.1", req(), 400, "bad_host"),
    Case("no-host-on-http-1.0", req(version="1.0"), 200, app_sees=having("x-forwarded-host", None)),
    Case("host-with-userinfo-path-query", req("Host: a@evil.example/x?y"), 400, "bad_host"),
    Case("host-with-userinfo", req("Host: user@a.example"), 400, "bad_host"),
    Case("host-with-path", req("Host: a.example/admin"), 400, "bad_host"),
    Case("host-list", req("Host: a.example, evil.example"), 400, "bad_host"),
    Case("host-port-out-of-range", req("Host: a.example:99999"), 400, "bad_host"),
    Case("host-port-not-a-number", req("Host: a.example:http"), 400, "bad_host"),
    Case("host-bad-ip-literal", req("Host: [zz::1]"), 400, "bad_host"),
    Case("host-with-quote", req("Host: a.example'"), 400, "bad_host"),
    Case(
        "host-name-and-port",
        req("Host: app.example.com:8443"),
        200,
        app_sees=having("x-forwarded-host", "app.example.com:8443"),
    ),
    Case(
        "host-ip-literal",
        req("Host: [2001:db8::1]:8443"),
        200,
        app_sees=having("x-forwarded-host", "[2001:db8::1]:8443"),
    ),
    Case(
        "bad-x-forwarded-host-from-a-trusted-proxy-falls-back-to-host",
        req("Host: a.example", "X-Forwarded-Host: a@evil.example/x"),
        200,
        app_sees=having("x-forwarded-host", "a.example"),
    ),
    Case(
        "x-forwarded-host-list-from-a-trusted-proxy-keeps-the-first",
        req("Host: a.example", "X-Forwarded-Host: public.example, a.example"),
        200,
        app_sees=having("x-forwarded-host", "public.example"),
    ),
    Case(
        "x-forwarded-host-from-an-untrusted-client-is-ignored",
        req("Host: a.example", "X-Forwarded-Host: evil.example"),
        200,
        app_sees=having("x-forwarded-host", "a.example"),
        server={"trusted_proxies": ["10.0.0.0/8"]},
    ),
    # --- method overrides: the app runs the method the gateway routed, nothing else
    Case(
        "method-override-headers",
        req(
            "Host: a",
            "X-HTTP-Method-Override: DELETE",
            "X-HTTP-Method: DELETE",
            "X-Method-Override: DELETE",
        ),
        200,
        app_sees=all_of(
            without("x-http-method-override", "x-http-method", "x-method-override"),
            lambda seen: seen["method"] == "GET",
        ),
    ),
    # --- client-IP and URL-override headers
    Case(
        "client-ip-and-url-overrides",
        req("Host: a", *(f"{h}: 6.6.6.6" for h in CLIENT_IP_AND_URL_OVERRIDES)),
        200,
        app_sees=all_of(
            without(*(h for h in CLIENT_IP_AND_URL_OVERRIDES if h != "x-real-ip")),
            having("x-real-ip", "127.0.0.1"),
        ),
    ),
    Case(
        "strip-list-is-configurable",
        req("Host: a", "X-Custom-IP: 6.6.6.6", "Client-IP: 10.0.0.1"),
        200,
        app_sees=all_of(without("x-custom-ip"), having("client-ip", "10.0.0.1")),
        server={"strip_request_headers": ["X-Custom-IP"]},
    ),
    # --- head size (server.max_header_bytes, default 32 KiB)
    # (four 7.5 KiB lines: the fake app, aiohttp, refuses a line over 8 KiB itself)
    Case(
        "head-just-under-32k",
        req("Host: a", *(f"X-Big{i}: {BIG[:7680]}" for i in range(4))),
        200,
        app_sees=bool,
    ),
    Case("one-header-over-32k", req("Host: a", f"X-Big: {BIG}"), 431, "header_too_large"),
    Case("request-line-over-32k", req("Host: a", target="/t?" + BIG), 431, "header_too_large"),
    Case(
        "many-headers-over-32k",
        req("Host: a", *(f"X-H{i}: {'v' * 100}" for i in range(400))),
        431,
        "header_too_large",
    ),
    Case(
        "configured-smaller-limit",
        req("Host: a", f"X-Big: {BIG[:3000]}"),
        431,
        "header_too_large",
        server={"max_header_bytes": 2048},
    ),
    # --- already refused before issue 16: kept so none regresses
    Case(
        "content-length-and-transfer-encoding",
        req("Host: a", "Content-Length: 5", "Transfer-Encoding: chunked", body=b"0\r\n\r\n"),
        400,
        "bad_request",
    ),
    Case(
        "two-content-lengths",
        req("Host: a", "Content-Length: 5", "Content-Length: 6", body=b"hello!"),
        400,
        "bad_request",
    ),
    Case(
        "two-transfer-encodings",
        req(
            "Host: a", "Transfer-Encoding: chunked", "Transfer-Encoding: chunked", body=b"0\r\n\r\n"
        ),
        400,
        "bad_request",
    ),
    Case("transfer-encoding-gzip", req("Host: a", "Transfer-Encoding: gzip"), 400, "bad_request"),
    Case(
        "transfer-encoding-gzip-chunked",
        req("Host: a", "Transfer-Encoding: gzip, chunked", body=b"0\r\n\r\n"),
        501,
        "not_implemented",
    ),
    Case(
        "content-length-plus",
        req("Host: a", "Content-Length: +5", body=b"hello"),
        400,
        "bad_request",
    ),
    Case("space-before-colon", req("Host: a", "X-A : b"), 400, "bad_request"),
    Case("obs-fold", req("Host: a", "X-A: b", " c"), 400, "bad_request"),
    Case("nul-in-value", req("Host: a", "X-A: b\x00c"), 400, "bad_request"),
    Case("bare-lf", b"GET /t HTTP/1.1\nHost: a\n\n", 400, "bad_request"),
    Case("dot-segments", req("Host: a", target="/api/x/../admin"), 400, "bad_path"),
    Case("encoded-slash", req("Host: a", target="/api/x%2Fadmin"), 400, "bad_path"),
    Case(
        "identity-headers",
        req("Host: a", "X-Edge-User-Id: admin", "X-Edge-User-Role: service_role"),
        200,
        app_sees=without("x-edge-user-id", "x-edge-user-role"),
    ),
    Case(
        "connection-nominated-and-hop-by-hop",
        req("Host: a", "Connection: X-Drop", "X-Drop: 1", "Proxy-Authorization: Basic eA=="),
        200,
        app_sees=without("x-drop", "proxy-authorization"),
    ),
    Case(
        "forged-forwarded-for-from-an-untrusted-client",
        req("Host: a", "X-Forwarded-For: 6.6.6.6", "Forwarded: for=6.6.6.6"),
        200,
        app_sees=all_of(having("x-forwarded-for", "127.0.0.1"), without("forwarded")),
        server={"trusted_proxies": ["10.0.0.0/8"]},
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_request_table(case: Case, fake_app: FakeApp) -> None:
    cfg = make_config(fake_app.url, server=case.server)
    async with run_gateway(cfg) as gw:
        resp = await raw_request(gw.url, case.request)
    assert status_of(resp) == case.status, resp[:300]
    if case.error is not None:
        assert error_of(resp) == case.error
        assert b"x-request-id: " in resp.lower()
    if case.app_sees is None:
        assert fake_app.requests == []
    else:
        (seen,) = fake_app.requests
        assert case.app_sees(seen), seen["headers"]


# ----------------------------------------------------------------- refresh (what GoTrue sees)


@pytest.fixture
async def gotrue() -> AsyncIterator[FakeGoTrue]:
    fake = FakeGoTrue(latency=0.02)
    await fake.start()
    yield fake
    for ev in fake.holds.values():
        ev.set()
    await fake.stop()


def _body(text: str) -> Callable[[str, str], bytes]:
    """A refresh body written by hand (JSON objects built from dicts cannot repeat a
    member); `{A}` / `{B}` are the victim's and the attacker's refresh tokens."""
    return lambda a, b: text.replace("{A}", a).replace("{B}", b).encode()


# (case, body, status, what GoTrue may receive: None = nothing, else the exact body)
REFRESH_BODIES: list[tuple[str, Callable[[str, str], bytes], int, str | None]] = [
    ("case-variant-member", _body('{"refresh_token":"{A}","Refresh_Token":"{B}"}'), 400, None),
    ("upper-case-member-only", _body('{"REFRESH_TOKEN":"{A}"}'), 400, None),
    # U+017F (long s) and U+212A (Kelvin sign) fold to s and k in Go's decoder.
    ("long-s-member", _body('{"refresh_token":"{A}","refre\u017fh_token":"{B}"}'), 400, None),
    ("kelvin-sign-member", _body('{"refresh_token":"{A}","refresh_to\u212aen":"{B}"}'), 400, None),
    ("duplicate-member", _body('{"refresh_token":"{A}","refresh_token":"{B}"}'), 400, None),
    (
        "other-members-are-not-forwarded",
        _body('{"refresh_token":"{A}","x":{"Refresh_token2":1},"gotrue_meta_security":{}}'),
        200,
        '{"refresh_token":"{A}"}',
    ),
    (
        "escaped-token-is-forwarded-as-parsed",
        lambda a, b: f'{{"refresh_token":"\\u{ord(a[0]):04x}{a[1:]}"}}'.encode(),
        200,
        '{"refresh_token":"{A}"}',
    ),
]


@pytest.mark.parametrize(
    ("body", "status", "gotrue_sees"),
    [case[1:] for case in REFRESH_BODIES],
    ids=[case[0] for case in REFRESH_BODIES],
)
async def test_refresh_body_table(
    gotrue: FakeGoTrue,
    body: Callable[[str, str], bytes],
    status: int,
    gotrue_sees: str | None,
) -> None:
    victim = gotrue.sign_in("victim@example.com")["refresh_token"]
    attacker = gotrue.sign_in("attacker@example.com")["refresh_token"]
    async with run_gateway(refresh_config(gotrue.url, "memory://")) as gw, client() as c:
        r = await c.post(
            gw.url + TOKEN_PATH,
            content=body(victim, attacker),
            headers={**CLIENT_HEADERS, "Content-Type": "application/json"},
        )
    assert r.status_code == status, r.text
    if gotrue_sees is None:
        assert r.json()["error"] == "invalid_request"
        assert gotrue.seen_bodies == []
    else:
        assert gotrue.seen_bodies == [gotrue_sees.replace("{A}", victim).encode()]
        assert r.json()["user"]["email"] == "victim@example.com"


async def test_a_replay_is_served_only_with_the_producers_apikey(gotrue: FakeGoTrue) -> None:
    """GoTrue's gateway (Kong) refuses a call without the project's apikey: a cached
    answer must not be handed to a request GoTrue would have refused."""
    gotrue.require_apikey = "anon-key"
    rt0 = gotrue.sign_in()["refresh_token"]
    async with run_gateway(refresh_config(gotrue.url, "memory://")) as gw, client() as c:
        first = await refresh(c, gw, rt0)
        assert first.headers["x-edge-refresh"] == "leader"
        for headers in ({}, {"apikey": "another-key"}):
            r = await c.post(gw.url + TOKEN_PATH, json={"refresh_token": rt0}, headers=headers)
            assert r.status_code == 401
            assert b"access_token" not in r.content
            assert "x-edge-refresh" not in r.headers
        same = await refresh(c, gw, rt0)
        assert same.headers["x-edge-refresh"] == "replay"
        assert same.content == first.content
        assert sample(gw, "edge_refresh_total", outcome="passthrough") == 2
    assert gotrue.calls == 1


async def test_a_follower_is_served_only_with_the_leaders_apikey(gotrue: FakeGoTrue) -> None:
    gotrue.require_apikey = "anon-key"
    gotrue.holds[1] = asyncio.Event()
    rt0 = gotrue.sign_in()["refresh_token"]
    async with run_gateway(refresh_config(gotrue.url, "memory://")) as gw, client() as c:
        leader = asyncio.ensure_future(refresh(c, gw, rt0))
        await until(lambda: gotrue.calls == 1)
        # Joins the flight in progress, or finds its answer cached: either way it is not
        # the leader's answer to give.
        other = asyncio.ensure_future(
            c.post(gw.url + TOKEN_PATH, json={"refresh_token": rt0}, headers={})
        )
        await until(lambda: len(gw.app.rt.services[FLIGHTS]) == 1)
        gotrue.holds[1].set()
        lead, follow = await asyncio.gather(leader, other)
    assert lead.status_code == 200
    assert follow.status_code == 401
    assert b"access_token" not in follow.content


async def test_the_apikey_binding_holds_across_replicas(gotrue: FakeGoTrue) -> None:
    gotrue.require_apikey = "anon-key"
    rt0 = gotrue.sign_in()["refresh_token"]
    cfg = refresh_config(gotrue.url, "memory://")
    shared = MemoryStore()
    async with run_gateway(cfg, store=shared) as a, run_gateway(cfg, store=shared) as b:
        async with client() as c:
            assert (await refresh(c, a, rt0)).headers["x-edge-refresh"] == "leader"
            r = await c.post(b.url + TOKEN_PATH, json={"refresh_token": rt0})
            assert r.status_code == 401
            assert (await refresh(c, b, rt0)).headers["x-edge-refresh"] == "replay"
    assert gotrue.calls == 1


async def test_grace_defaults_to_gotrues_reuse_interval(gotrue: FakeGoTrue) -> None:
    rt0 = gotrue.sign_in()["refresh_token"]
    cfg = refresh_config(gotrue.url, "memory://")
    routes = [r.model_dump(by_alias=True, exclude_unset=True) for r in cfg.routes]
    del routes[0]["refresh"]["grace"]
    cfg = make_config(
        "http://127.0.0.1:9", upstreams={"supabase": {"url": gotrue.url}}, routes=routes
    )
    assert cfg.routes[0].refresh is not None and cfg.routes[0].refresh.grace == 10
    clock = FakeClock(time.time())
    async with run_gateway(cfg, clock=clock) as gw, client() as c:
        await refresh(c, gw, rt0)
        clock.advance(9)
        assert (await refresh(c, gw, rt0)).headers["x-edge-refresh"] == "replay"
        clock.advance(2)
        assert (await refresh(c, gw, rt0)).headers["x-edge-refresh"] == "leader"


def test_shipped_configs_replay_no_longer_than_gotrue() -> None:
    root = Path(__file__).resolve().parent.parent
    env = {"SUPABASE_URL": "http://127.0.0.1:9999", "REDIS_URL": "redis://127.0.0.1:6379/0"}
    for path in (root / "config.yaml", root / "k8s" / "base" / "config.yaml"):
        cfg = parse_config(path.read_text(), env=env)
        graces = [r.refresh.grace for r in cfg.routes if r.refresh is not None]
        assert graces and all(g <= 10 for g in graces), (path, graces)
