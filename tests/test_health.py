"""Clients are paced by upstream health: a high upstream error ratio over the last
minute switches /_edge/client-config to the degraded intervals."""

from __future__ import annotations

import httpx

from gateway.health import ErrorRatio
from tests.fakes.app import FakeApp
from tests.fakes.clock import FakeClock
from tests.helpers import make_config, run_gateway


def test_ratio_needs_volume_and_forgets_after_a_minute() -> None:
    clock = FakeClock(1000.0)
    r = ErrorRatio(0.25, clock, min_requests=20)
    for _ in range(10):
        r.record(502)
    assert not r.unhealthy()  # 10 requests are below the minimum volume
    for _ in range(20):
        r.record(200)
    assert r.ratio() == 10 / 30
    assert r.unhealthy()
    clock.advance(61)
    assert r.ratio() == 0.0
    for _ in range(30):
        r.record(200)
    r.record(500)
    assert not r.unhealthy()


async def test_client_config_degrades_while_upstream_fails(fake_app: FakeApp) -> None:
    clock = FakeClock(1000.0)
    async with (
        run_gateway(make_config(fake_app.url), monotonic=clock) as gw,
        httpx.AsyncClient() as c,
    ):
        assert (await c.get(gw.url + "/_edge/client-config")).json()["mode"] == "normal"
        fake_app.status_override["/api/x"] = (500, {"error": "db down"})
        for _ in range(25):
            assert (await c.get(gw.url + "/api/x")).status_code == 500
        body = (await c.get(gw.url + "/_edge/client-config")).json()
        assert body["mode"] == "degraded"
        assert body["chat_fallback_interval_ms"] == 15_000
        clock.advance(61)  # a quiet minute later the upstream is given the benefit again
        assert (await c.get(gw.url + "/_edge/client-config")).json()["mode"] == "normal"
