"""`memory://` store: the embedded default for one process.

Owns: an in-process, size-bounded (cachetools TLRU) keyspace with per-key expiry and the
few Redis data types the scripts need (strings, integers, hashes, sorted sets); members
of hashes and sorted sets count against the bound, so per-viewer state is bounded too. Scripts
run their Python twin against `MemoryData` (the `KeySpace` twins are typed against); there
is no await inside, so each one is atomic on the event loop exactly as a Lua script is
atomic on Redis. Batches (`run_many`) take the base's one-by-one default: there is no
round trip to save.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from cachetools import TLRUCache

from gateway.store.base import Clock, Script, ScriptArg, Store, StoreHealth

_NEVER = float("inf")


class _Entry:
    __slots__ = ("expires_at", "value")

    def __init__(self, value: Any, expires_at: float) -> None:
        self.value = value
        self.expires_at = expires_at


def _ttu(_key: str, entry: _Entry, _now: float) -> float:
    return entry.expires_at


def _size(entry: _Entry) -> int:
    # A key counts 1, plus 1 per member of a hash or sorted set: `max_keys` bounds what
    # grows with viewers (a webinar's presence set), not just the number of keys.
    value = entry.value
    return 1 + len(value) if isinstance(value, dict) else 1


class MemoryData:
    """A tiny Redis-shaped keyspace (a `KeySpace`). Times are seconds from the injected
    clock. Also usable on its own, as a policy's in-process fallback keyspace."""

    def __init__(self, max_keys: int, clock: Clock) -> None:
        self.clock = clock
        self._data: TLRUCache[str, _Entry] = TLRUCache(
            maxsize=max_keys, ttu=_ttu, timer=clock, getsizeof=_size
        )

    def __len__(self) -> int:
        """Keys held (live or not yet evicted)."""
        return len(self._data)

    @property
    def size(self) -> int:
        """Keys plus hash/sorted-set members, as counted against `max_keys`."""
        return int(self._data.currsize)

    def grew(self, key: str) -> None:
        """A script added members to the container at `key`: count them against the
        bound now (the cache sizes an entry when it is set). A container bigger than the
        whole bound is dropped, as an evicted key would be."""
        e = self._entry(key)
        if e is None:
            return
        try:
            self._data[key] = e
        except ValueError:
            self._data.pop(key, None)

    def _entry(self, key: str) -> _Entry | None:
        return self._data.get(key)

    def _put(self, key: str, value: Any, ttl: float | None, keep_ttl: bool = False) -> None:
        if keep_ttl and (old := self._entry(key)) is not None:
            expires = old.expires_at
        else:
            expires = self.clock() + ttl if ttl else _NEVER
        self._data[key] = _Entry(value, expires)

    # strings
    def get(self, key: str) -> Any:
        e = self._entry(key)
        return None if e is None else e.value

    def set(self, key: str, value: Any, ttl: float | None = None, keep_ttl: bool = False) -> None:
        self._put(key, value, ttl, keep_ttl)

    def exists(self, key: str) -> bool:
        return self._entry(key) is not None

    def delete(self, key: str) -> int:
        return 1 if self._data.pop(key, None) is not None else 0

    def expire(self, key: str, ttl: float) -> None:
        e = self._entry(key)
        if e is not None:
            self._data[key] = _Entry(e.value, self.clock() + ttl)

    def pttl(self, key: str) -> int:
        e = self._entry(key)
        if e is None:
            return -2
        if e.expires_at == _NEVER:
            return -1
        return max(0, int((e.expires_at - self.clock()) * 1000))

    def incr(self, key: str, amount: int = 1, ttl: float | None = None) -> int:
        e = self._entry(key)
        if e is None:
            self._put(key, amount, ttl)
            return amount
        e.value = int(e.value) + amount
        return int(e.value)

    # hashes
    def hash(self, key: str, create: bool = False) -> dict[bytes, bytes] | None:
        e = self._entry(key)
        if e is None:
            if not create:
                return None
            h: dict[bytes, bytes] = {}
            self._put(key, h, None)
            return h
        value: dict[bytes, bytes] = e.value
        return value

    # sorted sets: member -> score
    def zset(self, key: str, create: bool = False) -> dict[bytes, float] | None:
        e = self._entry(key)
        if e is None:
            if not create:
                return None
            z: dict[bytes, float] = {}
            self._put(key, z, None)
            return z
        value: dict[bytes, float] = e.value
        return value


def _b(v: ScriptArg) -> bytes:
    if isinstance(v, bytes):
        return v
    return str(v).encode()


class MemoryStore(Store):
    """Each key namespace (`rl:`, `refresh:`, `hb:`, `cache:`, ... — the part before the
    first `:`) has its own keyspace, bounded by `max_keys` keys plus hash and sorted-set
    members (store.memory_max_keys). Some namespaces grow with what clients
    send (a heartbeat per made-up webinar id); in one shared LRU a flood of those would
    evict rate-limit state and refresh locks, which is exactly what must hold under
    attack."""

    backend = "memory"
    fails = False

    def __init__(
        self, key_prefix: str = "edge:", *, max_keys: int = 1_000_000, clock: Clock = time.time
    ) -> None:
        super().__init__(key_prefix, clock)
        self.max_keys = max_keys
        self.spaces: dict[str, MemoryData] = {}
        self._health = StoreHealth(backend="memory")

    def _space(self, key: str) -> MemoryData:
        ns = key.split(":", 1)[0] if ":" in key else ""
        data = self.spaces.get(ns)
        if data is None:
            data = self.spaces[ns] = MemoryData(self.max_keys, self.clock)
        return data

    def sizes(self) -> dict[str, Callable[[], int]]:
        spaces = self.spaces
        return {"memory_store": lambda: sum(d.size for d in spaces.values())}

    @property
    def health(self) -> StoreHealth:
        return self._health

    async def ping(self) -> None:
        return None

    async def get(self, key: str) -> bytes | None:
        v = self._space(key).get(self.k(key))
        return None if v is None else _b(v)

    async def set(
        self, key: str, value: bytes, ttl: float | None = None, *, nx: bool = False
    ) -> bool:
        data = self._space(key)
        k = self.k(key)
        if nx and data.exists(k):
            return False
        data.set(k, value, ttl)
        return True

    async def delete(self, *keys: str) -> int:
        return sum(self._space(k).delete(self.k(k)) for k in keys)

    async def incr(self, key: str, amount: int = 1, ttl: float | None = None) -> int:
        return self._space(key).incr(self.k(key), amount, ttl)

    async def delete_if_equals(self, key: str, value: bytes) -> bool:
        data = self._space(key)
        k = self.k(key)
        if data.get(k) == value:
            data.delete(k)
            return True
        return False

    async def run(self, script: Script, keys: Sequence[str], args: Sequence[ScriptArg]) -> Any:
        now_ms = int(self.clock() * 1000)
        space = self._space(keys[0]) if keys else self._space("")
        if any(self._space(k) is not space for k in keys[1:]):
            raise ValueError(f"script {script.name}: keys span several namespaces")
        return script.py(space, [self.k(k) for k in keys], list(args), now_ms)
