"""NegativeCache alone: TTL on the injected clock, the entry bound, the byte bound, the
per-entry body limit."""

from __future__ import annotations

import pytest

from gateway.negcache import NegativeCache
from tests.fakes.clock import FakeClock


def make(
    clock: FakeClock,
    *,
    max_entries: int = 100,
    max_bytes: int = 1_000_000,
    body_limit: int = 1000,
    ttl: float | None = 10.0,
) -> NegativeCache[str, bytes]:
    return NegativeCache(
        clock=clock,
        ttl=ttl,
        max_entries=max_entries,
        max_bytes=max_bytes,
        body_limit=body_limit,
        sizeof=len,
        overhead=0,
    )


def test_entry_lives_until_its_ttl_on_the_injected_clock() -> None:
    clock = FakeClock(1000.0)
    cache = make(clock)
    assert cache.put("a", b"no", b"no")
    clock.advance(9.999)
    assert cache.get("a") == b"no"
    clock.advance(0.001)  # the deadline itself: gone
    assert cache.get("a") is None
    assert len(cache) == 0


def test_put_may_give_its_own_deadline() -> None:
    clock = FakeClock(1000.0)
    cache = make(clock, ttl=None)
    assert cache.put("a", b"x", b"", expires=1005.0)
    clock.advance(4.5)
    assert cache.get("a") == b"x"
    clock.advance(0.5)
    assert cache.get("a") is None
    with pytest.raises(ValueError, match="ttl"):
        cache.put("b", b"x", b"")


def test_entry_bound_evicts_expired_first_then_least_recently_used() -> None:
    clock = FakeClock(0.0)
    cache = make(clock, max_entries=3)
    cache.put("old", b"1", b"", expires=1.0)
    cache.put("a", b"2", b"")
    cache.put("b", b"3", b"")
    clock.advance(2.0)
    cache.put("c", b"4", b"")  # "old" is dead: it goes, not "a"
    assert [cache.get(k) for k in ("a", "b", "c")] == [b"2", b"3", b"4"]
    cache.get("a")  # now b is the least recently used
    cache.put("d", b"5", b"")
    assert len(cache) == 3
    assert cache.get("b") is None
    assert cache.get("a") == b"2"


def test_byte_bound_counts_value_size_plus_overhead() -> None:
    clock = FakeClock(0.0)
    cache: NegativeCache[str, bytes] = NegativeCache(
        clock=clock, ttl=10.0, max_entries=100, max_bytes=300, body_limit=1000, sizeof=len
    )
    for k in ("a", "b"):
        assert cache.put(k, b"x" * 50, b"")  # 150 bytes each with the 100 overhead
    assert cache.bytes == 300
    assert cache.put("c", b"x" * 10, b"")  # 110 more: "a" goes
    assert cache.get("a") is None
    assert cache.bytes == 260
    # Replacing an entry releases its old size.
    assert cache.put("b", b"", b"")
    assert cache.bytes == 210
    # An entry that could never fit is refused, and evicts nothing.
    assert not cache.put("d", b"x" * 201, b"")
    assert len(cache) == 2


def test_body_over_the_limit_is_not_kept() -> None:
    clock = FakeClock(0.0)
    cache = make(clock, body_limit=16)
    assert cache.put("a", b"v", b"x" * 16)  # at the limit: kept
    assert not cache.put("b", b"v", b"x" * 17)
    assert cache.get("b") is None
    # A refused put leaves an older entry of that key as it was.
    assert not cache.put("a", b"w", b"x" * 17)
    assert cache.get("a") == b"v"
