"""Store failures and CPU pressure (issue 15): with a real Redis of the test's own that is
frozen (SIGSTOP), killed and restarted, the default `on_failure: local` keeps every
answer 2xx and the app's load bounded; a busy event loop is not a store failure; the
back-off lets a probe through; the outage and the recovery are logged once each.

Time that the policies read is injected (FakeClock); waits for something the gateway
reaches on its own (the store answering again) poll a condition with a deadline."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest

from gateway.store import StoreError
from gateway.store.base import CallBudget
from gateway.store.redis import RedisStore
from tests.conftest import PrivateRedis
from tests.fakes.app import FakeApp
from tests.fakes.clock import FIXED_NOW, FakeClock
from tests.fakes.identity import AUTH, bearer
from tests.fakes.stats_app import StatsApp
from tests.helpers import Running, make_config, run_gateway
from tests.test_cache import all_in_flight
from tests.test_heartbeat import W1, W2, config, ping, user

PING = "/api/webinars/{w}/presence/ping"


def sample(gw: Running, name: str, **labels: str) -> float:
    return gw.app.rt.metrics.registry.get_sample_value(name, labels) or 0.0


async def until(cond: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    """Wait for a state the gateway reaches on its own (not for a TTL)."""
    deadline = time.monotonic() + timeout
    while not await cond():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


def spin(seconds: float) -> None:
    """Keep the event loop busy (CPU, not sleep): what a loaded machine does to it."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def hb_config(app_url: str, redis: str, **store: Any) -> Any:
    return config(
        app_url,
        redis,
        store_extra={
            "timeout": "100ms",
            "failure_threshold": 2,
            "backoff": "30s",
            "probe_interval": "20ms",
            **store,
        },
    )


# --------------------------------------------------------------------------- heartbeats


async def test_frozen_then_restarted_redis_costs_the_app_nothing_more(
    fake_app: FakeApp,
    private_redis_server: PrivateRedis,
    clock: FakeClock,
) -> None:
    """The issue's fault run, small: viewers ping through a Redis that is frozen, then
    killed and restarted empty. Every answer is 2xx; each viewer reaches the app once,
    plus once for a viewer that first shows up during the outage; the restarted
    (empty) store does not send everyone to the app again."""
    viewers = [user(i) for i in range(6)]
    path = PING.format(w=W1)
    cfg = hb_config(fake_app.url, private_redis_server.url)
    async with run_gateway(cfg, clock=clock) as gw, httpx.AsyncClient(timeout=10) as c:
        statuses = [(await ping(c, gw, W1, v, clock)).status_code for v in viewers[:5]]
        assert fake_app.hits[path] == 5

        private_redis_server.freeze()
        for _ in range(3):
            clock.advance(1)
            for v in viewers:  # viewers[5] is new: forwarded once, by this process
                statuses.append((await ping(c, gw, W1, v, clock)).status_code)
        assert fake_app.hits[path] == 6
        assert not gw.app.rt.store.health.ok

        private_redis_server.stop()  # SIGKILL of the frozen server: its data is gone
        private_redis_server.start()

        async def recovered() -> bool:
            clock.advance(1)
            statuses.append((await ping(c, gw, W1, viewers[0], clock)).status_code)
            return gw.app.rt.store.health.ok

        await until(recovered)
        clock.advance(1)
        for v in viewers:
            statuses.append((await ping(c, gw, W1, v, clock)).status_code)

    assert set(statuses) == {200}
    assert fake_app.hits[path] == 6
    outcome = "local_forwarded"
    assert sample(gw, "edge_heartbeats_total", route="presence_ping", outcome=outcome) == 1
    assert sample(gw, "edge_store_fallbacks_total", policy="heartbeat", mode="local") >= 18
    assert sample(gw, "edge_store_transitions_total", to="down") == 1
    assert sample(gw, "edge_store_transitions_total", to="up") == 1


async def test_local_mode_replays_negative_answers_and_retries_failures(
    fake_app: FakeApp,
    private_redis_server: PrivateRedis,
    clock: FakeClock,
) -> None:
    """While the store is down, a viewer the app refused (404) keeps getting the refusal
    from this process, and a viewer whose forward failed (5xx) is forwarded again."""
    cfg = hb_config(fake_app.url, private_redis_server.url)
    async with run_gateway(cfg, clock=clock) as gw, httpx.AsyncClient(timeout=10) as c:
        private_redis_server.stop()
        fake_app.status_override[PING.format(w=W2)] = (404, {"error": "not_registered"})
        first = await ping(c, gw, W2, user(1), clock)
        again = await ping(c, gw, W2, user(1), clock)
        assert (first.status_code, again.status_code) == (404, 404)
        assert again.content == first.content
        assert fake_app.hits[PING.format(w=W2)] == 1

        fake_app.status_override[PING.format(w=W1)] = (502, {"error": "down"})
        assert (await ping(c, gw, W1, user(2), clock)).status_code == 502
        del fake_app.status_override[PING.format(w=W1)]
        assert (await ping(c, gw, W1, user(2), clock)).status_code == 200
        assert (await ping(c, gw, W1, user(2), clock)).status_code == 200
        assert fake_app.hits[PING.format(w=W1)] == 2
    assert sample(gw, "edge_heartbeats_total", route="presence_ping", outcome="local_negative") == 1


@pytest.mark.parametrize("mode", ["closed", "local"])
async def test_busy_loop_with_healthy_redis_is_not_a_store_failure(
    fake_app: FakeApp,
    redis_url: str,
    mode: str,
    clock: FakeClock,
) -> None:
    """Heartbeats in flight while the loop is kept busy far past store.timeout: the
    store answered, only late to be read. No 503 in closed mode, no extra forward."""
    # 150 ms, spun far past (0.6 s): a tighter budget is one a busy machine's Redis can
    # miss for real (the server itself descheduled), which is not what this is about.
    cfg = config(fake_app.url, redis_url, store_extra={"timeout": "150ms", "on_failure": mode})
    n = 40
    async with run_gateway(cfg, clock=clock) as gw, httpx.AsyncClient(timeout=10) as c:
        await asyncio.gather(*(ping(c, gw, W1, user(i), clock) for i in range(n)))
        loop = asyncio.get_running_loop()
        for delay in (0.0, 0.002, 0.005, 0.01):
            clock.advance(1)
            # Busy somewhere in the middle of the requests' store calls.
            handle = loop.call_later(delay, spin, 0.6)
            resps = await asyncio.gather(*(ping(c, gw, W1, user(i), clock) for i in range(n)))
            handle.cancel()
            assert {r.status_code for r in resps} == {200}
        health = gw.app.rt.store.health
    assert fake_app.hits[PING.format(w=W1)] == n
    assert health.ok
    assert sum(v for k, v in health.counters.items() if ":timeout" in k) == 0


# --------------------------------------------------------------------------- store level


async def test_a_reply_read_late_because_the_loop_was_busy_is_not_a_timeout(
    redis_url: str,
) -> None:
    store = RedisStore(redis_url, "edge:t:", timeout=0.1)
    try:
        await store.set("k", b"v")  # connected and warm
        # However far the call got before the loop went busy (with 3 steps it has sent
        # the command and waits for the reply: asyncio.timeout would cancel it here)...
        for steps in range(6):
            task = asyncio.ensure_future(store.get("k"))
            for _ in range(steps):
                await asyncio.sleep(0)
            spin(0.3)  # ...the reply arrives meanwhile; the 100 ms deadline passes unread
            assert await task == b"v"
        assert store.health.ok
        assert sum(store.health.counters.values()) == 0
    finally:
        await store.close()


async def test_budget_extends_only_for_lateness_and_never_past_its_cap() -> None:
    loop = asyncio.get_running_loop()

    async def hang() -> None:
        await loop.create_future()

    budget = CallBudget(0.01, 0.05)
    with pytest.raises(TimeoutError):
        async with budget:
            await hang()
    assert budget.expired
    # A loop whose recent lag is huge still ends at the cap.
    budget = CallBudget(0.01, 0.05, lambda: 10.0)
    with pytest.raises(TimeoutError):
        async with budget:
            await hang()
    assert budget.expired
    # A loop kept busy far past the cap still ends at the cap.
    budget = CallBudget(0.01, 0.05)
    loop.call_later(0.001, spin, 0.03)
    loop.call_later(0.04, spin, 0.03)
    with pytest.raises(TimeoutError):
        async with budget:
            await hang()
    assert budget.extended
    # Someone else's cancel is theirs, not a timeout.
    task = asyncio.ensure_future(_under_budget(hang()))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def _under_budget(aw: Awaitable[None]) -> None:
    async with CallBudget(5.0, 5.0):
        await aw


async def test_backoff_probe_ends_the_outage_and_each_transition_logs_once(
    private_redis_server: PrivateRedis, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock(FIXED_NOW)
    states: list[bool] = []
    store = RedisStore(
        private_redis_server.url,
        timeout=0.05,
        failure_threshold=2,
        backoff=30.0,
        probe_interval=1.0,
        clock=clock,
        on_state=states.append,
    )
    caplog.set_level(logging.WARNING, logger="gateway.store")
    try:
        await store.set("k", b"v")
        private_redis_server.freeze()
        for _ in range(2):
            with pytest.raises(StoreError) as err:
                await store.get("k")
            assert err.value.kind == "timeout"
        for _ in range(5):  # backing off: no call reaches the store
            with pytest.raises(StoreError) as err:
                await store.get("k")
            assert err.value.kind == "backoff"
        private_redis_server.thaw()
        with pytest.raises(StoreError):
            await store.get("k")  # no probe due yet
        clock.advance(1.0)
        assert await store.get("k") == b"v"  # the probe: back-off over at once
        assert await store.get("k") == b"v"
        assert store.health.ok
    finally:
        await store.close()
    assert states == [False, True]
    lines = [r for r in caplog.records if r.name == "gateway.store"]
    assert [r.getMessage() for r in lines] == ["store unavailable", "store recovered"]
    assert "timeout" in lines[0].__dict__["reason"]
    assert lines[1].__dict__["duration_s"] == 1.0


# --------------------------------------------------------------------------- other policies


def local_cache_config(upstream: str, store_url: str) -> Any:
    """admin_stats with a 10 s cache on a store the test will stop (one failure is enough
    to count it down)."""
    return make_config(
        upstream,
        store={"url": store_url, "timeout": "200ms", "failure_threshold": 1},
        auth=AUTH,
        routes=[
            {
                "name": "admin_stats",
                "match": {"methods": ["GET"], "path": "/api/webinars/{webinar_id}/stats/access"},
                "upstream": "app",
                "auth": "optional",
                "cache": {"ttl": "10s"},
            }
        ],
    )


async def test_cache_local_serves_known_callers_and_forwards_unknown_ones(
    stats: StatsApp, private_redis_server: PrivateRedis
) -> None:
    cfg = local_cache_config(stats.url, private_redis_server.url)
    url = "/api/webinars/w1/stats/access"
    async with run_gateway(cfg, clock=FakeClock(FIXED_NOW)) as gw:
        async with httpx.AsyncClient(timeout=10) as c:
            alice = bearer("alice")
            assert (await c.get(gw.url + url, headers=alice)).status_code == 200
            assert stats.calls == 1
            private_redis_server.stop()
            # alice is known to this process as allowed, the entry is fresh: served here.
            for _ in range(3):
                r = await c.get(gw.url + url, headers=alice)
                assert r.status_code == 200
                assert r.headers["cache-status"].startswith("edge; hit")
            # mallory is not: her own request goes to the app, which refuses her.
            r = await c.get(gw.url + url, headers=bearer("mallory"))
            assert r.status_code == 403
            r = await c.get(gw.url + url, headers=bearer("mallory"))
            assert r.status_code == 403
            assert stats.calls == 2
    assert sample(gw, "edge_store_fallbacks_total", policy="cache", mode="local") >= 4


async def test_cache_local_single_flights_an_unknown_callers_first_check(
    stats: StatsApp, private_redis_server: PrivateRedis
) -> None:
    """Store down: an admin's concurrent first polls still cost one app call (the check
    flight holds in the process), and its answer is served to the others."""
    cfg = local_cache_config(stats.url, private_redis_server.url)
    url = "/api/webinars/w1/stats/access"
    async with run_gateway(cfg, clock=FakeClock(FIXED_NOW)) as gw:
        private_redis_server.stop()
        stats.gate = asyncio.Event()
        async with httpx.AsyncClient(timeout=30) as c:
            tasks = [
                asyncio.ensure_future(c.get(gw.url + url, headers=bearer("alice")))
                for _ in range(10)
            ]
            await asyncio.wait_for(stats.entered.wait(), 10)
            await all_in_flight(gw, 10)
            stats.gate.set()
            rs = await asyncio.gather(*tasks)
    assert [r.status_code for r in rs] == [200] * 10
    assert stats.calls == 1


async def test_rate_limit_local_applies_this_processes_share(
    fake_app: FakeApp, private_redis_server: PrivateRedis
) -> None:
    cfg = make_config(
        fake_app.url,
        store={"url": private_redis_server.url, "timeout": "200ms", "local_processes": 2},
        routes=[
            {
                "name": "rl",
                "match": {"path": "/rl"},
                "upstream": "app",
                "auth": "off",
                "rate_limit": [{"by": "ip", "rate": "1/h", "burst": 6}],
            }
        ],
    )
    async with run_gateway(cfg) as gw, httpx.AsyncClient(timeout=10) as c:
        private_redis_server.stop()
        codes = [(await c.get(gw.url + "/rl")).status_code for _ in range(5)]
    # Two processes share the store: this one admits half the burst while it is down
    # (the last refusal comes from the per-process "blocked until" memory, no store call).
    assert codes == [200, 200, 200, 429, 429]
    assert sample(gw, "edge_store_fallbacks_total", policy="rate_limit", mode="local") == 4
    assert sample(gw, "edge_ratelimit_decisions_total", route="rl", result="limited_cached") == 1


# --------------------------------------------------------------------------- memory bounds


async def test_memory_store_bounds_viewers_not_just_keys() -> None:
    """A webinar's presence set grows with viewers inside one key: its members count
    against store.memory_max_keys, so 5,000 viewers in a 1,000-entry store stay bounded
    (older state is evicted; the newest webinar keeps working)."""
    from gateway.policies.heartbeat.policy import RECORD, _webinar_keys
    from gateway.store.memory import MemoryStore

    clock = FakeClock(FIXED_NOW)
    store = MemoryStore(max_keys=1000, clock=clock)
    for w in range(5):
        keys = _webinar_keys(f"w{w}", "presence_ping")
        for start in range(0, 1000, 100):
            viewers = "\n".join(f"0u:{w}-{i}" for i in range(start, start + 100))
            now = int(clock() * 1000)
            args: list[int | str] = [now, 300_000, now - 300_000, now, 0, 0, 3_600_000, viewers]
            await store.run(RECORD, keys, args)
    assert store.spaces["hb"].size <= 1000
    keys = _webinar_keys("w4", "presence_ping")
    (out,) = [await store.run(RECORD, keys, [1, 300_000, 0, 0, 0, 0, 3_600_000, "0u:4-999"])]
    assert out[1] in (b"0", b"1")


async def test_local_fallback_state_is_bounded_and_exported(
    fake_app: FakeApp,
    private_redis_server: PrivateRedis,
    clock: FakeClock,
) -> None:
    from gateway.policies.heartbeat.policy import LocalMemory

    local = LocalMemory(max_keys=1000)
    for i in range(5000):
        local.put(LocalMemory.key("r", "w", f"u:{i}"), i)
    assert len(local.times) == 1000
    assert local.times.get(LocalMemory.key("r", "w", "u:4999")) == 4999
    assert local.times.get(LocalMemory.key("r", "w", "u:0")) is None

    cfg = hb_config(fake_app.url, private_redis_server.url)
    async with run_gateway(cfg, clock=clock) as gw, httpx.AsyncClient(timeout=10) as c:
        for i in range(3):
            await ping(c, gw, W1, user(i), clock)
        gw.app.rt.export_sizes()
    assert sample(gw, "edge_state_entries", structure="heartbeat_local") == 3
    assert sample(gw, "edge_state_entries", structure="token_cache") == 3


async def test_memory_store_entries_are_exported(fake_app: FakeApp, clock: FakeClock) -> None:
    cfg = hb_config(fake_app.url, "memory://")
    async with run_gateway(cfg, clock=clock) as gw, httpx.AsyncClient(timeout=10) as c:
        for i in range(3):
            await ping(c, gw, W1, user(i), clock)
        gw.app.rt.export_sizes()
        held = sum(d.size for d in gw.app.rt.store.spaces.values())  # type: ignore[attr-defined]
    # The three viewers' presence records, their seen marks and the webinar's index.
    assert held >= 3
    assert sample(gw, "edge_state_entries", structure="memory_store") == held


async def test_a_remote_store_exports_no_memory_entries(
    fake_app: FakeApp, private_redis_server: PrivateRedis, clock: FakeClock
) -> None:
    cfg = hb_config(fake_app.url, private_redis_server.url)
    async with run_gateway(cfg, clock=clock) as gw, httpx.AsyncClient(timeout=10) as c:
        await ping(c, gw, W1, user(0), clock)
        gw.app.rt.export_sizes()
    registry = gw.app.rt.metrics.registry
    labels = {"structure": "memory_store"}
    assert registry.get_sample_value("edge_state_entries", labels) is None
