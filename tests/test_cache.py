"""Cache policy through real sockets: gateway (run_gateway) → fake stats app, with the
memory store and the real Redis. Time moves by an injected clock, never by sleeping.

Callers sign in with real access tokens (tests/fakes/identity.py) that the route's auth
policy (`auth: optional`) verifies; the stats app decides from the identity headers."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from tests.fakes.clock import FIXED_NOW, FakeClock
from tests.fakes.identity import AUTH, bearer
from tests.fakes.stats_app import StatsApp
from tests.helpers import make_config, run_gateway

PATH = "/api/webinars/w1/stats/access"


def cache_config(upstream: str, store_url: str, **cache: Any) -> Any:
    return make_config(
        upstream,
        # A generous store timeout: these tests are about the cache, not a busy CI box.
        store={"url": store_url, "timeout": "1s"},
        auth=AUTH,
        routes=[
            {
                "name": "admin_stats",
                "match": {"methods": ["GET"], "path": "/api/webinars/{webinar_id}/stats/access"},
                "upstream": "app",
                "auth": "optional",
                "cache": {"ttl": "10s", **cache},
            }
        ],
    )


def as_user(user: str, role: str = "") -> dict[str, str]:
    return bearer(user, role)


async def get(
    client: httpx.AsyncClient, base: str, user: str | None = None, path: str = PATH, **kw: Any
) -> httpx.Response:
    headers = as_user(user) if user else {}
    headers.update(kw.pop("headers", {}))
    return await client.get(base + path, headers=headers, **kw)


def cs(resp: httpx.Response) -> str:
    return resp.headers.get("cache-status", "")


async def all_in_flight(gw: Any, n: int) -> None:
    """Wait until n requests are inside the gateway's handlers. On a public route nothing
    awaits between entering the cache policy and joining the in-process flight, so then
    every one of them is waiting on the same upstream call."""
    registry = gw.app.rt.metrics.registry
    for _ in range(500):
        if registry.get_sample_value("edge_requests_in_flight") == n:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{n} requests never were in flight together")


def metric(gw: Any, result: str) -> float:
    v = gw.app.rt.metrics.registry.get_sample_value(
        "edge_cache_results_total", {"route": "admin_stats", "result": result}
    )
    return v or 0.0


# --------------------------------------------------------------------------- basics


async def test_cache_status_and_age(stats: StatsApp, store_url: str) -> None:
    clock = FakeClock(FIXED_NOW)
    async with run_gateway(cache_config(stats.url, store_url), clock=clock) as gw:
        async with httpx.AsyncClient() as c:
            # A conditional, compressed request still fills the entry with the whole,
            # unencoded body: those headers do not reach the app on a fill.
            r1 = await get(
                c, gw.url, "alice", headers={"If-None-Match": '"x"', "Accept-Encoding": "gzip"}
            )
            assert r1.status_code == 200
            assert cs(r1) == "edge; fwd=miss; fwd-status=200; stored"
            assert "If-None-Match" not in stats.last_headers
            assert "Accept-Encoding" not in stats.last_headers
            assert r1.headers["age"] == "0"
            clock.advance(3)
            r2 = await get(c, gw.url, "alice")
            assert r2.status_code == 200
            assert cs(r2) == "edge; hit; ttl=7"
            assert r2.headers["age"] == "3"
            assert r2.json() == r1.json()
            assert r2.headers["content-type"].startswith("application/json")
            assert r2.headers["x-request-id"]
            assert stats.calls == 1
            # HEAD is served from the same entry, without a body.
            r3 = await c.head(gw.url + PATH, headers=as_user("alice"))
            assert r3.status_code == 200
            assert r3.content == b""
            assert r3.headers["content-length"] == str(len(r1.content))
            assert cs(r3) == "edge; hit; ttl=7"
            assert stats.calls == 1
        assert metric(gw, "hit") == 2
        assert metric(gw, "miss") == 1
        async with httpx.AsyncClient() as c:
            text = (await c.get(gw.admin_url + "/metrics")).text
        assert 'edge_cache_results_total{result="hit",route="admin_stats"} 2.0' in text
        assert "edge_cache_refresh_duration_seconds_count" in text


async def test_head_on_empty_cache_fills_it(stats: StatsApp, store_url: str) -> None:
    async with run_gateway(cache_config(stats.url, store_url), clock=FakeClock(FIXED_NOW)) as gw:
        async with httpx.AsyncClient() as c:
            r1 = await c.head(gw.url + PATH, headers=as_user("alice"))
            assert r1.status_code == 200
            assert r1.content == b""
            assert "stored" in cs(r1)
            r2 = await get(c, gw.url, "alice")
            assert r2.json()["viewers"] == 42
            assert cs(r2) == "edge; hit; ttl=10"
            assert stats.calls == 1


async def test_key_is_route_params_and_listed_query(stats: StatsApp, store_url: str) -> None:
    cfg = cache_config(stats.url, store_url, vary_query=["range"])
    async with run_gateway(cfg, clock=FakeClock(FIXED_NOW)) as gw:
        async with httpx.AsyncClient() as c:
            a = await get(c, gw.url, "alice", PATH + "?range=1h&_=1")
            # An unlisted query parameter (a cache-buster) does not split the key.
            b = await get(c, gw.url, "alice", PATH + "?_=2&range=1h")
            assert cs(b).startswith("edge; hit")
            assert b.json() == a.json()
            assert stats.calls == 1
            # A listed one does; so does a path parameter.
            d = await get(c, gw.url, "alice", PATH + "?range=24h")
            assert "stored" in cs(d)
            assert d.json()["range"] == "24h"
            e = await get(c, gw.url, "alice", "/api/webinars/w2/stats/access?range=1h")
            assert "stored" in cs(e)
            assert e.json()["webinar_id"] == "w2"
            assert stats.calls == 3


async def test_vary_claims_split_the_key(stats: StatsApp, store_url: str) -> None:
    cfg = cache_config(stats.url, store_url, vary_claims=["app_metadata.role"])
    async with run_gateway(cfg, clock=FakeClock(FIXED_NOW)) as gw:
        async with httpx.AsyncClient() as c:
            h = as_user("alice", "host")
            await c.get(gw.url + PATH, headers=h)
            assert cs(await c.get(gw.url + PATH, headers=h)).startswith("edge; hit")
            h2 = as_user("alice", "admin")
            assert "stored" in cs(await c.get(gw.url + PATH, headers=h2))
            assert stats.calls == 2


# --------------------------------------------------------------------------- authorization


async def test_non_admin_never_gets_the_cached_body(stats: StatsApp, store_url: str) -> None:
    clock = FakeClock(FIXED_NOW)
    async with run_gateway(cache_config(stats.url, store_url, deny_ttl="30s"), clock=clock) as gw:
        async with httpx.AsyncClient() as c:
            filled = await get(c, gw.url, "alice")
            assert filled.status_code == 200
            # Right after an admin filled the entry, a viewer asks for it: the app is asked
            # (its own answer is 403) and the viewer gets exactly that.
            r = await get(c, gw.url, "mallory")
            assert r.status_code == 403
            assert "viewers" not in r.text
            assert cs(r) == "edge; fwd=request; fwd-status=403"
            assert stats.calls_by_user["mallory"] == 1
            # Remembered as denied: the denial is replayed, the app is not asked again.
            for _ in range(3):
                r = await get(c, gw.url, "mallory")
                assert r.status_code == 403
                assert r.json() == {"error": "forbidden", "message": "admins only"}
                assert cs(r) == "edge; hit; detail=denied"
            assert stats.calls_by_user["mallory"] == 1
            # Meanwhile the admin still gets hits.
            assert cs(await get(c, gw.url, "alice")).startswith("edge; hit; ttl=")
            # After deny_ttl the viewer's request reaches the app again, and still never
            # gets the stored body.
            clock.advance(31)
            r = await get(c, gw.url, "mallory")
            assert r.status_code == 403
            assert "viewers" not in r.text
            assert stats.calls_by_user["mallory"] == 2
            # An anonymous caller is never served from the cache either.
            anon = await get(c, gw.url)
            assert anon.status_code == 401
            assert cs(anon) == "edge; fwd=bypass; detail=anonymous"
        assert metric(gw, "denied") == 5
        assert metric(gw, "bypass") == 1


async def test_each_admin_is_checked_once_then_served_hits(stats: StatsApp, store_url: str) -> None:
    clock = FakeClock(FIXED_NOW)
    async with run_gateway(cache_config(stats.url, store_url, authz_ttl="60s"), clock=clock) as gw:
        async with httpx.AsyncClient() as c:
            await get(c, gw.url, "alice")
            # bob was never seen: his own request reaches the app even though the entry is
            # fresh (fwd=request), and it refreshes the entry.
            b1 = await get(c, gw.url, "bob")
            assert cs(b1) == "edge; fwd=request; fwd-status=200; stored"
            b2 = await get(c, gw.url, "bob")
            assert cs(b2).startswith("edge; hit")
            assert stats.calls_by_user == {"alice": 1, "bob": 1}
            # A revoked admin: after authz_ttl his request reaches the app again and the
            # app's 403 wins over the cached body.
            clock.advance(61)
            stats.admins.discard("bob")
            b3 = await get(c, gw.url, "bob")
            assert b3.status_code == 403
            assert "viewers" not in b3.text


async def test_authorize_by_claim(stats: StatsApp, store_url: str) -> None:
    cfg = cache_config(
        stats.url, store_url, authorize={"claim": "app_metadata.role", "in": ["admin"]}
    )
    async with run_gateway(cfg, clock=FakeClock(FIXED_NOW)) as gw:
        async with httpx.AsyncClient() as c:
            r1 = await c.get(gw.url + PATH, headers=as_user("u1", "admin"))
            assert "stored" in cs(r1)
            # Another admin by claim, never seen before: served from the cache directly.
            r2 = await c.get(gw.url + PATH, headers=as_user("u2", "admin"))
            assert cs(r2).startswith("edge; hit")
            assert r2.json() == r1.json()
            assert stats.calls == 1
            # A viewer by claim: forwarded, gets the app's own answer, never the entry.
            r3 = await c.get(gw.url + PATH, headers=as_user("v1", "viewer"))
            assert r3.status_code == 403
            assert cs(r3) == "edge; fwd=request; fwd-status=403"
            r4 = await c.get(gw.url + PATH, headers=as_user("v1", "viewer"))
            assert r4.status_code == 403
            assert cs(r4) == "edge; hit; detail=denied"
            # A claim outside `in` whom the app does answer (role host) gets the app's own
            # answer each time, and it is not stored.
            r5 = await c.get(gw.url + PATH, headers=as_user("h1", "host"))
            assert r5.status_code == 200
            assert cs(r5) == "edge; fwd=request; fwd-status=200"
            assert stats.calls == 3


async def test_public_route_serves_anonymous_callers(stats: StatsApp, store_url: str) -> None:
    stats.allow_anonymous = True
    async with run_gateway(
        cache_config(stats.url, store_url, public=True), clock=FakeClock(FIXED_NOW)
    ) as gw:
        async with httpx.AsyncClient() as c:
            r1 = await get(c, gw.url)
            assert "stored" in cs(r1)
            r2 = await get(c, gw.url)
            assert cs(r2) == "edge; hit; ttl=10"
            assert stats.calls == 1


# --------------------------------------------------------------------------- single flight


async def test_200_concurrent_requests_cost_one_upstream_call(
    stats: StatsApp, store_url: str
) -> None:
    stats.allow_anonymous = True
    stats.gate = asyncio.Event()
    async with run_gateway(
        cache_config(stats.url, store_url, public=True), clock=FakeClock(FIXED_NOW)
    ) as gw:
        limits = httpx.Limits(max_connections=250, max_keepalive_connections=250)
        async with httpx.AsyncClient(limits=limits, timeout=30) as c:
            tasks = [asyncio.ensure_future(get(c, gw.url)) for _ in range(200)]
            await asyncio.wait_for(stats.entered.wait(), 10)
            # Let the other requests reach the gateway and queue behind the first one.
            for _ in range(200):
                if gw.app.rt.metrics.in_flight._value.get() >= 200:
                    break
                await asyncio.sleep(0.01)
            stats.gate.set()
            responses = await asyncio.gather(*tasks)
    assert stats.calls == 1
    assert all(r.status_code == 200 for r in responses)
    assert len({r.content for r in responses}) == 1
    statuses = [cs(r) for r in responses]
    assert statuses.count("edge; fwd=miss; fwd-status=200; stored") == 1
    assert all(s.startswith("edge; hit") or "stored" in s for s in statuses)


async def test_stale_while_revalidate(stats: StatsApp, store_url: str) -> None:
    clock = FakeClock(FIXED_NOW)
    cfg = cache_config(stats.url, store_url, stale_while_revalidate="20s")
    async with run_gateway(cfg, clock=clock) as gw:
        async with httpx.AsyncClient(timeout=10) as c:
            await get(c, gw.url, "alice")
            first = (await get(c, gw.url, "bob")).json()
            assert stats.calls == 2
            clock.advance(12)
            stats.gate = asyncio.Event()
            stats.entered.clear()
            # alice finds the entry stale, takes the lock and refreshes (held at the app) ...
            leader = asyncio.ensure_future(get(c, gw.url, "alice"))
            await asyncio.wait_for(stats.entered.wait(), 5)
            # ... while bob is answered at once with the stale copy.
            r = await get(c, gw.url, "bob")
            assert r.status_code == 200
            assert r.json() == first
            assert cs(r) == "edge; hit; ttl=-2"
            assert r.headers["age"] == "12"
            stats.gate.set()
            fresh = await leader
            assert cs(fresh) == "edge; fwd=stale; fwd-status=200; stored"
            assert fresh.json()["version"] > first["version"]
            after = await get(c, gw.url, "bob")
            assert cs(after) == "edge; hit; ttl=10"
            assert after.json() == fresh.json()
            assert stats.calls == 3
            # Past stale_while_revalidate the stale copy is not served: the caller waits
            # for the refresh.
            clock.advance(35)
            late = await get(c, gw.url, "bob")
            assert cs(late) == "edge; fwd=miss; fwd-status=200; stored"
            assert late.json()["version"] > fresh.json()["version"]
        assert metric(gw, "stale") == 1


async def test_stale_if_error(stats: StatsApp, store_url: str) -> None:
    clock = FakeClock(FIXED_NOW)
    cfg = cache_config(stats.url, store_url, stale_if_error="5m")
    async with run_gateway(cfg, clock=clock) as gw:
        async with httpx.AsyncClient(timeout=10) as c:
            good = (await get(c, gw.url, "alice")).json()
            clock.advance(15)
            for status in (500, 503):
                stats.fail_status = status
                r = await get(c, gw.url, "alice")
                assert r.status_code == 200
                assert r.json() == good
                assert cs(r) == (
                    f"edge; fwd=stale; fwd-status={status}; ttl=-5; detail=stale-if-error"
                )
                assert r.headers["age"] == "15"
            # The app is down altogether: the proxy's own 502 counts as a failure too.
            await stats.stop()
            r = await get(c, gw.url, "alice")
            assert r.status_code == 200
            assert r.json() == good
            assert "fwd-status=502" in cs(r)
            assert "detail=stale-if-error" in cs(r)
            # Past stale_if_error the failure shows.
            clock.advance(300)
            r = await get(c, gw.url, "alice")
            assert r.status_code == 502
            assert r.json()["error"] in {"upstream_unavailable", "bad_gateway"}
            assert cs(r) == "edge; fwd=miss; fwd-status=502"
        assert metric(gw, "stale") == 3


# --------------------------------------------------------------------------- what is stored


@pytest.mark.parametrize("cache_control", ["no-store", "private, max-age=60"])
async def test_no_store_and_private_are_honoured(
    stats: StatsApp, store_url: str, cache_control: str
) -> None:
    stats.extra_headers = {"Cache-Control": cache_control}
    async with run_gateway(cache_config(stats.url, store_url), clock=FakeClock(FIXED_NOW)) as gw:
        async with httpx.AsyncClient() as c:
            for _ in range(3):
                r = await get(c, gw.url, "alice")
                assert r.status_code == 200
                assert cs(r) == "edge; fwd=miss; fwd-status=200"
                assert r.headers["cache-control"] == cache_control
            assert stats.calls == 3


async def test_set_cookie_responses_are_not_stored(stats: StatsApp, store_url: str) -> None:
    stats.extra_headers = {"Set-Cookie": "sid=secret; HttpOnly"}
    async with run_gateway(cache_config(stats.url, store_url), clock=FakeClock(FIXED_NOW)) as gw:
        async with httpx.AsyncClient() as c:
            r1 = await get(c, gw.url, "alice")
            assert r1.headers["set-cookie"].startswith("sid=secret")
            assert "stored" not in cs(r1)
            # Nothing was stored, so bob's request is not served alice's cookie.
            stats.extra_headers = {}
            r2 = await get(c, gw.url, "bob")
            assert "set-cookie" not in r2.headers
            assert stats.calls == 2


async def test_large_body_streams_through_and_is_not_stored(
    stats: StatsApp, store_url: str
) -> None:
    stats.body_padding = 5000
    cfg = cache_config(stats.url, store_url, max_body_bytes=1000)
    async with run_gateway(cfg, clock=FakeClock(FIXED_NOW)) as gw:
        async with httpx.AsyncClient() as c:
            r1 = await get(c, gw.url, "alice")
            assert r1.status_code == 200
            assert len(r1.json()["pad"]) == 5000
            assert cs(r1) == "edge; fwd=miss; fwd-status=200; detail=too-large"
            r2 = await get(c, gw.url, "alice")
            assert len(r2.json()["pad"]) == 5000
            assert stats.calls == 2


# --------------------------------------------------------------------------- store failure


@pytest.mark.parametrize("mode", ["open", "closed"])
async def test_store_down(stats: StatsApp, mode: str) -> None:
    cfg = cache_config(stats.url, "redis://127.0.0.1:1/0", on_failure=mode)
    async with run_gateway(cfg, clock=FakeClock(FIXED_NOW)) as gw:
        async with httpx.AsyncClient() as c:
            r = await get(c, gw.url, "alice")
            assert cs(r) == "edge; fwd=bypass; detail=store-unavailable"
            if mode == "open":
                assert r.status_code == 200
                assert r.json()["viewers"] == 42
                # Without the store every request is the app's own answer to that caller.
                r2 = await get(c, gw.url, "mallory")
                assert r2.status_code == 403
                assert stats.calls == 2
            else:
                assert r.status_code == 503
                assert r.json()["error"] == "store_unavailable"
                assert stats.calls == 0
        fallbacks = gw.app.rt.metrics.registry.get_sample_value(
            "edge_store_fallbacks_total", {"policy": "cache", "mode": mode}
        )
        assert fallbacks and fallbacks >= 1
        assert metric(gw, "error") >= 1


async def test_nothing_in_the_store_names_the_user(stats: StatsApp, redis_url: str) -> None:
    import redis.asyncio as aioredis

    stats.admins.add("alice-user-id")
    async with run_gateway(cache_config(stats.url, redis_url), clock=FakeClock(FIXED_NOW)) as gw:
        async with httpx.AsyncClient() as c:
            await get(c, gw.url, "alice-user-id")
            await get(c, gw.url, "mallory")
    client = aioredis.from_url(redis_url)
    try:
        keys = [k async for k in client.scan_iter("edge:cache:*")]
        assert len(keys) == 3  # entry, alice's allow record, mallory's deny record
        for k in keys:
            assert b"alice" not in k and b"mallory" not in k
            value = await client.get(k)
            assert value is not None
            assert b"alice-user-id" not in value and b"mallory" not in value
            assert k.startswith(b"edge:cache:{admin_stats:")
    finally:
        await client.aclose()


# --------------------------------------------------------------------------- replicas


async def test_five_admins_on_two_replicas_cost_one_call_per_ttl(
    stats: StatsApp, redis_url: str
) -> None:
    """5 admin dashboards poll every 5 s for 60 s, spread over 2 replicas sharing Redis:
    the app sees each admin once (their own authorization) plus one refresh per TTL."""
    clock = FakeClock(FIXED_NOW)
    cfg = cache_config(stats.url, redis_url, ttl="10s")
    admins = ["alice", "bob", "carol", "dave", "erin"]
    duration, interval, ttl = 60, 5, 10
    async with (
        run_gateway(cfg, clock=clock) as gw1,
        run_gateway(cfg, clock=clock) as gw2,
        httpx.AsyncClient(timeout=10) as c,
    ):
        replicas = [gw1.url, gw2.url]
        seen: list[str] = []
        for tick in range(duration // interval):
            responses = await asyncio.gather(
                *(get(c, replicas[(i + tick) % 2], admin) for i, admin in enumerate(admins))
            )
            for r in responses:
                assert r.status_code == 200
                assert r.json()["viewers"] == 42
                seen.append(cs(r))
            clock.advance(interval)
        errors = [metric(gw1, "error"), metric(gw2, "error")]
    periods = duration // ttl
    assert stats.calls <= len(admins) + periods, "\n".join([str(errors), *seen])
    assert set(stats.calls_by_user) <= set(admins)
    assert sum(s.startswith("edge; hit") for s in seen) >= len(seen) - stats.calls


async def test_other_replica_waits_for_the_refresh(stats: StatsApp, redis_url: str) -> None:
    """Entry missing, refresh in flight on replica 1: replica 2 polls the store for it
    instead of calling the app."""
    clock = FakeClock(FIXED_NOW)
    cfg = cache_config(
        stats.url, redis_url, authorize={"claim": "app_metadata.role", "in": ["admin"]}
    )
    async with (
        run_gateway(cfg, clock=clock) as gw1,
        run_gateway(cfg, clock=clock) as gw2,
        httpx.AsyncClient(timeout=10) as c,
    ):
        stats.gate = asyncio.Event()
        leader = asyncio.ensure_future(c.get(gw1.url + PATH, headers=as_user("alice", "admin")))
        await asyncio.wait_for(stats.entered.wait(), 5)
        follower = asyncio.ensure_future(c.get(gw2.url + PATH, headers=as_user("bob", "admin")))
        await asyncio.sleep(0.1)
        assert not follower.done()
        stats.gate.set()
        r1, r2 = await leader, await follower
        assert "stored" in cs(r1)
        assert cs(r2) == "edge; hit; ttl=10"
        assert r2.json() == r1.json()
        assert stats.calls == 1


def _body(r: httpx.Response) -> Any:
    return json.loads(r.content)


async def test_other_replica_serves_stale_while_one_refreshes(
    stats: StatsApp, redis_url: str
) -> None:
    clock = FakeClock(FIXED_NOW)
    cfg = cache_config(stats.url, redis_url, stale_while_revalidate="20s")
    async with (
        run_gateway(cfg, clock=clock) as gw1,
        run_gateway(cfg, clock=clock) as gw2,
        httpx.AsyncClient(timeout=10) as c,
    ):
        await get(c, gw1.url, "alice")
        first = (await get(c, gw2.url, "bob")).json()
        clock.advance(15)
        stats.gate = asyncio.Event()
        stats.entered.clear()
        leader = asyncio.ensure_future(get(c, gw1.url, "alice"))
        await asyncio.wait_for(stats.entered.wait(), 5)
        r = await get(c, gw2.url, "bob")
        assert cs(r) == "edge; hit; ttl=-5"
        assert r.json() == first
        stats.gate.set()
        assert cs(await leader) == "edge; fwd=stale; fwd-status=200; stored"
        assert cs(await get(c, gw2.url, "bob")) == "edge; hit; ttl=10"
        assert stats.calls == 3


async def test_waiters_share_the_leaders_error(stats: StatsApp, store_url: str) -> None:
    """No stale copy and the app fails: the requests that waited on the one refresh get
    its error instead of each calling the failing app again."""
    stats.allow_anonymous = True
    stats.fail_status = 503
    stats.gate = asyncio.Event()
    async with run_gateway(
        cache_config(stats.url, store_url, public=True), clock=FakeClock(FIXED_NOW)
    ) as gw:
        async with httpx.AsyncClient(timeout=10) as c:
            tasks = [asyncio.ensure_future(get(c, gw.url)) for _ in range(20)]
            await asyncio.wait_for(stats.entered.wait(), 5)
            await all_in_flight(gw, 20)
            stats.gate.set()
            responses = await asyncio.gather(*tasks)
    assert all(r.status_code == 503 for r in responses)
    assert stats.calls == 1
    assert sum("detail=coalesced" in cs(r) for r in responses) == 19


async def test_store_down_public_route_keeps_in_process_single_flight(stats: StatsApp) -> None:
    """Callers allowed by config alone need no store to be authorized: with the store
    down (on_failure open) a process still makes one upstream call per TTL for them."""
    stats.allow_anonymous = True
    stats.gate = asyncio.Event()
    clock = FakeClock(FIXED_NOW)
    cfg = cache_config(stats.url, "redis://127.0.0.1:1/0", public=True, on_failure="open")
    async with run_gateway(cfg, clock=clock) as gw, httpx.AsyncClient(timeout=10) as c:
        tasks = [asyncio.ensure_future(get(c, gw.url)) for _ in range(10)]
        await asyncio.wait_for(stats.entered.wait(), 5)
        await all_in_flight(gw, 10)
        stats.gate.set()
        responses = await asyncio.gather(*tasks)
        assert all(r.status_code == 200 for r in responses)
        statuses = sorted(cs(r) for r in responses)
        assert statuses.count("edge; fwd=miss; fwd-status=200; detail=store-unavailable") == 1
        assert statuses.count("edge; hit; ttl=10") == 9
        clock.advance(4)
        assert cs(await get(c, gw.url)) == "edge; hit; ttl=6"
        assert stats.calls == 1
        assert metric(gw, "error") == 1
        assert metric(gw, "hit") == 10


async def test_micro_cache_for_polling(stats: StatsApp, store_url: str) -> None:
    """`ttl: 1s` on a polling route: 20 clients polling every 500 ms for 10 s cost the app
    one call per second (plus nothing per client when a claim authorizes them)."""
    clock = FakeClock(FIXED_NOW)
    cfg = cache_config(
        stats.url, store_url, ttl="1s", authorize={"claim": "app_metadata.role", "in": ["host"]}
    )
    async with run_gateway(cfg, clock=clock) as gw, httpx.AsyncClient(timeout=10) as c:
        for _ in range(20):
            rs = await asyncio.gather(
                *(c.get(gw.url + PATH, headers=as_user(f"v{i}", "host")) for i in range(20))
            )
            assert all(r.status_code == 200 for r in rs)
            clock.advance(0.5)
    assert stats.calls <= 10 + 1


# --------------------------------------------------------------------------- review fixes


async def test_unlisted_query_cannot_poison_the_entry(stats: StatsApp, store_url: str) -> None:
    clock = FakeClock(FIXED_NOW)
    cfg = cache_config(stats.url, store_url)  # no vary_query: the key is route + params
    async with run_gateway(cfg, clock=clock) as gw:
        async with httpx.AsyncClient() as c:
            # Admin A fills the entry with a parameter the key does not hold...
            a = await get(c, gw.url, "alice", PATH + "?range=all&callback=x")
            assert a.json()["range"] == ""  # ...which the app never saw,
            b = await get(c, gw.url, "bob", PATH)
            assert b.json()["range"] == ""  # so B's plain URL gets the plain answer.
    assert "range=" not in json.dumps(stats.last_headers)


async def test_answers_that_vary_on_credentials_are_not_stored(
    stats: StatsApp, store_url: str
) -> None:
    cfg = cache_config(stats.url, store_url)
    async with run_gateway(cfg, clock=FakeClock(FIXED_NOW)) as gw:
        async with httpx.AsyncClient() as c:
            personal = ("Cookie", "Authorization", "*", "X-Edge-User-Id", "Accept-Language, Cookie")
            for vary in personal:
                stats.extra_headers = {"Vary": vary}
                calls = stats.calls
                await get(c, gw.url, "alice")
                r = await get(c, gw.url, "alice")
                assert "stored" not in cs(r)
                assert "hit" not in cs(r)
                assert stats.calls == calls + 2, vary


async def test_public_fills_carry_no_credentials(stats: StatsApp, store_url: str) -> None:
    stats.allow_anonymous = True
    cfg = cache_config(stats.url, store_url, public=True)
    async with run_gateway(cfg, clock=FakeClock(FIXED_NOW)) as gw:
        async with httpx.AsyncClient() as c:
            await get(
                c,
                gw.url,
                "alice",
                headers={"Cookie": "sb-x-auth-token=SECRET"},
            )
    sent = {k.lower() for k in stats.last_headers}
    assert "cookie" not in sent
    assert "authorization" not in sent
    assert "x-edge-user-id" not in sent
