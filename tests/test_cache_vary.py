"""The cache honours `Vary` (RFC 9111 §4.1) with a secondary key, and single-flights each
caller's first authorization check. Real sockets: gateway (run_gateway) → fake stats app,
memory store and the real Redis; time moves by an injected clock.

The Vary below is the one Next.js 15 puts on every App Router answer, route handlers
included: before this, no such answer was ever stored."""

from __future__ import annotations

import asyncio

import httpx

from tests.fakes.clock import FIXED_NOW, FakeClock
from tests.fakes.stats_app import StatsApp
from tests.helpers import run_gateway
from tests.test_cache import PATH, all_in_flight, cache_config, cs, get

NEXT_VARY = "rsc, next-router-state-tree, next-router-prefetch, next-router-segment-prefetch"


async def test_next_vary_is_stored_and_keeps_rsc_apart(stats: StatsApp, store_url: str) -> None:
    stats.extra_headers = {"Vary": NEXT_VARY}
    async with run_gateway(cache_config(stats.url, store_url), clock=FakeClock(FIXED_NOW)) as gw:
        async with httpx.AsyncClient() as c:
            r1 = await get(c, gw.url, "alice")
            assert cs(r1) == "edge; fwd=miss; fwd-status=200; stored"
            r2 = await get(c, gw.url, "alice")
            assert cs(r2) == "edge; hit; ttl=10"
            assert stats.calls == 1
            # An RSC navigation selects another variant: its own fill, never the JSON.
            rsc = await get(c, gw.url, "alice", headers={"RSC": "1"})
            assert "stored" in cs(rsc)
            assert rsc.json()["rsc"] == "1"
            assert stats.calls == 2
            again = await get(c, gw.url, "alice", headers={"RSC": "1"})
            assert cs(again).startswith("edge; hit")
            assert again.json()["rsc"] == "1"
            plain = await get(c, gw.url, "alice")
            assert cs(plain).startswith("edge; hit")
            assert plain.json()["rsc"] == ""
            # An empty header is a value of its own, not the same as an absent one.
            empty = await get(c, gw.url, "alice", headers={"RSC": ""})
            assert "stored" in cs(empty)
            assert stats.calls == 3
            # Another allowed admin gets the plain variant without a fill of its own
            # beyond its first check.
            await get(c, gw.url, "bob")
            hit = await get(c, gw.url, "bob")
            assert cs(hit).startswith("edge; hit")
            assert hit.json()["rsc"] == ""


async def test_ignore_vary_does_not_split(stats: StatsApp, store_url: str) -> None:
    stats.extra_headers = {"Vary": "X-Client-Build, Accept-Encoding"}
    cfg = cache_config(stats.url, store_url, ignore_vary=["x-client-build"])
    async with run_gateway(cfg, clock=FakeClock(FIXED_NOW)) as gw:
        async with httpx.AsyncClient() as c:
            await get(c, gw.url, "alice", headers={"X-Client-Build": "a"})
            r = await get(c, gw.url, "alice", headers={"X-Client-Build": "b"})
            assert cs(r).startswith("edge; hit")
            assert stats.calls == 1


async def test_without_ignore_vary_each_value_is_a_variant(stats: StatsApp, store_url: str) -> None:
    stats.extra_headers = {"Vary": "X-Client-Build"}
    async with run_gateway(cache_config(stats.url, store_url), clock=FakeClock(FIXED_NOW)) as gw:
        async with httpx.AsyncClient() as c:
            for build in ("a", "b", "a", "b"):
                await get(c, gw.url, "alice", headers={"X-Client-Build": build})
            assert stats.calls == 2


async def test_other_replica_learns_the_vary_from_the_store(
    stats: StatsApp, redis_url: str
) -> None:
    """A replica that never saw an answer finds the marker in the no-variant slot and
    reads the right variant, instead of calling the app again."""
    stats.extra_headers = {"Vary": NEXT_VARY}
    cfg = cache_config(stats.url, redis_url)
    clock = FakeClock(FIXED_NOW)
    async with (
        run_gateway(cfg, clock=clock) as gw1,
        run_gateway(cfg, clock=clock) as gw2,
        httpx.AsyncClient() as c,
    ):
        await get(c, gw1.url, "alice")
        await get(c, gw1.url, "alice", headers={"RSC": "1"})
        assert stats.calls == 2
        plain = await get(c, gw2.url, "alice")
        assert cs(plain).startswith("edge; hit")
        assert plain.json()["rsc"] == ""
        rsc = await get(c, gw2.url, "alice", headers={"RSC": "1"})
        assert cs(rsc).startswith("edge; hit")
        assert rsc.json()["rsc"] == "1"
        assert stats.calls == 2


async def test_a_waiter_of_another_variant_is_not_served_the_leaders(
    stats: StatsApp, store_url: str
) -> None:
    """Before the route's Vary is known, a plain and an RSC request share one flight;
    the RSC one must not get the plain answer."""
    stats.extra_headers = {"Vary": NEXT_VARY}
    stats.allow_anonymous = True
    stats.gate = asyncio.Event()
    cfg = cache_config(stats.url, store_url, public=True)
    clock = FakeClock(FIXED_NOW)
    async with run_gateway(cfg, clock=clock) as gw, httpx.AsyncClient(timeout=10) as c:
        plain = asyncio.ensure_future(get(c, gw.url))
        await asyncio.wait_for(stats.entered.wait(), 10)
        rsc = asyncio.ensure_future(get(c, gw.url, headers={"RSC": "1"}))
        await all_in_flight(gw, 2)
        stats.gate.set()
        assert (await plain).json()["rsc"] == ""
        assert (await rsc).json()["rsc"] == "1"


# --------------------------------------------------------------------------- first checks


async def test_one_admins_concurrent_first_polls_cost_one_call(
    stats: StatsApp, store_url: str
) -> None:
    stats.extra_headers = {"Vary": NEXT_VARY}
    stats.gate = asyncio.Event()
    async with run_gateway(cache_config(stats.url, store_url), clock=FakeClock(FIXED_NOW)) as gw:
        async with httpx.AsyncClient(timeout=30) as c:
            tasks = [asyncio.ensure_future(get(c, gw.url, "alice")) for _ in range(20)]
            await asyncio.wait_for(stats.entered.wait(), 10)
            await all_in_flight(gw, 20)
            stats.gate.set()
            rs = await asyncio.gather(*tasks)
    assert [r.status_code for r in rs] == [200] * 20
    assert stats.calls == 1
    assert sum("stored" in cs(r) for r in rs) == 1


async def test_a_denied_callers_waiters_get_the_denial(stats: StatsApp, store_url: str) -> None:
    stats.gate = asyncio.Event()
    async with run_gateway(cache_config(stats.url, store_url), clock=FakeClock(FIXED_NOW)) as gw:
        async with httpx.AsyncClient(timeout=30) as c:
            tasks = [asyncio.ensure_future(get(c, gw.url, "mallory")) for _ in range(10)]
            await asyncio.wait_for(stats.entered.wait(), 10)
            await all_in_flight(gw, 10)
            stats.gate.set()
            rs = await asyncio.gather(*tasks)
    assert [r.status_code for r in rs] == [403] * 10
    assert stats.calls == 1


async def test_m_admins_on_two_replicas_cost_m_first_checks(
    stats: StatsApp, redis_url: str
) -> None:
    """5 admins, each polling from several widgets on both replicas at once: one check
    per admin reaches the app (the first of them also fills the entry)."""
    stats.extra_headers = {"Vary": NEXT_VARY}
    stats.gate = asyncio.Event()
    cfg = cache_config(stats.url, redis_url)
    admins = ["alice", "bob", "carol", "dave", "erin"]
    async with (
        run_gateway(cfg, clock=FakeClock(FIXED_NOW)) as gw1,
        run_gateway(cfg, clock=FakeClock(FIXED_NOW)) as gw2,
        httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=100)) as c,
    ):
        tasks = [
            asyncio.ensure_future(get(c, gw.url, user))
            for user in admins
            for gw in (gw1, gw2)
            for _ in range(3)
        ]
        await asyncio.wait_for(stats.entered.wait(), 10)
        await all_in_flight(gw1, 15)
        await all_in_flight(gw2, 15)
        stats.gate.set()
        rs = await asyncio.gather(*tasks)
    assert [r.status_code for r in rs] == [200] * 30
    assert stats.calls_by_user == {u: 1 for u in admins}


async def test_a_rewritten_content_location_is_not_replayed_to_others(
    stats: StatsApp, store_url: str
) -> None:
    """The proxy rewrites Content-Location to the filler's Host; an entry must not carry
    one caller's Host to everyone else."""
    stats.allow_anonymous = True
    stats.extra_headers = {"Content-Location": stats.url + PATH}
    cfg = cache_config(stats.url, store_url, public=True)
    async with run_gateway(cfg, clock=FakeClock(FIXED_NOW)) as gw, httpx.AsyncClient() as c:
        filler = await get(c, gw.url, headers={"Host": "evil.example"})
        assert filler.headers["content-location"] == "http://evil.example" + PATH
        hit = await get(c, gw.url)
        assert cs(hit).startswith("edge; hit")
        assert "content-location" not in hit.headers
