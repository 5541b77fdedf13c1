"""`GET /_edge/client-config`: the client intervals from the `client:` section in ms,
the degraded set while upstream is unhealthy (any `rt.degraded_checks` says so, e.g. an
open breaker), public and cacheable for `client.cache_max_age`."""

from __future__ import annotations

import httpx

from tests.fakes.app import FakeApp
from tests.fakes.clock import FIXED_NOW, FakeClock
from tests.fakes.identity import AUTH, bearer
from tests.fakes.stats_app import StatsApp
from tests.helpers import Running, make_config, run_gateway

CLIENT = {
    "presence_ping_interval": "90s",
    "access_track_interval": "5m",
    "chat_fallback_interval": "2500ms",
    "admin_polling_interval": "5s",
    "degraded": {
        "presence_ping_interval": "10m",
        "access_track_interval": "15m",
        "chat_fallback_interval": "20s",
        "admin_polling_interval": "1m",
    },
}


async def test_defaults_in_ms(fake_app: FakeApp, gw: Running) -> None:
    async with httpx.AsyncClient() as c:
        r = await c.get(gw.url + "/_edge/client-config")
    assert r.status_code == 200
    assert r.json() == {
        "mode": "normal",
        "presence_ping_interval_ms": 120_000,
        "access_track_interval_ms": 300_000,
        "chat_fallback_interval_ms": 2_000,
        "admin_polling_interval_ms": 10_000,
    }
    assert r.headers["cache-control"] == "public, max-age=30"
    assert r.headers["content-type"] == "application/json"
    assert r.headers["x-request-id"]
    # Answered by the gateway itself: the app never sees it.
    assert fake_app.hits == {}


async def test_normal_and_degraded_sets(fake_app: FakeApp) -> None:
    cfg = make_config(fake_app.url, client={**CLIENT, "cache_max_age": "15s"})
    unhealthy = False
    async with run_gateway(cfg) as gw, httpx.AsyncClient() as c:
        gw.app.rt.degraded_checks.append(lambda: unhealthy)
        normal = await c.get(gw.url + "/_edge/client-config")
        assert normal.json() == {
            "mode": "normal",
            "presence_ping_interval_ms": 90_000,
            "access_track_interval_ms": 300_000,
            "chat_fallback_interval_ms": 2_500,
            "admin_polling_interval_ms": 5_000,
        }
        assert normal.headers["cache-control"] == "public, max-age=15"
        unhealthy = True
        degraded = await c.get(gw.url + "/_edge/client-config")
        assert degraded.status_code == 200
        assert degraded.json() == {
            "mode": "degraded",
            "presence_ping_interval_ms": 600_000,
            "access_track_interval_ms": 900_000,
            "chat_fallback_interval_ms": 20_000,
            "admin_polling_interval_ms": 60_000,
        }
        unhealthy = False
        back = await c.get(gw.url + "/_edge/client-config")
        assert back.json()["mode"] == "normal"


async def test_head_and_wrong_method(gw: Running) -> None:
    async with httpx.AsyncClient() as c:
        head = await c.head(gw.url + "/_edge/client-config")
        assert head.status_code == 200
        assert head.content == b""
        post = await c.post(gw.url + "/_edge/client-config")
        assert post.status_code == 405
        assert post.json()["error"] == "method_not_allowed"
        assert post.headers["allow"] == "GET, HEAD"


async def test_open_breaker_switches_to_degraded_while_cache_serves_stale() -> None:
    """End to end: the app fails, the breaker (inside the cache) opens; the dashboard
    keeps its last good stats (stale_if_error over the breaker's fast 503) and
    client-config tells clients to slow down."""
    stats = StatsApp()
    await stats.start()
    stats.admins = {"alice"}
    try:
        cfg = make_config(
            stats.url,
            client=CLIENT,
            auth=AUTH,
            routes=[
                {
                    "name": "admin_stats",
                    "match": {
                        "methods": ["GET"],
                        "path": "/api/webinars/{webinar_id}/stats/access",
                    },
                    "upstream": "app",
                    "auth": "optional",
                    "cache": {"ttl": "10s", "stale_if_error": "5m"},
                    "breaker": {"group": "stats", "failure_threshold": 2, "cooldown": "60s"},
                }
            ],
        )
        clock = FakeClock(FIXED_NOW)
        async with run_gateway(cfg, clock=clock) as gw, httpx.AsyncClient() as c:
            path = gw.url + "/api/webinars/w1/stats/access"
            who = bearer("alice")
            good = (await c.get(path, headers=who)).json()
            assert (await c.get(gw.url + "/_edge/client-config")).json()["mode"] == "normal"
            stats.fail_status = 500
            seen = []
            for _ in range(4):
                clock.advance(11)
                r = await c.get(path, headers=who)
                assert r.status_code == 200
                assert r.json() == good
                seen.append(r.headers["cache-status"])
            calls_when_open = stats.calls
            clock.advance(11)
            r = await c.get(path, headers=who)
            assert r.json() == good
            # The breaker answered (fast 503), the app was not called again.
            assert stats.calls == calls_when_open
            assert "fwd-status=503" in r.headers["cache-status"]
            assert "detail=stale-if-error" in r.headers["cache-status"]
            assert "fwd-status=500" in seen[0]
            cc = await c.get(gw.url + "/_edge/client-config")
            assert cc.json()["mode"] == "degraded"
            assert cc.json()["admin_polling_interval_ms"] == 60_000
    finally:
        await stats.stop()
