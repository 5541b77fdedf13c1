"""The script lane (gateway/store/redis/lane.py): StandaloneRedisStore's script calls on
connections of their own. Real Redis servers of the test's own (frozen, their clients
killed), real sockets; what is checked is what a caller of the store sees."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from redis.exceptions import DataError

from gateway.store import Script, StoreError
from gateway.store.redis import RedisStore
from gateway.store.redis.lane import pack
from gateway.store.redis.standalone import StandaloneRedisStore
from tests.conftest import PrivateRedis

ECHO = Script("lane_echo", "return ARGV[1]", lambda _d, _k, a, _n: a[0])
SLOW_ECHO = Script(
    "lane_slow_echo",
    # Busy for ARGV[2] ms of Redis's clock, then the answer: calls overlap in the lane.
    "local t = redis.call('TIME') local until_us = t[1] * 1e6 + t[2] + ARGV[2] * 1000 "
    "repeat t = redis.call('TIME') until t[1] * 1e6 + t[2] >= until_us return ARGV[1]",
    lambda _d, _k, a, _n: a[0],
)


def lane_store(url: str, **kw: float) -> StandaloneRedisStore:
    store = RedisStore(url, "t:", **kw)  # type: ignore[arg-type]
    assert isinstance(store, StandaloneRedisStore)
    return store


@contextlib.asynccontextmanager
async def started(url: str, **kw: float) -> AsyncIterator[StandaloneRedisStore]:
    """A started lane store, closed after."""
    store = lane_store(url, **kw)
    await store.start()
    try:
        yield store
    finally:
        await store.close()


async def script_clients(url: str) -> int:
    """Connections whose last command was a script call (the lane's)."""
    async with aioredis.Redis.from_url(url) as raw:
        return sum(1 for c in await raw.client_list() if c["cmd"] == "evalsha")


async def test_a_call_cut_short_never_hands_its_reply_to_the_next(
    private_redis_server: PrivateRedis,
) -> None:
    # Frozen Redis: the call is written and its budget runs out before the reply. Thawed,
    # that reply arrives on the old connection; the next call must get its own answer.
    async with started(private_redis_server.url, timeout=0.05) as store:
        assert await store.run(ECHO, [], ["warm"]) == b"warm"
        private_redis_server.freeze()
        try:
            with pytest.raises(StoreError):
                await store.run(ECHO, [], ["A"])
        finally:
            private_redis_server.thaw()
        assert await store.run(ECHO, [], ["B"]) == b"B"
        assert await store.run_many(ECHO, [([], ["C"]), ([], ["D"])]) == [b"C", b"D"]


async def test_calls_beyond_its_size_wait_in_line_and_each_gets_its_answer(
    private_redis_server: PrivateRedis,
) -> None:
    url = private_redis_server.url
    async with started(url, timeout=2.0, max_connections=2) as store:
        answers = await asyncio.gather(*(store.run(SLOW_ECHO, [], [f"v{i}", 2]) for i in range(12)))
        assert answers == [f"v{i}".encode() for i in range(12)]
        # No more than two connections carried them.
        assert await script_clients(url) == 2


async def test_a_connection_the_server_closed_while_idle_is_replaced_before_a_call(
    private_redis_server: PrivateRedis,
) -> None:
    # As after a Redis restart or an idle timeout: the next call must not fail on it.
    url = private_redis_server.url
    async with started(url, timeout=1.0) as store:
        assert await store.run(ECHO, [], ["before"]) == b"before"
        async with aioredis.Redis.from_url(url) as raw:
            assert await raw.client_kill_filter(_type="normal", skipme=True) >= 1
        # Wait until this process has seen the close (a real socket event, bounded).
        deadline = time.monotonic() + 5
        while not all(c._reader is None or c._reader.at_eof() for c in store.lane._free):
            assert time.monotonic() < deadline, "the server's close never arrived"
            await asyncio.sleep(0.01)
        assert await store.run(ECHO, [], ["after"]) == b"after"


async def test_script_errors_are_answers_and_leave_the_connection_in_use(
    redis_url: str,
) -> None:
    broken = Script("lane_broken", "return redis.call('NOSUCHCOMMAND')", lambda *_: None)
    async with started(redis_url, timeout=1.0) as store:
        with pytest.raises(StoreError) as err:
            await store.run(broken, [], [])
        assert err.value.kind != "timeout"
        replies = await store.run_many(ECHO, [([], ["x"]), ([], ["y"])])
        assert replies == [b"x", b"y"]
        assert store.lane._open == 1


def test_pack_is_redis_py_s_protocol_and_refuses_what_it_refuses() -> None:
    from redis.asyncio.connection import Connection

    conn = Connection()
    args = ("EVALSHA", "a" * 40, 2, "k:{w}:1", "k:{w}:2", 1_800_000_000_000, 1.5, b"\x00\xff", "é")
    assert pack([args, args]) == b"".join(conn.pack_command(*args)) * 2
    with pytest.raises(DataError):
        pack([("EVALSHA", "a" * 40, 0, None)])


async def test_close_closes_a_connection_in_use_when_its_call_ends(
    private_redis_server: PrivateRedis,
) -> None:
    url = private_redis_server.url
    store = lane_store(url, timeout=2.0)
    await store.start()
    assert await store.run(SLOW_ECHO, [], ["loaded", 0]) == b"loaded"
    slow = asyncio.ensure_future(store.run(SLOW_ECHO, [], ["late", 100]))
    while store.lane._free:  # until the call has taken the (one) connection
        await asyncio.sleep(0)
    await store.close()
    assert await slow == b"late"  # the call in flight still gets its answer
    with pytest.raises(StoreError):
        await store.run(ECHO, [], ["after close"])
    # ...and then its connection is closed, not kept (a real socket event, bounded).
    deadline = time.monotonic() + 5
    while await script_clients(url):
        assert time.monotonic() < deadline, "the lane kept a connection after close"
        await asyncio.sleep(0.01)


async def test_a_url_encoding_other_than_utf8_keeps_redis_py_s_packer(redis_url: str) -> None:
    async with started(redis_url + "?encoding=latin-1", timeout=1.0) as store:
        # "é" goes out as one latin-1 byte, as redis-py would send it (UTF-8 has two).
        assert await store.run(ECHO, [], ["é"]) == b"\xe9"


async def test_scripts_flushed_from_the_server_run_once_each_and_are_cached_again(
    redis_url: str,
) -> None:
    # NOSCRIPT (a restart, SCRIPT FLUSH, a promoted replica): the lane's own connection
    # runs the script with EVAL, which also caches it there; pipelined calls are sent
    # again only if they answered NOSCRIPT, so each runs exactly once.
    async with (
        started(redis_url, timeout=1.0) as store,
        aioredis.Redis.from_url(redis_url) as raw,
    ):
        assert await store.incr("n") == 1
        await raw.script_flush()
        assert await store.incr("n") == 2
        await raw.script_flush()
        counted = Script("lane_count", "return redis.call('INCR', KEYS[1])", lambda *_: None)
        assert await store.run_many(counted, [(["m"], []), (["m"], [])]) == [1, 2]
        assert await store.run_many(counted, [(["m"], []), (["m"], [])]) == [3, 4]
        assert await raw.get("t:m") == b"4"
