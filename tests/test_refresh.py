"""Refresh-token coalescing (gateway/policies/refresh.py) through the real gateway on a real
socket, against the fake GoTrue (tests/fakes/gotrue.py), on the memory store and on the
real Redis. Time is injected: grace and lock expiry never wait on the wall clock."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from gateway.config import GatewayConfig
from gateway.policies.refresh.policy import _keys, token_digest
from gateway.store.memory import MemoryStore
from tests.fakes.clock import FakeClock
from tests.fakes.gotrue import FakeGoTrue
from tests.helpers import Running, make_config, run_gateway

TOKEN_PATH = "/auth/v1/token?grant_type=refresh_token"
CLIENT_HEADERS = {
    "apikey": "anon-key",
    "Authorization": "Bearer anon-key",
    "X-Supabase-Api-Version": "2024-01-01",
}


@pytest.fixture
async def gotrue() -> AsyncIterator[FakeGoTrue]:
    fake = FakeGoTrue(latency=0.05)
    await fake.start()
    yield fake
    for ev in fake.holds.values():
        ev.set()
    await fake.stop()


def refresh_config(gotrue_url: str, store_url: str, **refresh: Any) -> GatewayConfig:
    return make_config(
        "http://127.0.0.1:9",
        upstreams={"supabase": {"url": gotrue_url}},
        # Generous: the test machine is shared, and a store call timing out here would
        # (correctly) fall back to an uncoordinated upstream call and change the counts.
        store={"url": store_url, "timeout": "2s"},
        routes=[
            {
                "name": "token_refresh",
                "match": {
                    "methods": ["POST"],
                    "path": "/auth/v1/token",
                    "query": {"grant_type": "refresh_token"},
                },
                "upstream": "supabase",
                "auth": "off",
                "refresh": {"grace": "30s", **refresh},
            },
            {
                "name": "default",
                "match": {"path": "/{path:path}"},
                "upstream": "supabase",
                "auth": "off",
            },
        ],
    )


async def refresh(c: httpx.AsyncClient, gw: Running, token: str) -> httpx.Response:
    return await c.post(gw.url + TOKEN_PATH, json={"refresh_token": token}, headers=CLIENT_HEADERS)


def sample(gw: Running, name: str, **labels: str) -> float:
    value = gw.app.rt.metrics.registry.get_sample_value(name, labels)
    return value or 0.0


async def until(cond: Any, timeout: float = 5.0) -> None:
    """Wait for a condition the gateway reaches on its own (not for a TTL)."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


def client() -> httpx.AsyncClient:
    return httpx.AsyncClient(timeout=10, limits=httpx.Limits(max_connections=200))


async def expire_lock(gw: Running, store_url: str, token: str, clock: FakeClock) -> None:
    """What a dead leader's lock does after lock_ttl: on memory the injected clock moves
    past it; on Redis (whose TTLs run on Redis' own clock) the key goes, as PX would."""
    if store_url.startswith("memory"):
        clock.advance(11)
    else:
        r = aioredis.from_url(store_url)
        await r.delete(gw.app.rt.store.k(_keys(token_digest(token)).lock))
        await r.aclose()


# ---------------------------------------------------------------------------- coalescing


async def test_50_concurrent_refreshes_make_one_upstream_call(
    store_url: str, gotrue: FakeGoTrue
) -> None:
    rt0 = gotrue.sign_in()["refresh_token"]
    async with run_gateway(refresh_config(gotrue.url, store_url)) as gw, client() as c:
        resps = await asyncio.gather(*(refresh(c, gw, rt0) for _ in range(50)))
        assert gotrue.calls == 1
        assert {r.status_code for r in resps} == {200}
        assert len({r.content for r in resps}) == 1
        body = resps[0].json()
        assert body["refresh_token"] != rt0
        assert body["access_token"]
        hows = Counter(r.headers["x-edge-refresh"] for r in resps)
        assert hows == {"leader": 1, "follower": 49}
        # Each client still gets its own request id.
        assert len({r.headers["x-request-id"] for r in resps}) == 50
        assert sample(gw, "edge_refresh_total", outcome="leader") == 1
        assert sample(gw, "edge_refresh_total", outcome="follower") == 49
        assert sample(gw, "edge_refresh_upstream_duration_seconds_count") == 1


async def test_two_replicas_sharing_the_store_make_one_upstream_call(
    store_url: str, gotrue: FakeGoTrue
) -> None:
    rt0 = gotrue.sign_in()["refresh_token"]
    cfg = refresh_config(gotrue.url, store_url)
    # Two replicas: on Redis each has its own RedisStore on the same Redis; the memory
    # backend stands in for a shared store by handing both runtimes one MemoryStore.
    kw: dict[str, Any] = {"store": MemoryStore()} if store_url.startswith("memory") else {}
    async with run_gateway(cfg, **kw) as a, run_gateway(cfg, **kw) as b, client() as c:
        assert a.app.rt.store is not b.app.rt.store or kw
        resps = await asyncio.gather(
            *(refresh(c, a, rt0) for _ in range(25)), *(refresh(c, b, rt0) for _ in range(25))
        )
        assert gotrue.calls == 1
        assert {r.status_code for r in resps} == {200}
        assert len({r.content for r in resps}) == 1
        hows = Counter(r.headers["x-edge-refresh"] for r in resps)
        assert hows["leader"] == 1
        assert hows["follower"] + hows["replay"] == 49


async def test_replay_within_grace_then_upstream_after_it(
    store_url: str, gotrue: FakeGoTrue
) -> None:
    rt0 = gotrue.sign_in()["refresh_token"]
    clock = FakeClock(time.time())
    async with (
        run_gateway(refresh_config(gotrue.url, store_url), clock=clock) as gw,
        client() as c,
    ):
        first = await refresh(c, gw, rt0)
        assert first.headers["x-edge-refresh"] == "leader"
        clock.advance(29)
        again = await refresh(c, gw, rt0)
        assert again.status_code == 200
        assert again.headers["x-edge-refresh"] == "replay"
        assert again.content == first.content
        assert gotrue.calls == 1
        clock.advance(2)  # 31 s: past grace
        late = await refresh(c, gw, rt0)
        assert late.headers["x-edge-refresh"] == "leader"
        assert gotrue.calls == 2
        assert sample(gw, "edge_refresh_total", outcome="replay") == 1


async def test_replay_never_outlives_the_new_access_token(
    store_url: str, gotrue: FakeGoTrue
) -> None:
    gotrue.expires_in = 10
    rt0 = gotrue.sign_in()["refresh_token"]
    clock = FakeClock(time.time())
    async with (
        run_gateway(refresh_config(gotrue.url, store_url), clock=clock) as gw,
        client() as c,
    ):
        await refresh(c, gw, rt0)
        clock.advance(11)  # within grace (30 s), past the access token's expires_at
        late = await refresh(c, gw, rt0)
        assert late.headers["x-edge-refresh"] == "leader"
        assert gotrue.calls == 2


async def test_different_tokens_are_not_merged(store_url: str, gotrue: FakeGoTrue) -> None:
    t1 = gotrue.sign_in("a@example.com")["refresh_token"]
    t2 = gotrue.sign_in("b@example.com")["refresh_token"]
    async with run_gateway(refresh_config(gotrue.url, store_url)) as gw, client() as c:
        resps = await asyncio.gather(
            *(refresh(c, gw, t1) for _ in range(10)), *(refresh(c, gw, t2) for _ in range(10))
        )
        assert gotrue.calls == 2
        a = {r.content for r in resps[:10]}
        b = {r.content for r in resps[10:]}
        assert len(a) == 1 and len(b) == 1 and a != b
        assert json.loads(a.pop())["user"]["email"] == "a@example.com"
        assert json.loads(b.pop())["user"]["email"] == "b@example.com"


async def test_errors_pass_through_unchanged_and_are_not_cached(
    store_url: str, gotrue: FakeGoTrue
) -> None:
    rt0 = gotrue.sign_in()["refresh_token"]
    async with run_gateway(refresh_config(gotrue.url, store_url)) as gw, client() as c:
        unknown = await refresh(c, gw, "not-a-token-gotrue-knows")
        assert unknown.status_code == 400
        assert unknown.json() == {
            "code": "refresh_token_not_found",
            "message": "Invalid Refresh Token: Refresh Token Not Found",
        }
        assert unknown.headers["x-sb-error-code"] == "refresh_token_not_found"
        assert unknown.headers["x-edge-refresh"] == "leader"
        again = await refresh(c, gw, "not-a-token-gotrue-knows")
        assert again.status_code == 400
        assert gotrue.calls == 2

        gotrue.inject[3] = (500, {"code": "unexpected_failure", "message": "db down"})
        failed = await refresh(c, gw, rt0)
        assert failed.status_code == 500
        assert failed.json()["code"] == "unexpected_failure"
        ok = await refresh(c, gw, rt0)
        assert ok.status_code == 200
        assert ok.headers["x-edge-refresh"] == "leader"
        assert gotrue.calls == 4
        assert sample(gw, "edge_refresh_total", outcome="upstream_error") == 3


async def test_reuse_refusal_for_a_cached_token_is_answered_from_the_cache(
    store_url: str, gotrue: FakeGoTrue
) -> None:
    """Replica A leads and is slow; its lock lapses and replica B takes over; A's answer
    lands in the cache; GoTrue answers B's duplicate with 409 → B serves A's answer."""
    rt0 = gotrue.sign_in()["refresh_token"]
    clock = FakeClock(time.time())
    cfg = refresh_config(gotrue.url, store_url)
    kw: dict[str, Any] = {"clock": clock}
    if store_url.startswith("memory"):
        kw["store"] = MemoryStore(clock=clock)
    gotrue.holds = {1: asyncio.Event(), 2: asyncio.Event()}
    gotrue.inject[2] = (409, {"code": "conflict", "message": "Too many concurrent ..."})
    async with run_gateway(cfg, **kw) as a, run_gateway(cfg, **kw) as b, client() as c:
        ta = asyncio.ensure_future(refresh(c, a, rt0))
        await until(lambda: gotrue.calls == 1)
        tb = asyncio.ensure_future(refresh(c, b, rt0))
        await until(lambda: sample(b, "edge_refresh_waiting") == 1)
        await expire_lock(a, store_url, rt0, clock)
        await until(lambda: gotrue.calls == 2)
        assert sample(b, "edge_refresh_takeovers_total") == 1
        gotrue.holds[1].set()
        ra = await ta
        assert ra.status_code == 200 and ra.headers["x-edge-refresh"] == "leader"
        gotrue.holds[2].set()
        rb = await tb
        assert rb.status_code == 200
        assert rb.headers["x-edge-refresh"] == "replay"
        assert rb.content == ra.content


async def test_follower_takes_over_when_the_leader_dies(store_url: str, gotrue: FakeGoTrue) -> None:
    rt0 = gotrue.sign_in()["refresh_token"]
    clock = FakeClock(time.time())
    async with (
        run_gateway(refresh_config(gotrue.url, store_url, lock_ttl="10s"), clock=clock) as gw,
        client() as c,
    ):
        # Another replica took the lock and died without answering.
        lock = _keys(token_digest(rt0)).lock
        assert await gw.app.rt.store.set(lock, b"dead-replica", ttl=10, nx=True)
        task = asyncio.ensure_future(refresh(c, gw, rt0))
        await until(lambda: sample(gw, "edge_refresh_waiting") == 1)
        assert gotrue.calls == 0
        await expire_lock(gw, store_url, rt0, clock)
        resp = await task
        assert resp.status_code == 200
        assert resp.headers["x-edge-refresh"] == "leader"
        assert gotrue.calls == 1
        assert sample(gw, "edge_refresh_takeovers_total") == 1
        assert await gw.app.rt.store.get(lock) is None  # released after the answer


async def test_follower_times_out_with_504_when_the_leader_never_answers(
    store_url: str, gotrue: FakeGoTrue
) -> None:
    rt0 = gotrue.sign_in()["refresh_token"]
    cfg = refresh_config(gotrue.url, store_url, wait_timeout="200ms", lock_ttl="60s")
    async with run_gateway(cfg) as gw, client() as c:
        lock = _keys(token_digest(rt0)).lock
        await gw.app.rt.store.set(lock, b"slow-replica", ttl=60, nx=True)
        resp = await refresh(c, gw, rt0)
        assert resp.status_code == 504
        assert resp.json()["error"] == "upstream_timeout"
        assert "x-edge-refresh" not in resp.headers
        assert gotrue.calls == 0


async def test_the_flight_survives_its_leaders_client_leaving(gotrue: FakeGoTrue) -> None:
    rt0 = gotrue.sign_in()["refresh_token"]
    gotrue.holds = {1: asyncio.Event()}
    async with run_gateway(refresh_config(gotrue.url, "memory://")) as gw, client() as c:
        async with client() as leaver:
            first = asyncio.ensure_future(refresh(leaver, gw, rt0))
            await until(lambda: gotrue.calls == 1)
            second = asyncio.ensure_future(refresh(c, gw, rt0))
            await until(lambda: sample(gw, "edge_requests_in_flight") == 2)
            first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        gotrue.holds[1].set()
        resp = await second
        assert resp.status_code == 200
        assert resp.headers["x-edge-refresh"] == "follower"
        assert gotrue.calls == 1


async def test_upstream_request_is_the_proxys(gotrue: FakeGoTrue) -> None:
    rt0 = gotrue.sign_in()["refresh_token"]
    async with run_gateway(refresh_config(gotrue.url, "memory://")) as gw, client() as c:
        resp = await c.post(
            gw.url + TOKEN_PATH,
            json={"refresh_token": rt0},
            headers={**CLIENT_HEADERS, "X-Edge-User-Id": "forged", "X-Request-Id": "rid-1"},
        )
        assert resp.status_code == 200
    (seen,) = gotrue.seen_headers
    assert "x-edge-user-id" not in seen
    assert seen["apikey"] == "anon-key"
    assert seen["x-supabase-api-version"] == "2024-01-01"
    assert seen["x-forwarded-for"] == "127.0.0.1"
    assert seen["x-request-id"] == "rid-1"


# ---------------------------------------------------------------------------- security


async def test_redis_holds_no_token_in_plaintext(redis_url: str, gotrue: FakeGoTrue) -> None:
    rt0 = gotrue.sign_in()["refresh_token"]
    async with run_gateway(refresh_config(gotrue.url, redis_url)) as gw, client() as c:
        resps = await asyncio.gather(*(refresh(c, gw, rt0) for _ in range(5)))
        body = resps[0].json()
    secrets_ = [rt0.encode(), body["refresh_token"].encode(), body["access_token"].encode()]
    # The JWT's parts are what a partial leak would show.
    secrets_ += [part.encode() for part in body["access_token"].split(".")[1:]]
    r = aioredis.from_url(redis_url)
    try:
        keys = [k async for k in r.scan_iter(match="*")]
        assert keys, "the refresh left nothing in Redis"
        assert any(b":res" in k for k in keys)
        for k in keys:
            for s in secrets_:
                assert s not in k
            if await r.type(k) == b"string":
                value = await r.get(k)
                assert value is not None
                for s in secrets_:
                    assert s not in value
                assert b"refresh_token" not in value and b"access_token" not in value
    finally:
        await r.aclose()


# ---------------------------------------------------------------------------- requests


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[1, 2]",
        b"{}",
        b'{"refresh_token": 42}',
        b'{"refresh_token": ""}',
        b'{"refresh_token": "\xff"}',
    ],
)
async def test_malformed_body_gets_400_json_from_the_gateway(
    body: bytes, gotrue: FakeGoTrue
) -> None:
    async with run_gateway(refresh_config(gotrue.url, "memory://")) as gw, client() as c:
        resp = await c.post(
            gw.url + TOKEN_PATH,
            content=body,
            headers={**CLIENT_HEADERS, "content-type": "application/json"},
        )
        assert resp.status_code == 400
        assert resp.json()["error"] == "invalid_request"
        assert gotrue.calls == 0
        big = await c.post(gw.url + TOKEN_PATH, content=b"x" * 100_000)
        assert big.status_code == 413
        assert big.json()["error"] == "payload_too_large"


async def test_other_grant_types_pass_through_untouched(gotrue: FakeGoTrue) -> None:
    async with run_gateway(refresh_config(gotrue.url, "memory://")) as gw, client() as c:
        resp = await c.post(
            gw.url + "/auth/v1/token?grant_type=password",
            json={"email": "x@example.com", "password": "pw"},
        )
        assert resp.status_code == 200
        assert "x-edge-refresh" not in resp.headers
        assert resp.json()["user"]["email"] == "x@example.com"
        assert gotrue.calls == 0


async def test_store_down_follows_on_failure(gotrue: FakeGoTrue) -> None:
    rt0 = gotrue.sign_in()["refresh_token"]
    dead = "redis://127.0.0.1:1/0"
    async with run_gateway(refresh_config(gotrue.url, dead)) as gw, client() as c:
        # local (default): served, still coalesced in this process.
        resps = await asyncio.gather(*(refresh(c, gw, rt0) for _ in range(5)))
        assert {r.status_code for r in resps} == {200}
        assert gotrue.calls == 1
        assert sample(gw, "edge_store_fallbacks_total", policy="refresh", mode="local") >= 1
        # ...and replayed by this process afterwards (the parent token's answer is
        # kept here, sealed), instead of a second use GoTrue would refuse.
        again = await refresh(c, gw, rt0)
        assert again.status_code == 200
        assert again.headers["x-edge-refresh"] == "replay"
        assert again.json() == resps[0].json()
        assert gotrue.calls == 1
    cfg = refresh_config(gotrue.url, dead, on_failure="open")
    async with run_gateway(cfg) as gw, client() as c:
        resps = await asyncio.gather(*(refresh(c, gw, rt0) for _ in range(5)))
        assert gotrue.calls == 2  # open: coalesced too, but no replay (GoTrue decides)
        assert sample(gw, "edge_store_fallbacks_total", policy="refresh", mode="open") >= 1
    cfg = refresh_config(gotrue.url, dead, on_failure="closed")
    async with run_gateway(cfg) as gw, client() as c:
        resp = await refresh(c, gw, rt0)
        assert resp.status_code == 503
        assert resp.json()["error"] == "store_unavailable"
        assert gotrue.calls == 2
