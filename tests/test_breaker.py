"""The breaker policy through real sockets: a real gateway (run_gateway) in front of fake
upstreams, with an injected monotonic clock so cooldowns pass without sleeping."""

from __future__ import annotations

import asyncio
import email.utils
import random
import re
import socket
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from aiohttp import web

from gateway.config import GatewayConfig
from gateway.policies.breaker.policy import BREAKERS, BreakerRegistry
from tests.fakes.app import FakeApp
from tests.fakes.clock import FIXED_NOW, FakeClock
from tests.helpers import make_config, run_gateway


def chat_config(upstream: str, **breaker: Any) -> GatewayConfig:
    """Two routes in group `chat` (messages and questions) plus the default route."""
    b = {"group": "chat", "failure_threshold": 3, "cooldown": "30s", **breaker}
    return make_config(
        upstream,
        routes=[
            {
                "name": "chat_poll",
                "match": {"methods": ["GET", "HEAD", "POST"], "path": "/api/chat/{room}"},
                "upstream": "app",
                "auth": "off",
                "breaker": b,
            },
            {
                "name": "qa_poll",
                "match": {"methods": ["GET"], "path": "/api/qa/{room}"},
                "upstream": "app",
                "auth": "off",
                "breaker": b,
            },
            {
                "name": "hang",
                "match": {"methods": ["GET"], "path": "/hang"},
                "upstream": "app",
                "auth": "off",
                "read_timeout": "150ms",
                "breaker": b,
            },
            {
                "name": "default",
                "match": {"path": "/{path:path}"},
                "upstream": "app",
                "auth": "off",
            },
        ],
    )


def registry(gw: Any) -> BreakerRegistry:
    reg = gw.app.rt.services[BREAKERS]
    assert isinstance(reg, BreakerRegistry)
    return reg


def state(gw: Any, group: str = "chat") -> str:
    return str(registry(gw).status()[group]["state"])


async def get_many(c: httpx.AsyncClient, url: str, n: int) -> list[httpx.Response]:
    return [await c.get(url) for _ in range(n)]


def assert_circuit_open(r: httpx.Response) -> None:
    assert r.status_code == 503
    assert r.headers["content-type"] == "application/json"
    assert r.headers["x-edge-breaker"] == "open"
    body = r.json()
    assert body["error"] == "circuit_open"
    assert body["group"] == "chat"
    assert "message" in body
    assert int(r.headers["retry-after"]) >= 1


# --------------------------------------------------------------------------- opening


async def test_opens_after_consecutive_failures_for_every_route_of_the_group(
    fake_app: FakeApp,
) -> None:
    clock = FakeClock(10_000.0)
    fake_app.status_override["/api/chat/r1"] = (500, {"error": "db down"})
    async with (
        run_gateway(chat_config(fake_app.url), monotonic=clock) as gw,
        httpx.AsyncClient(base_url=gw.url) as c,
    ):
        first = await get_many(c, "/api/chat/r1", 3)
        # The upstream's own answers pass through untouched until the threshold.
        assert [r.status_code for r in first] == [500, 500, 500]
        assert first[0].json() == {"error": "db down"}
        assert "x-edge-breaker" not in first[0].headers
        assert state(gw) == "open"

        shed = await c.get("/api/chat/r1")
        assert_circuit_open(shed)
        # Another route naming the same group is shed too, without reaching the app.
        other = await c.get("/api/qa/r9")
        assert_circuit_open(other)
        assert fake_app.hits["/api/chat/r1"] == 3
        assert fake_app.hits["/api/qa/r9"] == 0
        # Routes without the breaker are not affected.
        assert (await c.get("/plain")).status_code == 200


async def test_a_success_resets_the_consecutive_count(fake_app: FakeApp) -> None:
    clock = FakeClock(10_000.0)
    async with (
        run_gateway(chat_config(fake_app.url, min_requests=1000), monotonic=clock) as gw,
        httpx.AsyncClient(base_url=gw.url) as c,
    ):
        for _ in range(4):
            fake_app.status_override["/api/chat/r1"] = (502, {"error": "x"})
            assert [r.status_code for r in await get_many(c, "/api/chat/r1", 2)] == [502, 502]
            del fake_app.status_override["/api/chat/r1"]
            assert (await c.get("/api/chat/r1")).status_code == 200
        assert state(gw) == "closed"
        assert fake_app.hits["/api/chat/r1"] == 12


async def test_opens_on_failure_ratio_over_the_window_with_minimum_volume(
    fake_app: FakeApp,
) -> None:
    clock = FakeClock(10_000.0)
    cfg = chat_config(
        fake_app.url, failure_threshold=100, failure_ratio=0.5, min_requests=10, window="10s"
    )
    fake_app.status_override["/api/chat/bad"] = (503, {"error": "overloaded"})
    async with (
        run_gateway(cfg, monotonic=clock) as gw,
        httpx.AsyncClient(base_url=gw.url) as c,
    ):
        # Failures that have left the window do not count: 4 failures, then 11 s later.
        await get_many(c, "/api/chat/bad", 4)
        clock.advance(11)
        # 9 requests, 4 failed (44 %): below the ratio.
        for _ in range(5):
            assert (await c.get("/api/chat/ok")).status_code == 200
        for _ in range(4):
            assert (await c.get("/api/chat/bad")).status_code == 503
        assert state(gw) == "closed"
        # 10th request and 5th failure: 50 % of 10 → open.
        r = await c.get("/api/chat/bad")
        assert r.status_code == 503
        assert r.json() == {"error": "overloaded"}  # still the upstream's own answer
        assert state(gw) == "open"
        assert registry(gw).status()["chat"]["reason"] == "failure_ratio"
        assert_circuit_open(await c.get("/api/chat/ok"))
        assert fake_app.hits["/api/chat/ok"] == 5


async def test_below_min_requests_a_high_ratio_does_not_open(fake_app: FakeApp) -> None:
    clock = FakeClock(10_000.0)
    cfg = chat_config(fake_app.url, failure_threshold=100, failure_ratio=0.5, min_requests=20)
    fake_app.status_override["/api/chat/bad"] = (500, {"error": "x"})
    async with (
        run_gateway(cfg, monotonic=clock) as gw,
        httpx.AsyncClient(base_url=gw.url) as c,
    ):
        for _ in range(6):
            await c.get("/api/chat/bad")
            await c.get("/api/chat/ok")
            await c.get("/api/chat/bad")
        assert state(gw) == "closed"
        assert registry(gw).status()["chat"]["window_requests"] == 18
        assert registry(gw).status()["chat"]["window_failures"] == 12


async def test_4xx_are_not_counted_as_failures(fake_app: FakeApp) -> None:
    clock = FakeClock(10_000.0)
    async with (
        run_gateway(chat_config(fake_app.url, min_requests=5), monotonic=clock) as gw,
        httpx.AsyncClient(base_url=gw.url) as c,
    ):
        for status in (400, 401, 403, 404, 409, 422):
            fake_app.status_override["/api/chat/r1"] = (status, {"error": "client"})
            rs = await get_many(c, "/api/chat/r1", 5)
            assert [r.status_code for r in rs] == [status] * 5
        assert state(gw) == "closed"
        assert fake_app.hits["/api/chat/r1"] == 30
        # ... and 429 is: the app is shedding load.
        fake_app.status_override["/api/chat/r1"] = (429, {"error": "slow down"})
        await get_many(c, "/api/chat/r1", 3)
        assert state(gw) == "open"


async def test_connect_errors_open_the_breaker() -> None:
    clock = FakeClock(10_000.0)
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    closed_port = s.getsockname()[1]
    s.close()  # nothing listens there: connection refused
    async with (
        run_gateway(chat_config(f"http://127.0.0.1:{closed_port}"), monotonic=clock) as gw,
        httpx.AsyncClient(base_url=gw.url) as c,
    ):
        rs = await get_many(c, "/api/chat/r1", 3)
        assert [r.json()["error"] for r in rs] == ["upstream_unavailable"] * 3
        assert_circuit_open(await c.get("/api/chat/r1"))


async def test_upstream_timeouts_open_the_breaker(fake_app: FakeApp) -> None:
    clock = FakeClock(10_000.0)
    async with (
        run_gateway(chat_config(fake_app.url, failure_threshold=2), monotonic=clock) as gw,
        httpx.AsyncClient(base_url=gw.url, timeout=5) as c,
    ):
        rs = await asyncio.gather(c.get("/hang"), c.get("/hang"))
        assert [r.status_code for r in rs] == [504, 504]
        assert state(gw) == "open"
        assert_circuit_open(await c.get("/hang"))
        assert fake_app.hits["/hang"] == 2


# --------------------------------------------------------------------------- open


async def test_open_answer_is_fast_with_jittered_retry_after_within_bounds(
    fake_app: FakeApp,
) -> None:
    clock = FakeClock(10_000.0)
    fake_app.status_override["/api/chat/r1"] = (500, {"error": "x"})
    async with (
        run_gateway(chat_config(fake_app.url, cooldown="30s", jitter=0.2), monotonic=clock) as gw,
        httpx.AsyncClient(base_url=gw.url) as c,
    ):
        await get_many(c, "/api/chat/r1", 3)
        clock.advance(10)  # 20 s of cooldown left
        values = []
        for _ in range(60):
            r = await c.get("/api/chat/r1")
            assert_circuit_open(r)
            values.append(int(r.headers["retry-after"]))
            assert r.json()["retry_after"] == values[-1]
        assert all(16 <= v <= 24 for v in values), values
        # Spread out, so clients do not come back in lockstep.
        assert len(set(values)) >= 4
        assert fake_app.hits["/api/chat/r1"] == 3

        # With a seeded RNG the values are exactly remaining * uniform(0.8, 1.2), rounded.
        registry(gw).rng = random.Random(42)
        expected_rng = random.Random(42)
        got = [int((await c.get("/api/chat/r1")).headers["retry-after"]) for _ in range(5)]
        assert got == [round(20 * expected_rng.uniform(0.8, 1.2)) for _ in range(5)]

        # Near the end of the cooldown it never says less than 1 s.
        clock.advance(19.9)
        for _ in range(5):
            assert int((await c.get("/api/chat/r1")).headers["retry-after"]) == 1


async def test_open_answer_keeps_the_method_semantics_for_head_and_post(
    fake_app: FakeApp,
) -> None:
    clock = FakeClock(10_000.0)
    fake_app.status_override["/api/chat/r1"] = (500, {"error": "x"})
    async with (
        run_gateway(chat_config(fake_app.url), monotonic=clock) as gw,
        httpx.AsyncClient(base_url=gw.url) as c,
    ):
        await get_many(c, "/api/chat/r1", 3)
        r = await c.post("/api/chat/r1", content=b'{"text":"hi"}')
        assert_circuit_open(r)
        h = await c.head("/api/chat/r1")
        assert h.status_code == 503
        assert h.headers["x-edge-breaker"] == "open"
        assert fake_app.hits["/api/chat/r1"] == 3
        assert state(gw) == "open"


async def test_polling_storm_while_open_never_reaches_the_app(fake_app: FakeApp) -> None:
    clock = FakeClock(10_000.0)
    fake_app.status_override["/api/chat/r1"] = (500, {"error": "x"})
    async with (
        run_gateway(chat_config(fake_app.url, cooldown="30s"), monotonic=clock) as gw,
        httpx.AsyncClient(base_url=gw.url, timeout=30) as c,
    ):
        await get_many(c, "/api/chat/r1", 3)
        storm = await asyncio.gather(*(c.get(f"/api/chat/r{i % 5}") for i in range(200)))
        assert all(r.status_code == 503 for r in storm)
        retry = [int(r.headers["retry-after"]) for r in storm]
        assert all(24 <= v <= 36 for v in retry)
        # Spread over the jitter range rather than one instant.
        assert len(set(retry)) >= 8
        assert sum(fake_app.hits.values()) == 3


# --------------------------------------------------------------------------- half-open


async def test_half_open_probe_success_closes(fake_app: FakeApp) -> None:
    clock = FakeClock(10_000.0)
    fake_app.status_override["/api/chat/r1"] = (500, {"error": "x"})
    async with (
        run_gateway(chat_config(fake_app.url, cooldown="30s"), monotonic=clock) as gw,
        httpx.AsyncClient(base_url=gw.url) as c,
    ):
        await get_many(c, "/api/chat/r1", 3)
        clock.advance(29.5)
        assert_circuit_open(await c.get("/api/chat/r1"))
        clock.advance(0.5)
        assert state(gw) == "half_open"
        del fake_app.status_override["/api/chat/r1"]
        probe = await c.get("/api/chat/r1")
        assert probe.status_code == 200
        assert state(gw) == "closed"
        rs = await get_many(c, "/api/chat/r1", 5)
        assert all(r.status_code == 200 for r in rs)
        assert fake_app.hits["/api/chat/r1"] == 3 + 1 + 5
        # Back to the base cooldown after closing.
        assert registry(gw).status()["chat"]["cooldown_s"] == 30


async def test_half_open_lets_only_the_probes_through(fake_app: FakeApp) -> None:
    """While the one probe is in flight (a hanging upstream), others are shed; the probe
    times out, which re-opens the breaker with the cooldown doubled."""
    clock = FakeClock(10_000.0)
    async with (
        run_gateway(
            chat_config(fake_app.url, failure_threshold=1, cooldown="10s", half_open_probes=1),
            monotonic=clock,
        ) as gw,
        httpx.AsyncClient(base_url=gw.url, timeout=5) as c,
    ):
        assert (await c.get("/hang")).status_code == 504
        assert state(gw) == "open"
        clock.advance(10)
        probe = asyncio.ensure_future(c.get("/hang"))
        while fake_app.hits["/hang"] < 2:
            await asyncio.sleep(0.005)
        assert registry(gw).status()["chat"]["probes_in_flight"] == 1
        shed = await c.get("/api/chat/r1")
        assert_circuit_open(shed)
        assert fake_app.hits["/api/chat/r1"] == 0
        assert (await probe).status_code == 504
        st = registry(gw).status()["chat"]
        assert st["state"] == "open"
        assert st["reason"] == "probe_failed"
        assert st["cooldown_s"] == 20
        assert st["retry_in_s"] == 20


async def test_probe_failure_reopens_with_doubled_cooldown_up_to_max(fake_app: FakeApp) -> None:
    clock = FakeClock(10_000.0)
    fake_app.status_override["/api/chat/r1"] = (500, {"error": "x"})
    cfg = chat_config(fake_app.url, cooldown="10s", max_cooldown="25s", jitter=0)
    async with (
        run_gateway(cfg, monotonic=clock) as gw,
        httpx.AsyncClient(base_url=gw.url) as c,
    ):
        await get_many(c, "/api/chat/r1", 3)
        assert (await c.get("/api/chat/r1")).headers["retry-after"] == "10"
        hits = fake_app.hits["/api/chat/r1"]

        clock.advance(10)
        assert (await c.get("/api/chat/r1")).status_code == 500  # the probe, failed
        r = await c.get("/api/chat/r1")
        assert_circuit_open(r)
        assert r.headers["retry-after"] == "20"

        clock.advance(19)
        assert_circuit_open(await c.get("/api/chat/r1"))
        clock.advance(1)
        assert (await c.get("/api/chat/r1")).status_code == 500  # second probe, failed
        assert (await c.get("/api/chat/r1")).headers["retry-after"] == "25"  # capped

        clock.advance(25)
        del fake_app.status_override["/api/chat/r1"]
        assert (await c.get("/api/chat/r1")).status_code == 200
        assert state(gw) == "closed"
        assert fake_app.hits["/api/chat/r1"] == hits + 3

        # A new failure streak starts again from the base cooldown.
        fake_app.status_override["/api/chat/r1"] = (500, {"error": "x"})
        await get_many(c, "/api/chat/r1", 3)
        assert (await c.get("/api/chat/r1")).headers["retry-after"] == "10"


async def test_several_probes_must_all_succeed(fake_app: FakeApp) -> None:
    clock = FakeClock(10_000.0)
    fake_app.status_override["/api/chat/r1"] = (500, {"error": "x"})
    async with (
        run_gateway(chat_config(fake_app.url, half_open_probes=3), monotonic=clock) as gw,
        httpx.AsyncClient(base_url=gw.url) as c,
    ):
        await get_many(c, "/api/chat/r1", 3)
        clock.advance(30)
        del fake_app.status_override["/api/chat/r1"]
        assert (await c.get("/api/chat/r1")).status_code == 200
        assert (await c.get("/api/chat/r1")).status_code == 200
        assert state(gw) == "half_open"
        assert (await c.get("/api/chat/r1")).status_code == 200
        assert state(gw) == "closed"


# --------------------------------------------------------------------------- Retry-After


class RetryAfterApp:
    """An upstream answering every request with the status and headers the test sets."""

    def __init__(self) -> None:
        self.status = 200
        self.headers: dict[str, str] = {}
        self.hits = 0
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.hits += 1
        return web.json_response({"n": self.hits}, status=self.status, headers=self.headers)


@pytest.fixture
async def ra_app() -> AsyncIterator[RetryAfterApp]:
    app = RetryAfterApp()
    a = web.Application()
    a.router.add_route("*", "/{tail:.*}", app.handle)
    runner = web.AppRunner(a, access_log=None)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    await web.SockSite(runner, sock).start()
    app.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    yield app
    await runner.cleanup()


async def test_upstream_429_retry_after_opens_the_group_for_that_long(
    ra_app: RetryAfterApp,
) -> None:
    clock = FakeClock(10_000.0)
    async with (
        run_gateway(chat_config(ra_app.url, cooldown="5s", jitter=0), monotonic=clock) as gw,
        httpx.AsyncClient(base_url=gw.url) as c,
    ):
        ra_app.status, ra_app.headers = 429, {"Retry-After": "40"}
        r = await c.get("/api/chat/r1")
        # The app's own 429 reaches the client, with its Retry-After.
        assert r.status_code == 429
        assert r.headers["retry-after"] == "40"
        assert state(gw) == "open"
        ra_app.status, ra_app.headers = 200, {}
        shed = await c.get("/api/qa/r2")
        assert_circuit_open(shed)
        assert shed.headers["retry-after"] == "40"
        clock.advance(39)
        assert_circuit_open(await c.get("/api/chat/r1"))
        clock.advance(1)
        assert (await c.get("/api/chat/r1")).status_code == 200
        assert state(gw) == "closed"
        assert ra_app.hits == 2


async def test_per_user_429s_need_not_open_the_group(ra_app: RetryAfterApp) -> None:
    clock = FakeClock(10_000.0)
    cfg = chat_config(ra_app.url, cooldown="5s", jitter=0, count_429=False)
    async with (
        run_gateway(cfg, monotonic=clock) as gw,
        httpx.AsyncClient(base_url=gw.url) as c,
    ):
        ra_app.status, ra_app.headers = 429, {"Retry-After": "40"}
        for _ in range(10):  # one client hammering its own per-user limit in the app
            r = await c.get("/api/chat/r1")
            assert r.status_code == 429
            assert r.headers["retry-after"] == "40"
        assert state(gw) == "closed"
        ra_app.status, ra_app.headers = 200, {}
        assert (await c.get("/api/qa/r2")).status_code == 200


async def test_upstream_503_http_date_retry_after_and_cap_at_max_cooldown(
    ra_app: RetryAfterApp,
) -> None:
    clock = FakeClock(10_000.0)
    wall = FakeClock(FIXED_NOW)
    cfg = chat_config(ra_app.url, max_cooldown="60s", jitter=0)
    async with (
        run_gateway(cfg, monotonic=clock, clock=wall) as gw,
        httpx.AsyncClient(base_url=gw.url) as c,
    ):
        date = email.utils.formatdate(wall() + 45, usegmt=True)
        ra_app.status, ra_app.headers = 503, {"Retry-After": date}
        assert (await c.get("/api/chat/r1")).status_code == 503
        assert state(gw) == "open"
        assert (await c.get("/api/chat/r1")).headers["retry-after"] == "45"

        clock.advance(45)
        ra_app.status, ra_app.headers = 429, {"Retry-After": "86400"}
        assert (await c.get("/api/chat/r1")).status_code == 429  # the probe
        assert (await c.get("/api/chat/r1")).headers["retry-after"] == "60"
        assert registry(gw).status()["chat"]["reason"] == "upstream_429_retry_after"


async def test_429_without_retry_after_is_an_ordinary_failure(ra_app: RetryAfterApp) -> None:
    clock = FakeClock(10_000.0)
    async with (
        run_gateway(chat_config(ra_app.url), monotonic=clock) as gw,
        httpx.AsyncClient(base_url=gw.url) as c,
    ):
        ra_app.status = 429
        await get_many(c, "/api/chat/r1", 2)
        assert state(gw) == "closed"
        await c.get("/api/chat/r1")
        assert state(gw) == "open"
        assert registry(gw).status()["chat"]["reason"] == "consecutive_failures"


# --------------------------------------------------------------------------- negative cache


async def test_negative_cache_answers_repeated_4xx_per_caller(fake_app: FakeApp) -> None:
    clock = FakeClock(10_000.0)
    cfg = chat_config(fake_app.url, negative_ttl="30s")
    fake_app.status_override["/api/chat/gone"] = (404, {"error": "webinar_not_found"})
    alice = {"authorization": "Bearer alice-token"}
    bob = {"authorization": "Bearer bob-token"}
    async with (
        run_gateway(cfg, monotonic=clock) as gw,
        httpx.AsyncClient(base_url=gw.url) as c,
    ):
        first = await c.get("/api/chat/gone?since=5", headers=alice)
        assert first.status_code == 404
        assert "x-edge-negative-cache" not in first.headers
        for _ in range(20):
            r = await c.get("/api/chat/gone?since=5", headers=alice)
            assert r.status_code == 404
            assert r.json() == {"error": "webinar_not_found"}
            assert r.headers["content-type"].startswith("application/json")
            assert r.headers["x-edge-negative-cache"] == "hit"
        assert fake_app.hits["/api/chat/gone"] == 1

        # Another caller, another query, or a POST still reach the app.
        assert (
            "x-edge-negative-cache"
            not in (await c.get("/api/chat/gone?since=5", headers=bob)).headers
        )
        assert (
            "x-edge-negative-cache"
            not in (await c.get("/api/chat/gone?since=6", headers=alice)).headers
        )
        for _ in range(2):
            await c.post("/api/chat/gone", content=b"{}", headers=alice)
        assert fake_app.hits["/api/chat/gone"] == 5

        # After negative_ttl the app is asked again (and answers 200 now).
        clock.advance(30)
        del fake_app.status_override["/api/chat/gone"]
        r = await c.get("/api/chat/gone?since=5", headers=alice)
        assert r.status_code == 200
        assert fake_app.hits["/api/chat/gone"] == 6
        # 4xx never moved the breaker.
        assert state(gw) == "closed"
        metrics = (await c.get(gw.admin_url + "/metrics")).text
        assert metric(metrics, "edge_negative_cache_hits_total", route="chat_poll") == 20


async def test_negative_cache_only_keeps_the_configured_statuses(fake_app: FakeApp) -> None:
    clock = FakeClock(10_000.0)
    cfg = chat_config(fake_app.url, negative_ttl="30s", negative_statuses=[404])
    async with (
        run_gateway(cfg, monotonic=clock) as gw,
        httpx.AsyncClient(base_url=gw.url) as c,
    ):
        fake_app.status_override["/api/chat/r1"] = (400, {"error": "bad_since"})
        await get_many(c, "/api/chat/r1", 3)
        fake_app.status_override["/api/chat/r1"] = (403, {"error": "forbidden"})
        await get_many(c, "/api/chat/r1", 3)
        assert fake_app.hits["/api/chat/r1"] == 6
        # Off by default (negative_ttl: 0).
    async with (
        run_gateway(chat_config(fake_app.url), monotonic=clock) as gw,
        httpx.AsyncClient(base_url=gw.url) as c,
    ):
        fake_app.status_override["/api/chat/r2"] = (404, {"error": "nope"})
        await get_many(c, "/api/chat/r2", 3)
        assert fake_app.hits["/api/chat/r2"] == 3


# --------------------------------------------------------------------------- visibility


async def test_client_config_switches_to_degraded_while_open(fake_app: FakeApp) -> None:
    clock = FakeClock(10_000.0)
    fake_app.status_override["/api/chat/r1"] = (500, {"error": "x"})
    async with (
        run_gateway(chat_config(fake_app.url), monotonic=clock) as gw,
        httpx.AsyncClient(base_url=gw.url) as c,
    ):

        async def mode() -> str:
            return str((await c.get("/_edge/client-config")).json()["mode"])

        assert await mode() == "normal"
        await get_many(c, "/api/chat/r1", 3)
        assert await mode() == "degraded"
        cc = (await c.get("/_edge/client-config")).json()
        assert cc["chat_fallback_interval_ms"] == 15000
        clock.advance(30)
        assert await mode() == "degraded"  # half-open is not healthy yet
        del fake_app.status_override["/api/chat/r1"]
        await c.get("/api/chat/r1")
        assert await mode() == "normal"


async def test_readyz_and_status_show_the_breaker_state(fake_app: FakeApp) -> None:
    clock = FakeClock(10_000.0)
    fake_app.status_override["/api/chat/r1"] = (500, {"error": "x"})
    async with (
        run_gateway(chat_config(fake_app.url), monotonic=clock) as gw,
        httpx.AsyncClient(base_url=gw.url) as c,
    ):
        ready = (await c.get(gw.admin_url + "/readyz")).json()
        assert ready["checks"]["breakers"]["chat"]["state"] == "closed"
        await get_many(c, "/api/chat/r1", 3)

        r = await c.get(gw.admin_url + "/readyz")
        # An open breaker is upstream trouble, not this replica's: it stays ready, else
        # every replica would leave the load balancer at once.
        assert r.status_code == 200
        chat = r.json()["checks"]["breakers"]["chat"]
        assert chat["state"] == "open"
        assert chat["reason"] == "consecutive_failures"
        assert chat["retry_in_s"] == 30

        status = (await c.get(gw.admin_url + "/_edge/status")).json()
        assert status["degraded"] is True
        assert status["breakers"]["chat"]["state"] == "open"
        assert status["breakers"]["chat"]["opened_total"] == 1

        clock.advance(30)
        status = (await c.get(gw.admin_url + "/_edge/status")).json()
        assert status["breakers"]["chat"]["state"] == "half_open"


def metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        m = re.match(r"^([a-z_]+)(?:\{(.*)\})? (\S+)$", line)
        if m and m.group(1) == name:
            got = ",".join(sorted((m.group(2) or "").split(","))) if m.group(2) else ""
            if got == want:
                return float(m.group(3))
    raise AssertionError(f"{name}{{{want}}} not in metrics")


async def test_metrics_follow_the_state(fake_app: FakeApp) -> None:
    clock = FakeClock(10_000.0)
    fake_app.status_override["/api/chat/r1"] = (500, {"error": "x"})
    async with (
        run_gateway(chat_config(fake_app.url), monotonic=clock) as gw,
        httpx.AsyncClient(base_url=gw.url) as c,
    ):

        async def scrape() -> str:
            return (await c.get(gw.admin_url + "/metrics")).text

        m = await scrape()
        assert metric(m, "edge_breaker_state", group="chat") == 0
        await get_many(c, "/api/chat/r1", 3)
        await get_many(c, "/api/chat/r1", 4)
        await c.get("/api/qa/r1")
        m = await scrape()
        assert metric(m, "edge_breaker_state", group="chat") == 2
        assert metric(m, "edge_breaker_transitions_total", group="chat", to="open") == 1
        assert metric(m, "edge_breaker_shed_total", group="chat") == 5
        assert metric(m, "edge_requests_total", route="chat_poll", method="GET", status="503") == 4

        clock.advance(30)
        await c.get(gw.admin_url + "/_edge/status")  # any look at the state moves it on
        m = await scrape()
        assert metric(m, "edge_breaker_state", group="chat") == 1
        assert metric(m, "edge_breaker_transitions_total", group="chat", to="half_open") == 1

        del fake_app.status_override["/api/chat/r1"]
        await c.get("/api/chat/r1")
        m = await scrape()
        assert metric(m, "edge_breaker_state", group="chat") == 0
        assert metric(m, "edge_breaker_transitions_total", group="chat", to="closed") == 1


async def test_state_gauge_turns_half_open_without_traffic(fake_app: FakeApp) -> None:
    """A real (short) cooldown on the real clock: the breaker's own timer moves the
    gauge to half-open when nobody asks."""
    # 2 s: long enough that a busy machine reads the open state before the timer fires.
    cfg = chat_config(fake_app.url, failure_threshold=1, cooldown="2s")
    fake_app.status_override["/api/chat/r1"] = (500, {"error": "x"})
    async with (
        run_gateway(cfg) as gw,
        httpx.AsyncClient(base_url=gw.url) as c,
    ):
        await c.get("/api/chat/r1")

        async def gauge() -> float:
            text = (await c.get(gw.admin_url + "/metrics")).text
            return metric(text, "edge_breaker_state", group="chat")

        assert await gauge() == 2
        for _ in range(1000):
            if await gauge() == 1:
                break
            await asyncio.sleep(0.02)
        assert await gauge() == 1


# --------------------------------------------------------------------------- with the cache


def cached_chat_config(upstream: str) -> GatewayConfig:
    """chat_poll as docs/breaker.md recommends: a 1 s micro-cache with stale_if_error
    outside the breaker (public here because these tests run without auth)."""
    return make_config(
        upstream,
        routes=[
            {
                "name": "chat_poll",
                "match": {"methods": ["GET"], "path": "/api/chat/{room}"},
                "upstream": "app",
                "auth": "off",
                "cache": {"ttl": "1s", "stale_if_error": "5m", "public": True},
                "breaker": {"group": "chat", "failure_threshold": 3, "cooldown": "30s"},
            },
            {
                "name": "default",
                "match": {"path": "/{path:path}"},
                "upstream": "app",
                "auth": "off",
            },
        ],
    )


async def test_open_breaker_behind_the_cache_serves_stale_copies(fake_app: FakeApp) -> None:
    clock = FakeClock(10_000.0)  # one clock for both: the cache ages entries on the wall clock
    async with (
        run_gateway(cached_chat_config(fake_app.url), monotonic=clock, clock=clock) as gw,
        httpx.AsyncClient(base_url=gw.url) as c,
    ):
        good = await c.get("/api/chat/r1")
        assert good.status_code == 200
        fake_app.status_override["/api/chat/r1"] = (500, {"error": "db down"})
        fake_app.status_override["/api/chat/r2"] = (500, {"error": "db down"})
        clock.advance(2)  # past the 1 s ttl
        # The app fails: each refresh attempt reaches it and fails, the client still gets
        # the last good copy, and the failures open the breaker.
        for _ in range(3):
            r = await c.get("/api/chat/r1")
            assert r.status_code == 200
            assert r.json() == good.json()
            assert "stale-if-error" in r.headers["cache-status"]
        assert state(gw) == "open"
        hits = fake_app.hits["/api/chat/r1"]
        # Open: the breaker answers the refresh at once and the cache serves stale.
        for _ in range(10):
            r = await c.get("/api/chat/r1")
            assert r.status_code == 200
            assert r.json() == good.json()
            assert "fwd-status=503" in r.headers["cache-status"]
        assert fake_app.hits["/api/chat/r1"] == hits
        # Nothing cached for this room: the client gets the breaker's 503.
        shed = await c.get("/api/chat/r2")
        assert_circuit_open(shed)
        assert fake_app.hits["/api/chat/r2"] == 0


async def test_micro_cache_collapses_a_polling_storm_into_one_upstream_call(
    fake_app: FakeApp,
) -> None:
    clock = FakeClock(10_000.0)
    async with (
        run_gateway(cached_chat_config(fake_app.url), monotonic=clock, clock=clock) as gw,
        httpx.AsyncClient(base_url=gw.url, timeout=30) as c,
    ):
        polls = await asyncio.gather(*(c.get("/api/chat/r1?_=" + str(i)) for i in range(200)))
        assert all(r.status_code == 200 for r in polls)
        assert fake_app.hits["/api/chat/r1"] == 1
        # One second later: one more call for the next 200 polls.
        clock.advance(1.5)
        polls = await asyncio.gather(*(c.get("/api/chat/r1") for _ in range(200)))
        assert all(r.status_code == 200 for r in polls)
        assert fake_app.hits["/api/chat/r1"] == 2
        assert state(gw) == "closed"


async def test_after_the_cooldown_one_probe_refreshes_for_all_waiting_polls(
    fake_app: FakeApp,
) -> None:
    clock = FakeClock(10_000.0)
    async with (
        run_gateway(cached_chat_config(fake_app.url), monotonic=clock, clock=clock) as gw,
        httpx.AsyncClient(base_url=gw.url, timeout=30) as c,
    ):
        await c.get("/api/chat/r1")
        fake_app.status_override["/api/chat/r1"] = (503, {"error": "overloaded"})
        clock.advance(2)
        for _ in range(3):
            await c.get("/api/chat/r1")
        assert state(gw) == "open"
        clock.advance(30)
        del fake_app.status_override["/api/chat/r1"]
        hits = fake_app.hits["/api/chat/r1"]
        polls = await asyncio.gather(*(c.get("/api/chat/r1") for _ in range(100)))
        assert all(r.status_code == 200 for r in polls)
        # The single flight sends one request: the breaker's probe, which closes it.
        assert fake_app.hits["/api/chat/r1"] == hits + 1
        assert state(gw) == "closed"
