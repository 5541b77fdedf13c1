"""The one negative cache: refusals kept in process so a caller stuck in a loop meets them.

Owns: `NegativeCache`, a per-process map of key → remembered negative answer with a
deadline on an injected clock (entries are gone once the clock reaches it), bounded by
entry count AND by total bytes (least recently used first, after the expired ones), and
a per-entry body limit (a bigger answer is not kept). Every limit is a constructor
argument: each user keeps its own. What a value is belongs to its user: the breaker keeps
status, headers and body per caller (gateway/policies/breaker/), the heartbeat's
`on_failure: local` copy keeps the store's record blob per viewer
(gateway/policies/heartbeat/). Not thread-safe: it lives on the event loop.
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

# Bytes charged per entry besides its value's own size (key, deadline, bookkeeping).
ENTRY_OVERHEAD = 100


class NegativeCache(Generic[K, V]):
    """`get` answers a live entry (and marks it recently used); `put` keeps one unless its
    body is over `body_limit`. `ttl` and `clock` share a unit (seconds, or ms if the clock
    counts ms); `put` may give an entry its own deadline instead. An entry costs
    `sizeof(value) + overhead` bytes against `max_bytes`."""

    __slots__ = (
        "body_limit",
        "bytes",
        "clock",
        "deadlines",
        "entries",
        "max_bytes",
        "max_entries",
        "overhead",
        "seq",
        "sizeof",
        "ttl",
    )

    def __init__(
        self,
        *,
        clock: Callable[[], float],
        max_entries: int,
        max_bytes: int,
        body_limit: int,
        sizeof: Callable[[V], int],
        ttl: float | None = None,
        overhead: int = ENTRY_OVERHEAD,
    ) -> None:
        self.clock = clock
        self.ttl = ttl
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.body_limit = body_limit
        self.sizeof = sizeof
        self.overhead = overhead
        # key -> (deadline, value, size); the order is least recently used first.
        self.entries: OrderedDict[K, tuple[float, V, int]] = OrderedDict()
        # (deadline, key) of every put, soonest first; stale pairs are skipped.
        self.deadlines: list[tuple[float, int, K]] = []
        self.bytes = 0
        self.seq = itertools.count()

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, key: K) -> V | None:
        entry = self.entries.get(key)
        if entry is None:
            return None
        if not self.clock() < entry[0]:
            self._drop(key)
            return None
        self.entries.move_to_end(key)
        return entry[1]

    def put(self, key: K, value: V, body: bytes | bytearray, expires: float | None = None) -> bool:
        """Keep `value` (whose answer body is `body`) until `expires` (default: now + ttl);
        False, and nothing kept, if the body is over the limit or the entry could never
        fit."""
        size = self.sizeof(value) + self.overhead
        if len(body) > self.body_limit or size > self.max_bytes or self.max_entries < 1:
            return False
        now = self.clock()
        if expires is None:
            if self.ttl is None:
                raise ValueError("NegativeCache.put without expires needs the cache's ttl")
            expires = now + self.ttl
        if key in self.entries:
            self._drop(key)
        self._expire(now)
        self.entries[key] = (expires, value, size)
        self.bytes += size
        heapq.heappush(self.deadlines, (expires, next(self.seq), key))
        while len(self.entries) > self.max_entries or self.bytes > self.max_bytes:
            self._drop(next(iter(self.entries)))
        return True

    def _drop(self, key: K) -> None:
        _deadline, _value, size = self.entries.pop(key)
        self.bytes -= size

    def _expire(self, now: float) -> None:
        """Drop every entry whose deadline has come, so the bounds evict the dead first."""
        deadlines = self.deadlines
        while deadlines and not now < deadlines[0][0]:
            deadline, _tie, key = heapq.heappop(deadlines)
            entry = self.entries.get(key)
            if entry is not None and entry[0] == deadline:
                self._drop(key)
        # Overwritten keys leave stale pairs behind: rebuild before they outgrow the map.
        if len(deadlines) > 2 * len(self.entries) + 64:
            self.deadlines = [(e[0], next(self.seq), k) for k, e in self.entries.items()]
            heapq.heapify(self.deadlines)
