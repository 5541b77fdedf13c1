"""Heartbeat shedding and live presence, through the real gateway on a real socket, on the
memory store and on the real Redis: what viewers get back, what reaches the app, what the
batch flush sends, and what the presence endpoint counts (with an injected clock)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import signal
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
import yaml

from gateway.config import ConfigError, GatewayConfig
from gateway.policies.heartbeat.policy import (
    FLUSHERS,
    MAX_COALESCE,
    Flusher,
    HeartbeatPolicy,
)
from gateway.runtime import Runtime
from gateway.store import StoreError
from tests.conftest import free_port
from tests.fakes.app import FakeApp
from tests.fakes.clock import FakeClock
from tests.helpers import Running, make_config, run_gateway

SECRET = "heartbeat-test-secret-with-at-least-32-characters"
ISSUER = "http://issuer.test/auth/v1"
PING = "/api/webinars/{w}/presence/ping"
TRACK = "/api/webinars/{w}/access/track"
FLUSH_URL = "/rest/v1/rpc/edge_presence_batch"
W1 = "11111111-1111-4111-8111-111111111111"
W2 = "22222222-2222-4222-8222-222222222222"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def token(sub: str, now: float) -> str:
    """An HS256 Supabase-style access token for `sub`."""
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    claims = {
        "iss": ISSUER,
        "aud": "authenticated",
        "sub": sub,
        "role": "authenticated",
        "session_id": "s-" + sub,
        "iat": int(now),
        "exp": int(now) + 3600,
    }
    payload = _b64(json.dumps(claims).encode())
    signing_input = f"{header}.{payload}".encode()
    sig = hmac.new(SECRET.encode(), signing_input, hashlib.sha256).digest()
    return f"{header}.{payload}.{_b64(sig)}"


def user(i: int) -> str:
    return f"00000000-0000-4000-8000-{i:012d}"


def config(
    upstream: str,
    store: str,
    *,
    heartbeat: dict[str, Any] | None = None,
    track: dict[str, Any] | None = None,
    store_extra: dict[str, Any] | None = None,
    client: dict[str, Any] | None = None,
) -> GatewayConfig:
    routes: list[dict[str, Any]] = [
        {
            "name": "presence_ping",
            "match": {"methods": ["POST"], "path": "/api/webinars/{webinar_id}/presence/ping"},
            "upstream": "app",
            "auth": "required",
            "heartbeat": heartbeat if heartbeat is not None else {"forward_interval": "300s"},
        },
        {
            "name": "access_track",
            "match": {"methods": ["POST"], "path": "/api/webinars/{webinar_id}/access/track"},
            "upstream": "app",
            "auth": "optional",
            "heartbeat": track
            if track is not None
            else {"forward_interval": "300s", "key": ["user", "cookie:guest_id", "ip"]},
        },
        {"name": "default", "match": {"path": "/{path:path}"}, "upstream": "app", "auth": "off"},
    ]
    sections: dict[str, Any] = {
        # A generous timeout: the test machine is shared, and a slow call would be a
        # store failure (on_failure) instead of the behaviour under test.
        "store": {"url": store, "timeout": "1s", **(store_extra or {})},
        "auth": {"issuer": ISSUER, "audience": "authenticated", "hs256_secret": SECRET},
        "routes": routes,
    }
    if client:
        sections["client"] = client
    return make_config(upstream, **sections)


def counter(gw: Running, name: str, **labels: str) -> float:
    v = gw.app.rt.metrics.registry.get_sample_value(name, labels)
    return v or 0.0


async def ping(
    c: httpx.AsyncClient, gw: Running, webinar: str, sub: str, clock: FakeClock
) -> httpx.Response:
    return await c.post(
        gw.url + PING.format(w=webinar),
        headers={"Authorization": f"Bearer {token(sub, clock.now)}"},
        json={"t": 1},
    )


# --------------------------------------------------------------------------- sample mode


async def test_thousand_pings_from_hundred_viewers_reach_app_once_each(
    fake_app: FakeApp,
    store_url: str,
    clock: FakeClock,
) -> None:
    cfg = config(fake_app.url, store_url)
    path = PING.format(w=W1)
    async with run_gateway(cfg, clock=clock) as gw, httpx.AsyncClient() as c:
        tokens = [token(user(i), clock.now) for i in range(100)]
        sem = asyncio.Semaphore(25)

        async def one(tok: str) -> httpx.Response:
            async with sem:
                return await c.post(
                    gw.url + path, headers={"Authorization": f"Bearer {tok}"}, json={}
                )

        # Each viewer's 10 pings race each other: exactly one of them may go through.
        responses = await asyncio.gather(*(one(t) for _ in range(10) for t in tokens))
        assert [r.status_code for r in responses] == [200] * 1000
        absorbed = [r for r in responses if "raw_path" not in r.json()]
        assert len(absorbed) == 900
        assert all(r.json() == {"success": True} for r in absorbed)
        assert all(r.headers["content-type"] == "application/json" for r in absorbed)
        assert fake_app.hits[path] == 100
        # The app learnt who each forwarded viewer was from the verified token.
        seen = {
            dict((k.lower(), v) for k, v in r["headers"]).get("x-edge-user-id")
            for r in fake_app.requests
        }
        assert seen == {user(i) for i in range(100)}
        route = "presence_ping"
        assert counter(gw, "edge_heartbeats_total", route=route, outcome="forwarded") == 100
        assert counter(gw, "edge_heartbeats_total", route=route, outcome="absorbed") == 900


async def test_one_forward_per_viewer_per_interval(
    fake_app: FakeApp, store_url: str, clock: FakeClock
) -> None:
    cfg = config(fake_app.url, store_url, heartbeat={"forward_interval": "300s"})
    path = PING.format(w=W1)
    async with run_gateway(cfg, clock=clock) as gw, httpx.AsyncClient() as c:
        assert (await ping(c, gw, W1, user(1), clock)).json()["raw_path"] == path
        clock.advance(299)
        assert (await ping(c, gw, W1, user(1), clock)).json() == {"success": True}
        assert fake_app.hits[path] == 1
        clock.advance(1)
        assert (await ping(c, gw, W1, user(1), clock)).json()["raw_path"] == path
        assert (await ping(c, gw, W1, user(1), clock)).json() == {"success": True}
        assert fake_app.hits[path] == 2


async def test_webinars_are_separate(fake_app: FakeApp, store_url: str, clock: FakeClock) -> None:
    cfg = config(fake_app.url, store_url)
    async with run_gateway(cfg, clock=clock) as gw, httpx.AsyncClient() as c:
        for _ in range(3):
            for w in (W1, W2):
                r = await ping(c, gw, w, user(7), clock)
                assert r.status_code == 200
        assert fake_app.hits[PING.format(w=W1)] == 1
        assert fake_app.hits[PING.format(w=W2)] == 1
        await ping(c, gw, W2, user(8), clock)
        auth = {"Authorization": f"Bearer {token(user(99), clock.now)}"}
        p1 = (await c.get(f"{gw.url}/_edge/webinars/{W1}/presence", headers=auth)).json()
        p2 = (await c.get(f"{gw.url}/_edge/webinars/{W2}/presence", headers=auth)).json()
        assert (p1["online"], p2["online"]) == (1, 2)


async def test_custom_local_response(fake_app: FakeApp, store_url: str, clock: FakeClock) -> None:
    hb = {
        "forward_interval": "300s",
        "local_response": {"status": 202, "body": "ok", "content_type": "text/plain"},
    }
    cfg = config(fake_app.url, store_url, heartbeat=hb)
    async with run_gateway(cfg, clock=clock) as gw, httpx.AsyncClient() as c:
        await ping(c, gw, W1, user(1), clock)
        r = await ping(c, gw, W1, user(1), clock)
        assert (r.status_code, r.text, r.headers["content-type"]) == (202, "ok", "text/plain")
        assert r.headers["cache-control"] == "no-store"
        assert r.headers["x-request-id"]


async def test_missing_token_is_refused_before_recording(
    fake_app: FakeApp, store_url: str, clock: FakeClock
) -> None:
    cfg = config(fake_app.url, store_url)
    async with run_gateway(cfg, clock=clock) as gw, httpx.AsyncClient() as c:
        r = await c.post(gw.url + PING.format(w=W1), json={})
        assert r.status_code == 401
        assert fake_app.hits[PING.format(w=W1)] == 0
        auth = {"Authorization": f"Bearer {token(user(99), clock.now)}"}
        p = (await c.get(f"{gw.url}/_edge/webinars/{W1}/presence", headers=auth)).json()
        assert p["online"] == 0


# --------------------------------------------------------------------------- negatives


async def test_negative_answer_is_cached_per_viewer(
    fake_app: FakeApp, store_url: str, clock: FakeClock
) -> None:
    cfg = config(fake_app.url, store_url, heartbeat={"negative_ttl": "60s"})
    path = PING.format(w=W1)
    fake_app.status_override[path] = (404, {"error": "not_registered"})
    async with run_gateway(cfg, clock=clock) as gw, httpx.AsyncClient() as c:
        first = await ping(c, gw, W1, user(1), clock)
        assert (first.status_code, first.json()) == (404, {"error": "not_registered"})
        for _ in range(5):
            clock.advance(10)
            r = await ping(c, gw, W1, user(1), clock)
            assert (r.status_code, r.json()) == (404, {"error": "not_registered"})
            assert r.headers["content-type"].startswith("application/json")
        assert fake_app.hits[path] == 1
        # Another viewer is not affected by this one's answer.
        del fake_app.status_override[path]
        assert (await ping(c, gw, W1, user(2), clock)).status_code == 200
        assert fake_app.hits[path] == 2
        # A refused viewer is not online.
        auth = {"Authorization": f"Bearer {token(user(99), clock.now)}"}
        p = (await c.get(f"{gw.url}/_edge/webinars/{W1}/presence", headers=auth)).json()
        assert p["online"] == 1
        # After negative_ttl the app is asked again (it now accepts), then sampling resumes.
        clock.advance(11)
        assert (await ping(c, gw, W1, user(1), clock)).json()["raw_path"] == path
        assert (await ping(c, gw, W1, user(1), clock)).json() == {"success": True}
        assert fake_app.hits[path] == 3
        route = "presence_ping"
        assert counter(gw, "edge_heartbeats_total", route=route, outcome="negative") == 5


async def test_upstream_failure_lets_the_next_heartbeat_through(
    fake_app: FakeApp,
    store_url: str,
    clock: FakeClock,
) -> None:
    cfg = config(fake_app.url, store_url)
    path = PING.format(w=W1)
    fake_app.status_override[path] = (500, {"error": "db down"})
    async with run_gateway(cfg, clock=clock) as gw, httpx.AsyncClient() as c:
        assert (await ping(c, gw, W1, user(1), clock)).status_code == 500
        # Not a negative status: not cached, and the next one is forwarded, not absorbed.
        assert (await ping(c, gw, W1, user(1), clock)).status_code == 500
        del fake_app.status_override[path]
        assert (await ping(c, gw, W1, user(1), clock)).json()["raw_path"] == path
        assert (await ping(c, gw, W1, user(1), clock)).json() == {"success": True}
        assert fake_app.hits[path] == 3


# --------------------------------------------------------------------------- guests


async def test_guests_keyed_by_cookie(fake_app: FakeApp, store_url: str, clock: FakeClock) -> None:
    cfg = config(fake_app.url, store_url)
    path = TRACK.format(w=W1)
    guest_a = "guest-a-6f1c0d1e9b"
    async with run_gateway(cfg, clock=clock) as gw, httpx.AsyncClient() as c:
        url = gw.url + path
        for _ in range(3):
            for g in (guest_a, "guest-b-88a2"):
                r = await c.post(url, headers={"Cookie": f"theme=dark; guest_id={g}"})
                assert r.status_code == 200
        # Two guests from the same address are two viewers.
        assert fake_app.hits[path] == 2
        # No cookie: the address is the key (one more viewer), then it is absorbed.
        assert (await c.post(url)).json()["raw_path"] == path
        assert (await c.post(url)).json() == {"success": True}
        assert fake_app.hits[path] == 3
        # A signed-in viewer is keyed by the verified user, whatever cookie it carries.
        auth = {"Authorization": f"Bearer {token(user(5), clock.now)}"}
        assert "raw_path" in (await c.post(url, headers={**auth, "Cookie": "guest_id=x"})).json()
        assert fake_app.hits[path] == 4
        p = (await c.get(f"{gw.url}/_edge/webinars/{W1}/presence", headers=auth)).json()
        assert p["online"] == 4
    if store_url.startswith("redis"):
        # The cookie value never reaches the store in plaintext.
        client = aioredis.from_url(store_url)
        try:
            keys = await client.keys("*")
            assert keys
            for k in keys:
                assert guest_a.encode() not in k
                kind = await client.type(k)
                if kind == b"zset":
                    members = await client.zrange(k, 0, -1)
                    assert all(guest_a.encode() not in m for m in members)
        finally:
            await client.aclose()


# --------------------------------------------------------------------------- presence


async def test_presence_counts_viewers_within_window(
    fake_app: FakeApp, store_url: str, clock: FakeClock
) -> None:
    # Default window: 3 x client.presence_ping_interval.
    cfg = config(fake_app.url, store_url, client={"presence_ping_interval": "60s"})
    async with run_gateway(cfg, clock=clock) as gw, httpx.AsyncClient() as c:
        presence = f"{gw.url}/_edge/webinars/{W1}/presence"
        for i in range(5):
            await ping(c, gw, W1, user(i), clock)
        clock.advance(100)
        for i in range(5, 8):
            await ping(c, gw, W1, user(i), clock)
        auth = {"Authorization": f"Bearer {token(user(99), clock.now)}"}
        r = await c.get(presence, headers=auth)
        assert r.status_code == 200
        assert r.json() == {"webinar_id": W1, "online": 8, "window_s": 180}
        assert r.headers["cache-control"] == "no-store"
        clock.advance(81)  # the first five were seen 181 s ago
        auth = {"Authorization": f"Bearer {token(user(99), clock.now)}"}
        assert (await c.get(presence, headers=auth)).json()["online"] == 3
        # A viewer pinging again is online again; a viewer counts once however often seen.
        await ping(c, gw, W1, user(0), clock)
        await ping(c, gw, W1, user(0), clock)
        assert (await c.get(presence, headers=auth)).json()["online"] == 4
        clock.advance(1000)
        auth = {"Authorization": f"Bearer {token(user(99), clock.now)}"}
        assert (await c.get(presence, headers=auth)).json()["online"] == 0


async def test_presence_requires_a_verified_identity(
    fake_app: FakeApp, store_url: str, clock: FakeClock
) -> None:
    cfg = config(fake_app.url, store_url, heartbeat={"presence_window": "90s"})
    async with run_gateway(cfg, clock=clock) as gw, httpx.AsyncClient() as c:
        presence = f"{gw.url}/_edge/webinars/{W1}/presence"
        r = await c.get(presence)
        assert r.status_code == 401
        assert r.json()["error"]
        bad = {"Authorization": "Bearer not.a.token"}
        assert (await c.get(presence, headers=bad)).status_code == 401
        auth = {"Authorization": f"Bearer {token(user(1), clock.now)}"}
        r = await c.get(presence, headers=auth)
        # The widest window of the heartbeat routes (track keeps the 3 x 120 s default).
        assert r.json() == {"webinar_id": W1, "online": 0, "window_s": 360}
        assert (await c.post(presence, headers=auth)).status_code == 405


async def test_no_presence_endpoint_without_heartbeat_routes(fake_app: FakeApp) -> None:
    cfg = make_config(fake_app.url)
    async with run_gateway(cfg) as gw, httpx.AsyncClient() as c:
        r = await c.get(f"{gw.url}/_edge/webinars/{W1}/presence")
        assert r.status_code == 404


# --------------------------------------------------------------------------- store down


@pytest.mark.parametrize("mode", ["open", "closed"])
async def test_store_down_follows_on_failure(
    fake_app: FakeApp, mode: str, clock: FakeClock
) -> None:
    down = "redis://127.0.0.1:1/0"
    cfg = config(fake_app.url, down, store_extra={"on_failure": mode, "timeout": "50ms"})
    path = PING.format(w=W1)
    async with run_gateway(cfg, clock=clock) as gw, httpx.AsyncClient() as c:
        responses = [await ping(c, gw, W1, user(1), clock) for _ in range(4)]
        auth = {"Authorization": f"Bearer {token(user(1), clock.now)}"}
        presence = await c.get(f"{gw.url}/_edge/webinars/{W1}/presence", headers=auth)
    if mode == "open":
        # As if there were no edge: every heartbeat reaches the app.
        assert [r.status_code for r in responses] == [200] * 4
        assert all(r.json()["raw_path"] == path for r in responses)
        assert fake_app.hits[path] == 4
    else:
        assert [r.status_code for r in responses] == [503] * 4
        assert responses[0].json()["error"] == "store_unavailable"
        assert fake_app.hits[path] == 0
    outcome = "failed_" + mode
    assert counter(gw, "edge_heartbeats_total", route="presence_ping", outcome=outcome) == 4
    assert counter(gw, "edge_store_fallbacks_total", policy="heartbeat", mode=mode) >= 4
    assert presence.status_code == 503


async def test_route_on_failure_overrides_store(fake_app: FakeApp, clock: FakeClock) -> None:
    cfg = config(
        fake_app.url,
        "redis://127.0.0.1:1/0",
        heartbeat={"on_failure": "closed"},
        store_extra={"on_failure": "open", "timeout": "50ms"},
    )
    async with run_gateway(cfg, clock=clock) as gw, httpx.AsyncClient() as c:
        assert (await ping(c, gw, W1, user(1), clock)).status_code == 503
        # access_track has no override: open.
        r = await c.post(gw.url + TRACK.format(w=W1))
        assert r.json()["raw_path"] == TRACK.format(w=W1)


# --------------------------------------------------------------------------- batch mode


def batch_cfg(upstream: str, store: str) -> GatewayConfig:
    return config(
        upstream,
        store,
        heartbeat={
            "mode": "batch",
            "forward_interval": "300s",
            "flush_interval": "1h",  # the tests flush by hand
            "flush_upstream": "app",
            "flush_url": FLUSH_URL,
            "flush_headers": {"apikey": "service-key", "Authorization": "Bearer service-key"},
        },
    )


def flushes(fake_app: FakeApp) -> list[dict[str, Any]]:
    return [r for r in fake_app.requests if r["path"] == FLUSH_URL]


def payload(req: dict[str, Any]) -> tuple[str, dict[str, str]]:
    body = json.loads(req["body"])["payload"]
    return body["webinar_id"], {v["user_id"]: v["last_seen_at"] for v in body["viewers"]}


def flusher(gw: Running) -> Flusher:
    f: Flusher = gw.app.rt.services[FLUSHERS]["presence_ping"]
    return f


async def test_batch_mode_one_request_per_webinar_per_flush(
    fake_app: FakeApp,
    store_url: str,
    clock: FakeClock,
) -> None:
    cfg = batch_cfg(fake_app.url, store_url)
    async with run_gateway(cfg, clock=clock) as gw, httpx.AsyncClient() as c:
        for _ in range(3):
            for i in range(3):
                await ping(c, gw, W1, user(i), clock)
            for i in range(3, 5):
                await ping(c, gw, W2, user(i), clock)
            # Sample mode would forward again after 300 s; batch mode never does while
            # the viewer keeps pinging within forward_interval.
            clock.advance(200)
        # Only each viewer's first heartbeat reached the app.
        assert fake_app.hits[PING.format(w=W1)] == 3
        assert fake_app.hits[PING.format(w=W2)] == 2
        report = await flusher(gw).flush(force=True)
        assert (report.requests, report.entries, report.failed) == (2, 5, 0)
        sent = dict(payload(r) for r in flushes(fake_app))
        last = time.strftime("%Y-%m-%dT%H:%M:%S.000+00:00", time.gmtime(clock.now - 200))
        assert sent == {
            W1: {user(i): last for i in range(3)},
            W2: {user(i): last for i in range(3, 5)},
        }
        headers = {k.lower(): v for k, v in flushes(fake_app)[0]["headers"]}
        assert headers["apikey"] == "service-key"
        assert headers["authorization"] == "Bearer service-key"
        assert headers["content-type"] == "application/json"
        # Nothing new: nothing sent.
        assert (await flusher(gw).flush(force=True)).requests == 0
        # One viewer pings again: the next flush sends just that change.
        await ping(c, gw, W2, user(4), clock)
        await flusher(gw).flush(force=True)
        assert len(flushes(fake_app)) == 3
        assert payload(flushes(fake_app)[-1]) == (
            W2,
            {user(4): time.strftime("%Y-%m-%dT%H:%M:%S.000+00:00", time.gmtime(clock.now))},
        )
        assert counter(gw, "edge_heartbeat_flush_total", result="ok") == 3
        assert counter(gw, "edge_heartbeat_flush_batch_size_count") == 3
        assert counter(gw, "edge_heartbeat_flush_batch_size_sum") == 6
        assert counter(gw, "edge_heartbeats_total", route="presence_ping", outcome="flushed") == 6


async def test_batch_flush_lock_lets_one_flush_per_interval(
    fake_app: FakeApp,
    store_url: str,
    clock: FakeClock,
) -> None:
    cfg = batch_cfg(fake_app.url, store_url)
    async with run_gateway(cfg, clock=clock) as gw, httpx.AsyncClient() as c:
        await ping(c, gw, W1, user(1), clock)
        assert (await flusher(gw).flush()).requests == 1
        await ping(c, gw, W1, user(2), clock)
        # Another tick within the interval (any replica): the lock is held, no flush.
        assert (await flusher(gw).flush()).skipped
        assert len(flushes(fake_app)) == 1
        # The entry waits; a forced (shutdown) flush sends it.
        assert (await flusher(gw).flush(force=True)).entries == 1


async def test_failed_flush_is_retried_and_nothing_dropped(
    fake_app: FakeApp,
    store_url: str,
    clock: FakeClock,
) -> None:
    cfg = batch_cfg(fake_app.url, store_url)
    async with run_gateway(cfg, clock=clock) as gw, httpx.AsyncClient() as c:
        for i in range(4):
            await ping(c, gw, W1, user(i), clock)
        fake_app.status_override[FLUSH_URL] = (500, {"message": "db down"})
        report = await flusher(gw).flush(force=True)
        assert (report.requests, report.failed, report.entries) == (1, 1, 0)
        # More heartbeats while the target is down; one viewer moves on in time.
        clock.advance(30)
        await ping(c, gw, W1, user(0), clock)
        await ping(c, gw, W1, user(9), clock)
        assert (await flusher(gw).flush(force=True)).failed == 1
        del fake_app.status_override[FLUSH_URL]
        report = await flusher(gw).flush(force=True)
        assert (report.requests, report.failed, report.entries) == (1, 0, 5)
        webinar, viewers = payload(flushes(fake_app)[-1])
        assert webinar == W1
        assert set(viewers) == {user(i) for i in (0, 1, 2, 3, 9)}
        assert viewers[user(0)] == time.strftime(
            "%Y-%m-%dT%H:%M:%S.000+00:00", time.gmtime(clock.now)
        )
        assert counter(gw, "edge_heartbeat_flush_total", result="failed") == 2
        assert (await flusher(gw).flush(force=True)).requests == 0


async def test_batch_flushes_on_shutdown(
    fake_app: FakeApp, store_url: str, clock: FakeClock
) -> None:
    cfg = batch_cfg(fake_app.url, store_url)
    async with run_gateway(cfg, clock=clock) as gw, httpx.AsyncClient() as c:
        for i in range(3):
            await ping(c, gw, W1, user(i), clock)
            await ping(c, gw, W1, user(i), clock)
        assert flushes(fake_app) == []
    # Leaving the block stops the gateway (SIGTERM path: lifespan shutdown).
    assert len(flushes(fake_app)) == 1
    assert set(payload(flushes(fake_app)[0])[1]) == {user(i) for i in range(3)}


async def test_batch_negative_viewer_is_not_flushed(
    fake_app: FakeApp, store_url: str, clock: FakeClock
) -> None:
    cfg = batch_cfg(fake_app.url, store_url)
    fake_app.status_override[PING.format(w=W1)] = (403, {"error": "not_registered"})
    async with run_gateway(cfg, clock=clock) as gw, httpx.AsyncClient() as c:
        assert (await ping(c, gw, W1, user(1), clock)).status_code == 403
        assert (await ping(c, gw, W1, user(1), clock)).status_code == 403
        del fake_app.status_override[PING.format(w=W1)]
        await ping(c, gw, W1, user(2), clock)
        await ping(c, gw, W1, user(2), clock)
        await flusher(gw).flush(force=True)
        assert [payload(r)[1].keys() for r in flushes(fake_app)] == [{user(2)}]


async def test_batch_flush_schedule_runs_in_background(fake_app: FakeApp) -> None:
    """The periodic flush itself (real time, a 50 ms interval)."""
    cfg = config(
        fake_app.url,
        "memory://",
        heartbeat={
            "mode": "batch",
            "flush_interval": "50ms",
            "flush_upstream": "app",
            "flush_url": FLUSH_URL,
        },
    )
    async with run_gateway(cfg) as gw, httpx.AsyncClient() as c:
        now = time.time()
        await c.post(
            gw.url + PING.format(w=W1),
            headers={"Authorization": f"Bearer {token(user(1), now)}"},
        )
        for _ in range(100):
            if flushes(fake_app):
                break
            await asyncio.sleep(0.02)
        assert [payload(r)[1].keys() for r in flushes(fake_app)] == [{user(1)}]


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("heartbeat", "key", "words"),
    [
        ({"mode": "batch"}, "routes[0].heartbeat", "flush_upstream"),
        ({"flush_interval": "0s"}, "routes[0].heartbeat.flush_interval", "greater than 0"),
        ({"negative_statuses": [200]}, "routes[0].heartbeat.negative_statuses", "200"),
        ({"key": ["cookie"]}, "routes[0].heartbeat.key", "unknown key source"),
        ({"mode": "fast"}, "routes[0].heartbeat.mode", ""),
    ],
)
def test_config_errors_name_the_key(heartbeat: dict[str, Any], key: str, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        config("http://127.0.0.1:9", "memory://", heartbeat=heartbeat)
    issues = {i.key: i.message for i in err.value.issues}
    assert key in issues, issues
    assert words in issues[key]


def _batch_process_config(app_url: str, listen: int, admin: int) -> dict[str, Any]:
    """A whole gateway config: one presence route in batch mode that never flushes on
    its own (flush_interval 1h), so only the shutdown flush can deliver."""
    return {
        "server": {
            "listen": f"127.0.0.1:{listen}",
            "admin_listen": f"127.0.0.1:{admin}",
            "access_log": False,
            "drain_timeout": "2s",
        },
        "store": {"url": "memory://"},
        "upstreams": {"app": {"url": app_url}},
        "auth": {"issuer": ISSUER, "audience": "authenticated", "hs256_secret": SECRET},
        "routes": [
            {
                "name": "presence_ping",
                "match": {"methods": ["POST"], "path": "/api/webinars/{webinar_id}/presence/ping"},
                "upstream": "app",
                "auth": "required",
                "heartbeat": {
                    "mode": "batch",
                    "flush_interval": "1h",
                    "flush_upstream": "app",
                    "flush_url": FLUSH_URL,
                },
            }
        ],
    }


async def test_batch_flushes_on_sigterm(fake_app: FakeApp, tmp_path: Any) -> None:
    """The real process: `python -m gateway`, pings, SIGTERM; the flush arrives before
    the process exits."""

    listen, admin = free_port(), free_port()
    doc = _batch_process_config(fake_app.url, listen, admin)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(doc))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        "--config",
        str(path),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        async with httpx.AsyncClient() as c:
            for _ in range(200):
                try:
                    if (await c.get(f"http://127.0.0.1:{admin}/readyz")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.05)
            now = time.time()
            for i in range(3):
                for _ in range(2):
                    r = await c.post(
                        f"http://127.0.0.1:{listen}" + PING.format(w=W1),
                        headers={"Authorization": f"Bearer {token(user(i), now)}"},
                    )
                    assert r.status_code == 200
        assert flushes(fake_app) == []
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert [set(payload(r)[1]) for r in flushes(fake_app)] == [{user(i) for i in range(3)}]


async def test_large_negative_body_is_not_cached(
    fake_app: FakeApp, store_url: str, clock: FakeClock
) -> None:
    cfg = config(fake_app.url, store_url)
    path = PING.format(w=W1)
    fake_app.status_override[path] = (404, {"error": "not_registered", "pad": "x" * 5000})
    async with run_gateway(cfg, clock=clock) as gw, httpx.AsyncClient() as c:
        for _ in range(2):
            r = await ping(c, gw, W1, user(1), clock)
            assert (r.status_code, r.json()["pad"]) == (404, "x" * 5000)
        assert fake_app.hits[path] == 2


async def test_redis_coalesces_one_webinars_concurrent_heartbeats(
    fake_app: FakeApp,
    redis_url: str,
    clock: FakeClock,
) -> None:
    cfg = config(fake_app.url, redis_url)
    path = PING.format(w=W1)
    async with run_gateway(cfg, clock=clock) as gw, httpx.AsyncClient() as c:
        store = gw.app.rt.store
        real_run_many = store.run_many
        calls: list[int] = []

        async def counting_run_many(script: Any, batch: Any) -> Any:
            if script.name == "heartbeat_record":
                calls.extend(len(args[7].split("\n")) for _, args in batch)
            return await real_run_many(script, batch)

        store.run_many = counting_run_many  # type: ignore[method-assign]
        tokens = [token(user(i), clock.now) for i in range(40)]
        for tok in tokens:  # each viewer's first ping, one at a time
            await c.post(gw.url + path, headers={"Authorization": f"Bearer {tok}"})
        assert fake_app.hits[path] == 40
        calls.clear()
        responses = await asyncio.gather(
            *(
                c.post(gw.url + path, headers={"Authorization": f"Bearer {t}"})
                for _ in range(5)
                for t in tokens
            )
        )
        assert all(r.json() == {"success": True} for r in responses)
        assert fake_app.hits[path] == 40
        # Every heartbeat was recorded exactly once, whatever the grouping.
        assert sum(calls) == 200


@contextlib.asynccontextmanager
async def _policy_alone(redis_url: str) -> AsyncIterator[tuple[Runtime, HeartbeatPolicy]]:
    """The heartbeat policy on the real Redis store with nothing behind it (these tests
    drive its Recorder directly; a forward would be a failure)."""
    cfg = config("http://127.0.0.1:9", redis_url)
    rt = Runtime(cfg)
    await rt.store.start()
    try:

        async def unused(ctx: Any, receive: Any, send: Any) -> None:
            raise AssertionError("nothing is forwarded here")

        policy = HeartbeatPolicy(unused, cfg.routes[0], rt)
        assert policy.recorder is not None
        yield rt, policy
    finally:
        await rt.store.close()


async def test_recorder_sends_one_round_trip_for_heartbeats_of_one_turn(redis_url: str) -> None:
    async with _policy_alone(redis_url) as (rt, policy):
        assert policy.recorder is not None
        real_run_many = rt.store.run_many
        # Each store round trip: the heartbeats carried by each of its script calls.
        trips: list[list[int]] = []

        async def counting_run_many(script: Any, calls: Any) -> Any:
            trips.append([len(args[7].split("\n")) for _, args in calls])
            return await real_run_many(script, calls)

        rt.store.run_many = counting_run_many  # type: ignore[method-assign]
        futs = [policy.recorder.submit(W1, f"u:{i % 30}", 0) for i in range(60)]
        futs.append(policy.recorder.submit(W2, "u:0", 0))
        results = await asyncio.gather(*futs)
        # One round trip, one script call per webinar; within a call, arrival order:
        # first sight forwards.
        assert trips == [[60, 1]]
        assert [d for d, _ in results] == [1] * 30 + [0] * 30 + [1]
        # Past MAX_COALESCE a round trip is sent at once and a new batch starts.
        trips.clear()
        big = [policy.recorder.submit(W1, f"u:{i}", 0) for i in range(MAX_COALESCE + 5)]
        await asyncio.gather(*big)
        assert trips == [[MAX_COALESCE], [5]]


async def test_pings_of_one_turn_share_a_script_call_in_memory_too(
    fake_app: FakeApp, clock: FakeClock
) -> None:
    """The memory store coalesces as Redis does: a call's fixed cost (keys, arguments,
    namespace checks, the GC check) was most of a memory-store ping (367k instructions a
    shed ping one call each, 268k coalesced). The pings go to the started app in
    process, so all of them reach the policy in the same loop turn."""
    cfg = config(fake_app.url, "memory://")
    async with run_gateway(cfg, clock=clock) as gw:
        store = gw.app.rt.store
        # Heartbeats carried by each record script call (the memory store's run_many
        # runs each call through run).
        calls: list[int] = []
        real_run = store.run

        async def counting_run(script: Any, keys: Any, args: Any) -> Any:
            if script.name == "heartbeat_record":
                calls.append(len(args[7].split("\n")))
            return await real_run(script, keys, args)

        store.run = counting_run  # type: ignore[method-assign]
        transport = httpx.ASGITransport(app=gw.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://edge") as c:
            sent = [ping(c, gw, W1, user(i % 10), clock) for i in range(40)]
            answers = await asyncio.gather(*sent)
    assert sorted({r.status_code for r in answers}) == [200]
    assert sum(calls) == 40
    assert len(calls) < 40, calls  # one call each before: [1, 1, 1, ...]
    assert fake_app.hits[PING.format(w=W1)] == 10  # each viewer's first ping forwarded


async def test_recorder_fails_only_the_webinar_whose_call_failed(redis_url: str) -> None:
    """A pipelined round trip can answer one webinar's call and fail another's (a slot
    moving mid-failover on a cluster): only that webinar's heartbeats get the error."""
    async with _policy_alone(redis_url) as (rt, policy):
        assert policy.recorder is not None
        real_run_many = rt.store.run_many

        async def second_fails(script: Any, calls: Any) -> Any:
            first = await real_run_many(script, calls[:1])
            return [*first, StoreError("response", "MOVED")]

        rt.store.run_many = second_fails  # type: ignore[method-assign]
        futs = [policy.recorder.submit(w, f"u:{i}", 0) for i in range(3) for w in (W1, W2)]
        results = await asyncio.gather(*futs, return_exceptions=True)
        assert [r[0] for r in results[0::2]] == [1, 1, 1]  # type: ignore[index]
        assert all(isinstance(r, StoreError) and r.kind == "response" for r in results[1::2])


async def test_recorder_refuses_an_answer_that_does_not_match_its_heartbeats(
    redis_url: str,
) -> None:
    """The record script answers one digit per heartbeat sent: an answer with a digit
    missing (or a negative blob for no heartbeat) is a store error for that webinar's
    heartbeats, never a decision handed to the wrong viewer."""
    async with _policy_alone(redis_url) as (rt, policy):
        assert policy.recorder is not None
        real_run_many = rt.store.run_many

        async def one_digit_short(script: Any, calls: Any) -> Any:
            first, second = await real_run_many(script, calls)
            return [first, [second[0], second[1][:-1], *second[2:]]]

        rt.store.run_many = one_digit_short  # type: ignore[method-assign]
        futs = [policy.recorder.submit(w, f"u:{i}", 0) for i in range(3) for w in (W1, W2)]
        results = await asyncio.gather(*futs, return_exceptions=True)
        assert [r[0] for r in results[0::2]] == [1, 1, 1]  # type: ignore[index]
        assert all(isinstance(r, StoreError) and r.kind == "error" for r in results[1::2])
        # A blob with no negative digit for it is refused the same way.
        rt.store.run_many = real_run_many  # type: ignore[method-assign]
        res = [0, b"00", b"1|404|text/plain|x"]
        with pytest.raises(StoreError):
            await policy._decisions(W1, res, 2)
