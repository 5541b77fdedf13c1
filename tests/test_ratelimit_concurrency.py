"""Per-key concurrency caps (`concurrency: {by, max, retry_after}`) through the real
gateway: one webinar's surge of slow requests is capped and does not starve another
webinar; a full key answers 503 JSON with Retry-After; slots come back when the upstream
answers or the client goes away."""

from __future__ import annotations

import asyncio
import socket
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from aiohttp import web

from gateway.policies.concurrency.policy import CONCURRENCY
from tests.fakes.app import FakeApp
from tests.helpers import make_config, run_gateway


class HangingApp:
    """Upstream whose /api/webinars/{id}/hang requests wait until the test releases them."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.arrived: Counter[str] = Counter()
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def hang(self, request: web.Request) -> web.Response:
        self.arrived[request.match_info["webinar_id"]] += 1
        await self.release.wait()
        return web.json_response({"ok": True})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/api/webinars/{webinar_id}/hang", self.hang)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        await web.SockSite(self.runner, sock).start()
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"

    async def stop(self) -> None:
        self.release.set()
        if self.runner:
            await self.runner.cleanup()


@pytest.fixture
async def hanging() -> AsyncIterator[HangingApp]:
    app = HangingApp()
    await app.start()
    yield app
    await app.stop()


def routes(**concurrency: Any) -> list[dict[str, Any]]:
    return [
        {
            "name": "hang",
            "match": {"path": "/api/webinars/{webinar_id}/hang"},
            "upstream": "app",
            "auth": "off",
            "concurrency": concurrency,
        },
        {"name": "default", "match": {"path": "/{path:path}"}, "upstream": "app", "auth": "off"},
    ]


async def wait_for(pred: Any, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not pred():
            await asyncio.sleep(0.005)


async def test_webinar_cap_does_not_starve_other_webinars(hanging: HangingApp) -> None:
    cfg = make_config(hanging.url, routes=routes(by="webinar", max=2, retry_after="3s"))
    async with run_gateway(cfg) as gw, httpx.AsyncClient(base_url=gw.url, timeout=10) as c:
        held = [asyncio.ensure_future(c.get("/api/webinars/w1/hang")) for _ in range(2)]
        await wait_for(lambda: hanging.arrived["w1"] == 2)
        # w1 is full: refused at once, never reaches the upstream.
        r = await c.get("/api/webinars/w1/hang")
        assert r.status_code == 503
        assert r.json() == {
            "error": "concurrency_limit",
            "message": "too many requests in flight for this webinar; retry shortly",
        }
        assert r.headers["retry-after"] == "3"
        assert r.headers["ratelimit-policy"] == '"concurrency";q=2;qu="concurrent-requests"'
        assert r.headers["ratelimit"] == '"concurrency";r=0'
        assert hanging.arrived["w1"] == 2
        # Another webinar still gets its own two slots.
        other = [asyncio.ensure_future(c.get("/api/webinars/w2/hang")) for _ in range(2)]
        await wait_for(lambda: hanging.arrived["w2"] == 2)
        assert (await c.get("/api/webinars/w2/hang")).status_code == 503
        status = gw.app.rt.services.status("concurrency")
        assert status == {"hang": {"keys": 2, "in_flight": 4}}
        # Release: every held request completes and the slots are free again.
        hanging.release.set()
        assert [(await f).status_code for f in held + other] == [200] * 4
        assert (await c.get("/api/webinars/w1/hang")).status_code == 200
        assert gw.app.rt.services.status("concurrency") == {"hang": {"keys": 0, "in_flight": 0}}
        value = gw.app.rt.metrics.registry.get_sample_value(
            "edge_concurrency_rejections_total", {"route": "hang"}
        )
        assert value == 2


async def test_slot_freed_when_client_goes_away(fake_app: FakeApp) -> None:
    """fake_app's /hang never answers; a client that gives up must give its slot back."""
    cfg = make_config(
        fake_app.url,
        routes=[
            {
                "name": "hang",
                "match": {"path": "/hang"},
                "upstream": "app",
                "auth": "off",
                "concurrency": {"by": "route", "max": 1},
            }
        ],
    )
    async with run_gateway(cfg) as gw:
        async with httpx.AsyncClient(base_url=gw.url) as c1:
            first = asyncio.ensure_future(c1.get("/hang"))
            await wait_for(lambda: fake_app.hits["/hang"] == 1)
            async with httpx.AsyncClient(base_url=gw.url) as c2:
                r = await c2.get("/hang")
                assert r.status_code == 503
                assert r.headers["retry-after"] == "1"
            first.cancel()
        # The gateway notices the disconnect, cancels the upstream call, frees the slot.
        await wait_for(lambda: fake_app.cancelled == 1)
        counts = gw.app.rt.services[CONCURRENCY]["hang"]
        await wait_for(lambda: not counts)
        async with httpx.AsyncClient(base_url=gw.url) as c3:
            second = asyncio.ensure_future(c3.get("/hang"))
            await wait_for(lambda: fake_app.hits["/hang"] == 2)
            second.cancel()


async def test_concurrency_by_ip(hanging: HangingApp) -> None:
    cfg = make_config(hanging.url, routes=routes(by="ip", max=1))
    async with run_gateway(cfg) as gw, httpx.AsyncClient(base_url=gw.url, timeout=10) as c:
        a = {"x-forwarded-for": "203.0.113.1"}
        b = {"x-forwarded-for": "203.0.113.2"}
        held = asyncio.ensure_future(c.get("/api/webinars/w1/hang", headers=a))
        await wait_for(lambda: hanging.arrived["w1"] == 1)
        assert (await c.get("/api/webinars/w1/hang", headers=a)).status_code == 503
        other = asyncio.ensure_future(c.get("/api/webinars/w1/hang", headers=b))
        await wait_for(lambda: hanging.arrived["w1"] == 2)
        hanging.release.set()
        assert (await held).status_code == 200
        assert (await other).status_code == 200


async def test_answers_the_edge_gives_itself_take_no_slot(hanging: HangingApp) -> None:
    """The bulkhead caps requests going upstream: a heartbeat the edge absorbs is
    answered even while the webinar's slots are all held (before, a surging webinar's
    absorbed heartbeats got 503)."""
    route = routes(by="webinar", max=1)[0]
    route["heartbeat"] = {"forward_interval": "300s", "key": ["ip"]}
    cfg = make_config(hanging.url, routes=[route])
    async with run_gateway(cfg) as gw, httpx.AsyncClient(base_url=gw.url, timeout=10) as c:
        first = asyncio.ensure_future(c.get("/api/webinars/w1/hang"))
        await wait_for(lambda: hanging.arrived["w1"] == 1)
        # Same viewer again: absorbed at the edge, not refused by the full bulkhead.
        again = await c.get("/api/webinars/w1/hang")
        assert again.status_code == 200
        assert again.json() == {"success": True}
        assert hanging.arrived["w1"] == 1
        hanging.release.set()
        assert (await first).status_code == 200
