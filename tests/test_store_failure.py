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

import pytest

from gateway.store import StoreError
from gateway.store.base import CallBudget
from gateway.store.redis import RedisStore
from tests.conftest import PrivateRedis
from tests.fakes.stats_app import FakeClock
from tests.helpers import Running
from tests.test_heartbeat import config

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

    budget = CallBudget(0.01, 0.05, lambda: 0.0)
    with pytest.raises(TimeoutError):
        async with budget:
            await hang()
    assert budget.expired
    # A loop whose recent lag is huge still ends at the cap.
    budget = CallBudget(0.01, 0.05, lambda: 10.0)
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
    async with CallBudget(5.0, 5.0, lambda: 0.0):
        await aw


async def test_backoff_probe_ends_the_outage_and_each_transition_logs_once(
    private_redis_server: PrivateRedis, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
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


