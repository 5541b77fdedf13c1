"""The store interface every policy talks to, and the one error type it raises.

Owns: the async operations (get/set/incr/locks and named scripts), key building with
Redis Cluster hash tags, and the failure guard shared by networked backends (per-call
timeout, consecutive-failure back-off, health for /readyz). A multi-step operation is a
`Script`: one Lua source for Redis (one round trip, atomic) plus a Python twin that runs
on the memory backend, so both backends obey one contract.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.store.memory import MemoryData

Clock = Callable[[], float]
ScriptArg = str | bytes | int | float
PyScript = Callable[["MemoryData", list[str], list[ScriptArg], int], Any]

LUA_DIR = Path(__file__).parent / "lua"


class StoreError(Exception):
    """Any store failure: timeout, connection refused, script error, or fast-fail while
    backing off. `kind` is a small fixed vocabulary, safe as a metrics label."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Script:
    """A named atomic operation. `lua` runs on Redis with KEYS/ARGV (and must take the time
    from `redis.call('TIME')` if it needs one); `py` runs on the memory backend and gets
    `now_ms` from the injected clock. Both return Redis-shaped values: int, bytes, list."""

    name: str
    lua: str
    py: PyScript

    @classmethod
    def from_file(cls, name: str, py: PyScript) -> Script:
        return cls(name, (LUA_DIR / f"{name}.lua").read_text(), py)


@dataclass
class StoreHealth:
    backend: str
    ok: bool = True
    consecutive_failures: int = 0
    backoff_until: float = 0.0
    last_error: str | None = None
    counters: dict[str, int] = field(default_factory=dict)


class Store(ABC):
    """Async key/value store with TTLs, locks and scripts. Keys passed in are *unprefixed*;
    the store adds `key_prefix`. Values are bytes."""

    backend: str = "abstract"

    def __init__(self, key_prefix: str) -> None:
        self.prefix = key_prefix

    def k(self, key: str) -> str:
        return self.prefix + key

    @staticmethod
    def tag(value: str) -> str:
        """Wrap a key part in a Redis Cluster hash tag; braces inside are replaced so a
        caller-supplied value can never break out of the tag."""
        return "{" + value.replace("{", "(").replace("}", ")") + "}"

    @property
    @abstractmethod
    def health(self) -> StoreHealth: ...

    @abstractmethod
    async def ping(self) -> None: ...

    @abstractmethod
    async def get(self, key: str) -> bytes | None: ...

    @abstractmethod
    async def set(
        self, key: str, value: bytes, ttl: float | None = None, *, nx: bool = False
    ) -> bool:
        """Store `value`; with `nx`, only if absent (the lock primitive). True if written."""

    @abstractmethod
    async def delete(self, *keys: str) -> int: ...

    @abstractmethod
    async def incr(self, key: str, amount: int = 1, ttl: float | None = None) -> int:
        """Add and return the new value; `ttl` is set when the key is created."""

    @abstractmethod
    async def delete_if_equals(self, key: str, value: bytes) -> bool:
        """Release a lock only if we still own it."""

    @abstractmethod
    async def run(self, script: Script, keys: Sequence[str], args: Sequence[ScriptArg]) -> Any:
        """Run a Script atomically in one round trip. Keys are unprefixed."""

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Open connections, load scripts. Errors are not fatal: the store may come up later."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        pass


class FailureGuard:
    """Shared by networked backends: bounds each call by `timeout`, and after `threshold`
    consecutive failures answers StoreError('backoff') at once for `backoff` seconds, so a
    dead Redis costs one timeout per back-off period instead of one per request."""

    def __init__(
        self,
        health: StoreHealth,
        *,
        threshold: int,
        backoff: float,
        clock: Clock = time.monotonic,
        on_error: Callable[[str, str], None] | None = None,
    ) -> None:
        self.health = health
        self.threshold = threshold
        self.backoff = backoff
        self.clock = clock
        self.on_error = on_error

    def check(self, op: str) -> None:
        h = self.health
        if h.backoff_until and self.clock() < h.backoff_until:
            self._count(op, "backoff")
            raise StoreError("backoff", "store unavailable (backing off after failures)")

    def success(self) -> None:
        h = self.health
        if h.consecutive_failures or not h.ok:
            h.consecutive_failures = 0
            h.backoff_until = 0.0
            h.ok = True

    def failure(self, op: str, kind: str, message: str) -> StoreError:
        h = self.health
        h.consecutive_failures += 1
        h.last_error = f"{kind}: {message}"
        h.ok = False
        if h.consecutive_failures >= self.threshold:
            h.backoff_until = self.clock() + self.backoff
        self._count(op, kind)
        return StoreError(kind, message)

    def _count(self, op: str, kind: str) -> None:
        key = f"{op}:{kind}"
        self.health.counters[key] = self.health.counters.get(key, 0) + 1
        if self.on_error:
            self.on_error(op, kind)
