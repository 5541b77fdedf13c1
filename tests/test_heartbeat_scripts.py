"""The heartbeat scripts' contract, run on the memory store (Python twins) and on the real
Redis (Lua) with the same inputs: both must give the same answers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio

from gateway.policies.heartbeat.policy import (
    FLUSH,
    INDEX,
    OUTCOME,
    PRESENCE,
    RECORD,
    _index_keys,
    _outcome_keys,
    _webinar_keys,
    seen_key,
)
from gateway.store import Store
from gateway.store.base import ScriptArg
from gateway.store.memory import MemoryStore
from gateway.store.redis import RedisStore
from tests.fakes.clock import FakeClock

T0 = 1_800_000_000_000  # ms
INTERVAL = 300_000
WINDOW = 360_000
GC = 3_600_000
REINDEX = 30_000


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest, redis_url: str) -> AsyncIterator[Store]:
    s: Store
    if request.param == "memory":
        s = MemoryStore("t:", clock=FakeClock(T0 / 1000))
    else:
        s = RedisStore(redis_url, "t:", timeout=1.0)
    await s.start()
    yield s
    await s.close()


@pytest.fixture
async def on_redis(redis_url: str) -> AsyncIterator[tuple[Store, redis.asyncio.Redis]]:
    """The Redis store and a plain client on the same database, for what only Redis has
    (TTLs)."""
    s = RedisStore(redis_url, "t:", timeout=1.0)
    await s.start()
    raw = redis.asyncio.Redis.from_url(redis_url)
    yield s, raw
    await raw.aclose()
    await s.close()


def b(x: Any) -> Any:
    """Redis-shaped results to plain Python (bytes stay bytes, numbers become int)."""
    if isinstance(x, list):
        return [b(i) for i in x]
    if isinstance(x, int):
        return int(x)
    return x


async def record(
    store: Store, now: int, viewers: list[ScriptArg], *, batch: bool = False, joins: bool = False
) -> list[Any]:
    """Record `viewers` ([viewer, track, viewer, track, ...]); returns [reindex, decision,
    blob, decision, blob, ...] (the blob empty unless the decision is 2)."""
    keys = _webinar_keys("w1", "r")
    mode = 2 if joins else int(batch)
    items = "\n".join(str(viewers[i + 1]) + str(viewers[i]) for i in range(0, len(viewers), 2))
    args: list[ScriptArg] = [now, INTERVAL, now - INTERVAL, now - WINDOW, mode, REINDEX, GC, items]
    reindex, codes, *blobs = b(await store.run(RECORD, keys, args))
    out: list[Any] = [reindex]
    for code in codes:
        out += [code - 48, blobs.pop(0) if code == ord("2") else b""]
    assert not blobs, "a negative blob for no heartbeat"
    return out


async def test_record_decides_in_arrival_order(store: Store) -> None:
    # Two new viewers and a repeat within one call: forward, forward, absorb.
    assert await record(store, T0, ["u:a", 0, "u:b", 0, "u:a", 0]) == [0, 1, b"", 1, b"", 0, b""]
    assert await record(store, T0 + INTERVAL - 1, ["u:a", 0]) == [0, 0, b""]
    assert await record(store, T0 + INTERVAL, ["u:a", 0, "u:a", 0]) == [0, 1, b"", 0, b""]
    # Presence: both seen within the window of T0 + INTERVAL.
    assert b(await store.run(PRESENCE, [seen_key("w1")], [T0 + INTERVAL - WINDOW])) == 2
    assert b(await store.run(PRESENCE, [seen_key("w1")], [T0 + 1])) == 1
    assert b(await store.run(PRESENCE, [seen_key("w2")], [0])) == 0


async def test_batch_mode_stamps_every_heartbeat(store: Store) -> None:
    assert await record(store, T0, ["u:a", 1], batch=True) == [1, 1, b""]
    # Pinging every 200 s keeps it absorbed well past the interval.
    for step in range(1, 5):
        res = await record(store, T0 + step * 200_000, ["u:a", 1], batch=True)
        assert res[1:] == [0, b""]
    # Silent for longer than the interval: forwarded once more.
    res = await record(store, T0 + 4 * 200_000 + INTERVAL, ["u:a", 1], batch=True)
    assert res[1:] == [1, b""]


async def test_negative_then_expiry(store: Store) -> None:
    keys = _webinar_keys("w1", "r")
    await record(store, T0, ["u:a", 1, "u:b", 1], batch=True)
    blob = b"%d|404|application/json|{}" % (T0 + 60_000)
    await store.run(OUTCOME, _outcome_keys(keys), ["neg", "u:a", blob, GC])
    assert await record(store, T0 + 1, ["u:a", 1, "u:b", 1], batch=True) == [
        0,
        2,
        blob,
        0,
        b"",
    ]
    # Refused: out of presence and of the flush.
    assert b(await store.run(PRESENCE, [seen_key("w1")], [0])) == 1
    taken = b(await store.run(FLUSH, keys[3:6], ["take", 10]))
    assert taken[0::3] == [b"u:b"]
    # After the negative expires the viewer is forwarded again.
    assert (await record(store, T0 + 60_000, ["u:a", 0]))[1:] == [1, b""]


async def test_fail_outcome_unstamps_the_forward(store: Store) -> None:
    keys = _webinar_keys("w1", "r")
    assert (await record(store, T0, ["u:a", 0]))[1] == 1
    await store.run(OUTCOME, _outcome_keys(keys), ["fail", "u:a", b"", GC])
    assert (await record(store, T0 + 1, ["u:a", 0]))[1] == 1
    assert (await record(store, T0 + 2, ["u:a", 0]))[1] == 0


async def test_flush_acks_only_what_was_sent(store: Store) -> None:
    keys = _webinar_keys("w1", "r")
    fkeys = keys[3:6]
    first = await record(store, T0, ["u:a", 1, "u:b", 1], batch=True)
    assert first[0] == 1  # announce the webinar to the index
    assert (await record(store, T0 + 1, ["u:c", 1], batch=True))[0] == 0
    taken = b(await store.run(FLUSH, fkeys, ["take", 2]))
    assert taken == [b"u:a", str(T0).encode(), b"", b"u:b", str(T0).encode(), b""]
    # u:a pings again while the flush is in flight: its newer entry must survive the ack.
    await record(store, T0 + 5, ["u:a", 1], batch=True)
    assert b(await store.run(FLUSH, fkeys, ["ack", *taken])) == 2
    left = b(await store.run(FLUSH, fkeys, ["take", 10]))
    assert left == [b"u:c", str(T0 + 1).encode(), b"", b"u:a", str(T0 + 5).encode(), b""]
    assert b(await store.run(FLUSH, fkeys, ["ack", *left])) == 0
    # Drained: the next heartbeat announces the webinar again.
    assert (await record(store, T0 + 6, ["u:a", 1], batch=True))[0] == 1


async def test_index_ack_keeps_a_webinar_announced_again(store: Store) -> None:
    ik = _index_keys("r")
    s1 = b(await store.run(INDEX, ik, ["add", "w1"]))
    await store.run(INDEX, ik, ["add", "w2"])
    listing = b(await store.run(INDEX, ik, ["list"]))
    assert listing[0::2] == [b"w1", b"w2"]
    # w1 is announced again during the flush: its ack with the old sequence keeps it.
    await store.run(INDEX, ik, ["add", "w1"])
    assert b(await store.run(INDEX, ik, ["ack", "w1", s1])) == 0
    assert b(await store.run(INDEX, ik, ["ack", "w2", listing[3]])) == 1
    assert b(await store.run(INDEX, ik, ["list"]))[0::2] == [b"w1"]


async def test_bulk_joins_are_answered_at_the_edge_and_flushed_as_joins(store: Store) -> None:
    keys = _webinar_keys("w1", "r")
    fkeys = keys[3:6]
    # A signed-in viewer's first heartbeat is a join (3); a guest (not flushable) is
    # still forwarded (1); the viewer's next heartbeat is absorbed (0).
    assert await record(store, T0, ["u:a", 1, "ip:1.2.3.4", 0], joins=True) == [
        1,
        3,
        b"",
        1,
        b"",
    ]
    assert (await record(store, T0 + 10, ["u:a", 1], joins=True))[1:] == [0, b""]
    taken = b(await store.run(FLUSH, fkeys, ["take", 10]))
    assert taken == [b"u:a", str(T0 + 10).encode(), str(T0).encode()]
    # A heartbeat in flight keeps the entry, but the join went out: it is acked.
    await record(store, T0 + 20, ["u:a", 1], joins=True)
    assert b(await store.run(FLUSH, fkeys, ["ack", *taken])) == 1
    taken = b(await store.run(FLUSH, fkeys, ["take", 10]))
    assert taken == [b"u:a", str(T0 + 20).encode(), b""]


async def test_failed_flush_keeps_the_join_and_a_refusal_clears_it(store: Store) -> None:
    keys = _webinar_keys("w1", "r")
    fkeys = keys[3:6]
    await record(store, T0, ["u:a", 1, "u:b", 1], joins=True)
    first = b(await store.run(FLUSH, fkeys, ["take", 10]))
    # Not acked (the POST failed): the same joins are taken again.
    assert b(await store.run(FLUSH, fkeys, ["take", 10])) == first
    assert first[2::3] == [str(T0).encode(), str(T0).encode()]
    # The flush refused u:b: negative, out of presence, dirty and joins.
    assert b(await store.run(FLUSH, fkeys, ["ack", *first])) == 0
    blob = b"%d|403|application/json|{}" % (T0 + 60_000)
    await store.run(OUTCOME, _outcome_keys(keys), ["neg", "u:b", blob, GC])
    res = await record(store, T0 + 1, ["u:a", 1, "u:b", 1], joins=True)
    assert res[1:] == [0, b"", 2, blob]
    assert b(await store.run(PRESENCE, [seen_key("w1")], [0])) == 1
    # After the negative expires, u:b joins again (and is flushed as a join).
    assert (await record(store, T0 + 60_000, ["u:b", 1], joins=True))[1:] == [3, b""]
    taken = b(await store.run(FLUSH, fkeys, ["take", 10]))
    assert taken[0::3] == [b"u:a", b"u:b"]
    assert taken[2::3] == [b"", str(T0 + 60_000).encode()]


async def test_a_call_longer_than_a_slice_decides_each_heartbeat(store: Store) -> None:
    # The script reads and writes each key once per call, in slices of 1,000 members
    # (Lua's unpack is bounded): 2,500 viewers (5,000 ZADD arguments), every one twice,
    # with a live negative answer so the negatives are looked up too.
    keys = _webinar_keys("w1", "r")
    blob = b"%d|404|application/json|{}" % (T0 + 60_000)
    await store.run(OUTCOME, _outcome_keys(keys), ["neg", "u:1234", blob, GC])
    viewers: list[ScriptArg] = []
    for i in range(2500):
        viewers += [f"u:{i}", 1]
    res = await record(store, T0, viewers + viewers, batch=True)
    first, repeat = res[1:5001], res[5001:]
    assert first[0::2] == [2 if i == 1234 else 1 for i in range(2500)]
    assert repeat[0::2] == [2 if i == 1234 else 0 for i in range(2500)]
    assert first[1234 * 2 + 1] == repeat[1234 * 2 + 1] == blob
    assert b(await store.run(PRESENCE, [seen_key("w1")], [T0])) == 2499
    taken = b(await store.run(FLUSH, keys[3:6], ["take", 3000]))
    assert len(taken[0::3]) == 2499


async def test_redis_prunes_and_renews_the_idle_expiry_once_its_mark_is_a_second_old(
    on_redis: tuple[Store, redis.asyncio.Redis],
) -> None:
    # Pruning runs when the route's idle expiry was set more than a second ago (its
    # TTL is the mark): stale members leave the sets and both TTLs are renewed.
    store, raw = on_redis
    seen_k, fwd_k = ("t:" + k for k in _webinar_keys("w1", "r")[:2])
    await record(store, T0, ["u:old", 0])
    assert GC - 1000 < await raw.pttl(seen_k) <= GC
    assert GC - 1000 < await raw.pttl(fwd_k) <= GC
    # A second and more later (the mark's TTL lowered instead of waiting):
    await raw.pexpire(fwd_k, GC - 5000)
    await raw.pexpire(seen_k, GC - 5000)
    later = T0 + WINDOW + 1
    assert (await record(store, later, ["u:new", 0]))[1] == 1
    assert await raw.zscore(seen_k, "u:old") is None
    assert await raw.zscore(fwd_k, "u:old") is None
    assert await raw.zscore(seen_k, "u:new") == later
    assert GC - 1000 < await raw.pttl(seen_k) <= GC
    assert GC - 1000 < await raw.pttl(fwd_k) <= GC


async def test_redis_seen_set_recreated_within_the_second_gets_its_expiry(
    on_redis: tuple[Store, redis.asyncio.Redis],
) -> None:
    # Another route's negative outcome can remove the last viewer of the shared seen
    # set (deleting it); this route's next call re-creates it while its own mark is
    # fresh: the set must still get its idle expiry, or it would never expire.
    store, raw = on_redis
    keys = _webinar_keys("w1", "r")
    seen_k = "t:" + keys[0]
    await record(store, T0, ["u:a", 0])
    other = _webinar_keys("w1", "other")
    blob = b"%d|403|application/json|{}" % (T0 + 60_000)
    await store.run(OUTCOME, _outcome_keys(other), ["neg", "u:a", blob, GC])
    assert await raw.exists(seen_k) == 0
    await record(store, T0 + 1, ["u:b", 0])
    assert GC - 1000 < await raw.pttl(seen_k) <= GC
