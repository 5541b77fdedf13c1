"""The streaming proxy through real sockets: what the upstream receives and what the
client gets back."""

from __future__ import annotations

import asyncio
import io
import json
import socket
from typing import Any, cast

import aiohttp
import httpx

from gateway.config import GatewayConfig
from gateway.http import RequestContext
from gateway.protocol import CLIENT_LOST, ClientLost
from gateway.proxy import DisconnectWatch
from gateway.proxy.headers import nominated
from tests.fakes.app import FakeApp
from tests.helpers import Running, make_config, run_gateway


def last(fake: FakeApp) -> dict[str, Any]:
    return fake.requests[-1]


def hdrs(info: dict[str, Any]) -> dict[str, str]:
    return {k.lower(): v for k, v in info["headers"]}


async def raw_request(url: str, data: bytes) -> bytes:
    """Send bytes exactly as written (no client normalisation) and read the response."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(data)
    await writer.drain()
    out = b""
    try:
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), 5)
            if not chunk:
                break
            out += chunk
            if b"\r\n\r\n" in out:
                head, _, body = out.partition(b"\r\n\r\n")
                length = [
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                ]
                if length and len(body) >= length[0]:
                    break
    finally:
        writer.close()
    return out


async def test_raw_path_and_query_are_forwarded_byte_for_byte(
    fake_app: FakeApp, gw: Running
) -> None:
    resp = await raw_request(
        gw.url,
        b"GET /a%20b/%7Euser/caf%C3%A9;p=1/x.y?x=1&y=%20&z=%2B&x=2&p=%2F HTTP/1.1\r\n"
        b"Host: public.example\r\nConnection: close\r\n\r\n",
    )
    assert resp.startswith(b"HTTP/1.1 200")
    info = last(fake_app)
    assert info["raw_path"] == "/a%20b/%7Euser/caf%C3%A9;p=1/x.y?x=1&y=%20&z=%2B&x=2&p=%2F"


async def test_paths_the_app_would_read_differently_are_refused(
    fake_app: FakeApp, gw: Running
) -> None:
    # The router sees segments as written; the app's URL parser resolves dot segments and
    # treats %2F as part of a segment. Either difference could route a request past the
    # policies of the route the app will actually run.
    for path in (
        b"/api/w/x/../chat",
        b"/api/w/./chat",
        b"/api/w/%2e%2E/chat",
        b"/api//chat",
        b"/api/w%2Fchat",
        b"/api/w%5cchat",
    ):
        resp = await raw_request(
            gw.url, b"GET " + path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        assert resp.startswith(b"HTTP/1.1 400"), path
        assert b'"error": "bad_path"' in resp
    assert fake_app.requests == []


async def test_upstream_host_never_from_request(fake_app: FakeApp, gw: Running) -> None:
    async with httpx.AsyncClient() as c:
        await c.get(gw.url + "/x", headers={"Host": "evil.example"})
    h = hdrs(last(fake_app))
    assert h["host"] == fake_app.url.removeprefix("http://")
    assert h["x-forwarded-host"] == "evil.example"


async def test_hop_by_hop_headers_are_removed_both_ways(fake_app: FakeApp, gw: Running) -> None:
    resp = await raw_request(
        gw.url,
        b"GET /hop HTTP/1.1\r\nHost: x\r\nConnection: close, X-Drop-Me\r\n"
        b"X-Drop-Me: secret\r\nKeep-Alive: 300\r\nTE: trailers\r\n"
        b"Proxy-Authorization: Basic Zm9vOmJhcg==\r\nX-Keep: yes\r\n\r\n",
    )
    h = hdrs(last(fake_app))
    for gone in ("x-drop-me", "keep-alive", "te", "proxy-authorization"):
        assert gone not in h
    assert h["x-keep"] == "yes"
    head = resp.split(b"\r\n\r\n")[0].lower()
    # The fake app nominated X-Secret-Hop in its Connection header.
    assert b"x-secret-hop" not in head
    assert b"keep-alive: timeout" not in head
    assert b"x-upstream: fake" in head


def test_connection_nominates_one_name_or_a_list() -> None:
    """Every name a Connection header lists is hop-by-hop, in its single-name form too."""
    assert nominated([(b"Connection", b" X-Secret ")]) == {b"x-secret"}
    assert nominated([(b"connection", b"close, X-A,,x-b ")]) == {b"close", b"x-a", b"x-b"}
    assert nominated([(b"connection", b"keep-alive"), (b"Connection", b"X-C")]) == {
        b"keep-alive",
        b"x-c",
    }
    assert nominated([(b"connection", b"  "), (b"x-other", b"X-D")]) == frozenset()


async def test_forwarded_headers_trust_only_trusted_peers(fake_app: FakeApp) -> None:
    spoof = {"X-Forwarded-For": "6.6.6.6", "X-Forwarded-Proto": "https"}
    cfg = make_config(fake_app.url, server={"trusted_proxies": ["10.0.0.0/8"]})
    async with run_gateway(cfg) as gw, httpx.AsyncClient() as c:
        await c.get(gw.url + "/x", headers=spoof)
    h = hdrs(last(fake_app))
    assert h["x-forwarded-for"] == "127.0.0.1"
    assert h["x-forwarded-proto"] == "http"

    cfg = make_config(fake_app.url, server={"trusted_proxies": ["127.0.0.1/32"]})
    async with run_gateway(cfg) as gw, httpx.AsyncClient() as c:
        await c.get(
            gw.url + "/x", headers={"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "https"}
        )
    h = hdrs(last(fake_app))
    assert h["x-forwarded-for"] == "203.0.113.9, 127.0.0.1"
    assert h["x-forwarded-proto"] == "https"
    assert h["x-real-ip"] == "203.0.113.9"

    # Several X-Forwarded-For lines are one list, in order.
    async with run_gateway(cfg) as gw:
        await raw_request(
            gw.url,
            b"GET /x HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 9.9.9.9\r\n"
            b"X-Forwarded-For: 1.2.3.4\r\nConnection: close\r\n\r\n",
        )
    assert hdrs(last(fake_app))["x-forwarded-for"] == "9.9.9.9, 1.2.3.4, 127.0.0.1"


async def test_client_ip_headers_cannot_be_spoofed(fake_app: FakeApp, gw: Running) -> None:
    spoof = {
        "X-Real-IP": "6.6.6.6",
        "True-Client-IP": "6.6.6.6",
        "CF-Connecting-IP": "6.6.6.6",
        "Sb-Forwarded-For": "6.6.6.6",
        "X-Forwarded-Port": "1",
    }
    async with httpx.AsyncClient() as c:
        await c.get(gw.url + "/x", headers=spoof)
    h = hdrs(last(fake_app))
    assert h["x-real-ip"] == "127.0.0.1"
    for name in ("true-client-ip", "cf-connecting-ip", "sb-forwarded-for", "x-forwarded-port"):
        assert name not in h


def test_client_ip_walks_past_trusted_hops() -> None:
    from gateway.net import TrustedProxies

    t = TrustedProxies(["10.0.0.0/8", "127.0.0.1/32"])
    assert t.client_ip("127.0.0.1", "198.51.100.7, 10.1.2.3") == "198.51.100.7"
    assert t.client_ip("127.0.0.1", "1.1.1.1, 198.51.100.7, 10.1.2.3") == "198.51.100.7"
    assert t.client_ip("203.0.113.1", "198.51.100.7") == "203.0.113.1"  # untrusted peer
    assert t.client_ip("127.0.0.1", "not-an-ip") == "unknown"
    assert t.client_ip("127.0.0.1", "[2001:db8::1]:443") == "2001:db8::1"


async def test_request_id_kept_when_sane_else_generated(fake_app: FakeApp, gw: Running) -> None:
    async with httpx.AsyncClient() as c:
        r = await c.get(gw.url + "/x", headers={"X-Request-Id": "abc-123.def"})
        assert r.headers["x-request-id"] == "abc-123.def"
        assert hdrs(last(fake_app))["x-request-id"] == "abc-123.def"
        r = await c.get(gw.url + "/x", headers={"X-Request-Id": "bad id with spaces"})
        rid = r.headers["x-request-id"]
        assert len(rid) == 32 and rid != "bad id"
        assert hdrs(last(fake_app))["x-request-id"] == rid
        r = await c.get(gw.url + "/x")
        assert len(r.headers["x-request-id"]) == 32


async def test_inbound_identity_headers_are_stripped(fake_app: FakeApp, gw: Running) -> None:
    await raw_request(
        gw.url,
        b"GET /x HTTP/1.1\r\nHost: x\r\nX-Edge-User-Id: admin\r\n"
        b"X-Edge-User-Role: service_role\r\nx-edge-session-id: s\r\n"
        b"x_edge_user_id: admin\r\nConnection: close\r\n\r\n",
    )
    names = [k.lower().replace("_", "-") for k, _ in last(fake_app)["headers"]]
    assert not [k for k in names if k.startswith("x-edge-")]


async def test_sse_streams_chunk_by_chunk(fake_app: FakeApp, gw: Running) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.get(gw.url + "/stream") as r:
            assert r.headers["content-type"] == "text/event-stream"
            first = await asyncio.wait_for(r.content.readuntil(b"\n\n"), 5)
            assert first == b"data: one\n\n"
            # The second event does not exist yet: the first arrived on its own.
            fake_app.slow_release.set()
            second = await asyncio.wait_for(r.content.readuntil(b"\n\n"), 5)
            assert second == b"data: two\n\n"


async def test_large_download_streams_without_buffering(gw: Running) -> None:
    import tracemalloc

    async with aiohttp.ClientSession() as s:
        tracemalloc.start()
        async with s.get(gw.url + "/big?mb=20") as r:
            assert r.headers["content-length"] == str(20 * 1024 * 1024)
            total = 0
            async for chunk in r.content.iter_chunked(1 << 20):
                total += len(chunk)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert total == 20 * 1024 * 1024
    # Client, gateway and fake app share this process: none may hold the 20 MB.
    assert peak < 8 * 1024 * 1024, peak


async def test_request_body_streams_upstream(fake_app: FakeApp, gw: Running) -> None:
    body = b"y" * (3 * 1024 * 1024)
    async with httpx.AsyncClient() as c:
        r = await c.post(gw.url + "/upload", content=body)
        assert r.json()["body_len"] == len(body)

        async def chunks():  # type: ignore[no-untyped-def]
            for _ in range(8):
                yield b"z" * 1000

        r = await c.post(gw.url + "/upload", content=chunks())
        assert r.json()["body_len"] == 8000
        assert hdrs(last(fake_app)).get("transfer-encoding") == "chunked"


async def test_body_limit_413_for_length_and_chunked(fake_app: FakeApp) -> None:
    cfg = make_config(fake_app.url, server={"max_body_bytes": 100_000})
    async with run_gateway(cfg) as gw, httpx.AsyncClient() as c:
        r = await c.post(gw.url + "/upload", content=b"a" * 100_001)
        assert r.status_code == 413
        assert r.json()["error"] == "payload_too_large"

        async def chunks():  # type: ignore[no-untyped-def]
            for _ in range(30):
                yield b"b" * 10_000

        r = await c.post(gw.url + "/upload", content=chunks())
        assert r.status_code == 413
        assert r.json() == {
            "error": "payload_too_large",
            "message": "request body exceeds 100000 bytes",
        }
        r = await c.post(gw.url + "/upload", content=b"a" * 100_000)
        assert r.status_code == 200
    assert all(req["body_len"] <= 100_000 for req in fake_app.requests)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_upstream_refused_is_502_json() -> None:
    cfg = make_config(f"http://127.0.0.1:{_closed_port()}")
    async with run_gateway(cfg) as gw, httpx.AsyncClient() as c:
        r = await c.get(gw.url + "/anything")
        metrics = (await c.get(gw.admin_url + "/metrics")).text
    assert r.status_code == 502
    assert r.json() == {
        "error": "upstream_unavailable",
        "message": "upstream refused or unreachable",
    }
    assert 'edge_upstream_errors_total{kind="unavailable",upstream="app"} 1.0' in metrics


async def test_upstream_timeout_is_504_json(fake_app: FakeApp) -> None:
    cfg: GatewayConfig = make_config(fake_app.url)
    data = cfg.model_dump(by_alias=True, mode="json")
    data["upstreams"]["app"]["read_timeout"] = "200ms"
    from tests.helpers import make_config as mk

    cfg = mk(fake_app.url, upstreams={"app": {"url": fake_app.url, "read_timeout": "200ms"}})
    async with run_gateway(cfg) as gw, httpx.AsyncClient() as c:
        r = await c.get(gw.url + "/slow?s=3")
    assert r.status_code == 504
    assert r.json()["error"] == "upstream_timeout"


async def test_client_disconnect_cancels_upstream_call(fake_app: FakeApp, gw: Running) -> None:
    host, port = gw.url.removeprefix("http://").split(":")
    _reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET /hang HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    for _ in range(200):
        if fake_app.hits["/hang"]:
            break
        await asyncio.sleep(0.01)
    writer.close()
    for _ in range(300):
        if fake_app.cancelled:
            break
        await asyncio.sleep(0.01)
    assert fake_app.cancelled == 1


async def test_no_route_is_404_json(fake_app: FakeApp) -> None:
    cfg = make_config(
        fake_app.url,
        routes=[
            {
                "name": "only",
                "match": {"path": "/only", "methods": ["GET"]},
                "upstream": "app",
                "auth": "off",
            }
        ],
    )
    async with run_gateway(cfg) as gw, httpx.AsyncClient() as c:
        r = await c.get(gw.url + "/other")
        assert r.status_code == 404
        assert r.json()["error"] == "no_route"
        assert "x-request-id" in r.headers
        r = await c.post(gw.url + "/only")
        assert r.status_code == 404


async def test_access_log_has_no_secrets(fake_app: FakeApp) -> None:
    cfg = make_config(fake_app.url, server={"access_log": True})
    sink = io.StringIO()
    async with run_gateway(cfg) as gw, httpx.AsyncClient() as c:
        assert gw.app.rt.access_log is not None
        gw.app.rt.access_log.stream = sink
        await c.get(
            gw.url + "/page?access_token=SECRETQUERY",
            headers={
                "Authorization": "Bearer SECRETTOKEN",
                "Cookie": "sb-x-auth-token=SECRETCOOKIE",
            },
        )
    # Stopping the gateway flushes the batch.
    lines = sink.getvalue().splitlines()
    assert len(lines) == 1
    rec = json.loads(lines[0])
    assert rec["logger"] == "gateway.access"
    assert rec["route"] == "default"
    assert rec["status"] == 200
    assert rec["path"] == "/page"
    assert rec["upstream_ms"] >= 0
    assert rec["duration_ms"] >= rec["upstream_ms"]
    assert len(rec["request_id"]) == 32
    for secret in ("SECRETQUERY", "SECRETTOKEN", "SECRETCOOKIE"):
        assert secret not in lines[0]


async def test_unsupported_transfer_coding_is_refused(fake_app: FakeApp, gw: Running) -> None:
    resp = await raw_request(
        gw.url,
        b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n"
        b"Connection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    # httptools may refuse it itself (400); the gateway must never pass it on as chunked.
    assert resp.startswith((b"HTTP/1.1 501", b"HTTP/1.1 400")), resp[:40]
    assert fake_app.requests == []


async def test_waiting_for_a_pooled_connection_is_bounded(fake_app: FakeApp) -> None:
    cfg = make_config(
        fake_app.url,
        upstreams={
            "app": {
                "url": fake_app.url,
                "max_connections": 1,
                "pool_timeout": "200ms",
                # Long: the pool wait alone must end it (it once also waited this out,
                # and then got the connection the first request had freed).
                "connect_timeout": "30s",
            }
        },
    )
    async with run_gateway(cfg) as gw, httpx.AsyncClient(timeout=10) as c:
        first = asyncio.ensure_future(c.get(gw.url + "/slow?s=1.5"))
        while not fake_app.hits["/slow"]:
            await asyncio.sleep(0.01)
        second = await c.get(gw.url + "/other")
        assert second.status_code == 504
        assert second.json()["error"] == "upstream_timeout"
        assert (await first).status_code == 200


def _ctx(scope: dict[str, Any], receive: Any) -> RequestContext:
    ctx = RequestContext(scope, cast(Any, None), {}, "rid", "127.0.0.1")
    ctx.receive = receive
    return ctx


async def test_disconnect_watch_without_the_server_hook_uses_receive() -> None:
    """Under another ASGI server (no `edge.client_lost` extension) the watch waits on
    receive() for http.disconnect and cancels the request task."""
    gone = asyncio.Event()

    async def receive() -> dict[str, str]:
        await gone.wait()
        return {"type": "http.disconnect"}

    async def request() -> str:
        watch = DisconnectWatch(receive, _ctx({"type": "http"}, receive))
        watch.start()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            assert watch.gone
            watch.uncancel()
            return "cancelled"
        finally:
            watch.stop()
        return "finished"

    task = asyncio.ensure_future(request())
    await asyncio.sleep(0)
    gone.set()
    assert await asyncio.wait_for(task, 5) == "cancelled"


async def test_disconnect_watch_registered_after_the_loss_cancels_at_once() -> None:
    lost = ClientLost()
    lost.fire()

    async def receive() -> dict[str, str]:
        raise AssertionError("the hook answers; receive() is not needed")

    async def request() -> str:
        scope = {"type": "http", "extensions": {CLIENT_LOST: lost}}
        watch = DisconnectWatch(receive, _ctx(scope, receive))
        watch.start()
        try:
            await asyncio.sleep(0)
        except asyncio.CancelledError:
            watch.uncancel()
            return "cancelled"
        finally:
            watch.stop()
        return "finished"

    assert await asyncio.wait_for(request(), 5) == "cancelled"


async def test_disconnect_watch_ignores_the_hook_for_another_receive() -> None:
    """A policy that hands the proxy its own receive (a refresh flight) is not cancelled
    by the loss of the connection that started it."""
    lost = ClientLost()
    lost.fire()

    async def own_receive() -> dict[str, str]:
        await asyncio.Event().wait()
        return {"type": "http.disconnect"}

    async def request() -> str:
        scope = {"type": "http", "extensions": {CLIENT_LOST: lost}}
        watch = DisconnectWatch(own_receive, _ctx(scope, receive=None))
        watch.start()
        try:
            for _ in range(3):
                await asyncio.sleep(0)
        finally:
            watch.stop()
        return "finished"

    assert await asyncio.wait_for(request(), 5) == "finished"
