"""The store contract: the same tests against memory:// and the real Redis."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway.store import Script, Store, StoreError
from gateway.store.memory import MemoryData, MemoryStore
from gateway.store.redis import RedisStore
from tests.fakes.clock import FakeClock


@pytest.fixture(params=["memory", "redis"])
async def store(
    request: pytest.FixtureRequest, redis_url: str
) -> AsyncIterator[tuple[Store, FakeClock | None]]:
    if request.param == "memory":
        clock = FakeClock(1_000_000.0)
        yield MemoryStore("t:", clock=clock), clock
        return
    s = RedisStore(redis_url, "t:", timeout=0.5)
    await s.start()
    yield s, None
    await s.close()


def _counter_py(data: MemoryData, keys: list[str], args: list[Any], now_ms: int) -> Any:
    a = data.incr(keys[0], int(args[0]))
    b = data.incr(keys[1], int(args[0]))
    return [a, b]


COUNTER = Script(
    "test_two_counters",
    "return {redis.call('INCRBY', KEYS[1], ARGV[1]), redis.call('INCRBY', KEYS[2], ARGV[1])}",
    _counter_py,
)


async def test_get_set_delete(store: tuple[Store, FakeClock | None]) -> None:
    s, _ = store
    assert await s.get("a") is None
    assert await s.set("a", b"\x00bytes\xff")
    assert await s.get("a") == b"\x00bytes\xff"
    assert await s.delete("a", "missing") == 1
    assert await s.get("a") is None


async def test_set_nx_is_a_lock(store: tuple[Store, FakeClock | None]) -> None:
    s, _ = store
    assert await s.set("lock", b"me", 10, nx=True)
    assert not await s.set("lock", b"you", 10, nx=True)
    assert not await s.delete_if_equals("lock", b"you")
    assert await s.get("lock") == b"me"
    assert await s.delete_if_equals("lock", b"me")
    assert await s.set("lock", b"you", 10, nx=True)


async def test_ttl_expires(store: tuple[Store, FakeClock | None]) -> None:
    s, clock = store
    await s.set("k", b"v", ttl=0.05)
    assert await s.get("k") == b"v"
    if clock is not None:
        clock.advance(0.06)
    else:
        # Redis keeps its own clock; ask it instead of sleeping.
        assert isinstance(s, RedisStore)
        pttl = await s.client.pttl("t:k")
        assert 0 < pttl <= 50
        return
    assert await s.get("k") is None


async def test_incr_sets_ttl_once(store: tuple[Store, FakeClock | None]) -> None:
    s, clock = store
    assert await s.incr("n", 2, ttl=10) == 2
    assert await s.incr("n", 3, ttl=10) == 5
    if isinstance(s, RedisStore):
        assert 9000 < await s.client.pttl("t:n") <= 10000
    else:
        assert clock is not None
        clock.advance(11)
        assert await s.incr("n", 1) == 1


async def test_script_is_atomic_and_prefixed(store: tuple[Store, FakeClock | None]) -> None:
    s, _ = store
    tag = Store.tag("w1")
    assert await s.run(COUNTER, [f"c:a:{tag}", f"c:b:{tag}"], [2]) == [2, 2]
    assert await s.run(COUNTER, [f"c:a:{tag}", f"c:b:{tag}"], [1]) == [3, 3]
    if isinstance(s, RedisStore):
        assert await s.client.get("t:c:a:{w1}") == b"3"


async def test_memory_namespaces_do_not_evict_each_other() -> None:
    s = MemoryStore("t:", max_keys=1000, clock=FakeClock(1_000_000.0))
    await s.set("rl:{user}", b"spent", ttl=60)
    # A flood of client-chosen keys in another namespace (made-up webinar ids)...
    for i in range(5000):
        await s.set(f"hb:{{w{i}}}:seen", b"x", ttl=60)
    # ...cannot push rate-limit state out of its own keyspace.
    assert await s.get("rl:{user}") == b"spent"
    with pytest.raises(ValueError, match="namespaces"):
        await s.run(COUNTER, ["rl:{x}", "hb:{x}"], [1])


def test_tag_cannot_be_escaped() -> None:
    assert Store.tag("x}{y") == "{x)(y}"


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_redis_down_raises_store_error_and_backs_off() -> None:
    now = [100.0]
    errors: list[tuple[str, str]] = []
    s = RedisStore(
        f"redis://127.0.0.1:{_closed_port()}/0",
        timeout=0.2,
        failure_threshold=2,
        backoff=5,
        clock=lambda: now[0],
        on_error=lambda op, kind: errors.append((op, kind)),
    )
    for _ in range(2):
        with pytest.raises(StoreError) as exc:
            await s.get("x")
        assert exc.value.kind == "connection"
    assert not s.health.ok
    # Backing off: fails at once without touching the network.
    with pytest.raises(StoreError) as exc:
        await s.get("x")
    assert exc.value.kind == "backoff"
    assert errors[-1] == ("get", "backoff")
    now[0] += 6
    with pytest.raises(StoreError) as exc:
        await s.get("x")
    assert exc.value.kind == "connection"
    await s.close()


async def test_redis_timeout_is_bounded(private_redis: str) -> None:
    s = RedisStore(private_redis, timeout=0.05)
    admin = RedisStore(private_redis, timeout=2)
    # CLIENT PAUSE holds every client's commands on this private server; the call must
    # give up at store.timeout instead of waiting for the server.
    # The pause is long (5 s) and the bound generous (2.5 s) so a busy machine cannot
    # make the call look as if it had waited for the server: what is checked is that it
    # gives up long before the server answers, not how precisely it keeps 50 ms.
    await admin.client.execute_command("CLIENT", "PAUSE", "5000", "ALL")
    t0 = time.perf_counter()
    with pytest.raises(StoreError) as exc:
        await s.get("x")
    assert exc.value.kind == "timeout"
    assert time.perf_counter() - t0 < 2.5
    await s.close()
    await admin.close()


async def test_start_warns_when_redis_is_older_than_the_scripts_need(
    redis_url: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.store")
    store = RedisStore(redis_url, "t:", timeout=1.0)
    await store.start()  # the real server (7.x): nothing to say
    await store.close()
    assert not [r for r in caplog.records if "older than" in r.getMessage()]

    async def old_info(section: str) -> dict[str, Any]:
        assert section == "server"
        return {"redis_version": "6.0.9"}

    store = RedisStore(redis_url, "t:", timeout=1.0)
    monkeypatch.setattr(store.client, "info", old_info)
    await store.start()
    await store.close()
    (line,) = [r.getMessage() for r in caplog.records if "older than" in r.getMessage()]
    assert line.startswith("Redis 6.0.9 is older than 6.2")
