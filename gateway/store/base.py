"""The store interface every policy talks to, and the one error type it raises.

Owns: the backend-free `Store` base (async get/set/incr/locks and named scripts, batches
of script calls with `run_many`, and the capabilities a caller may ask about instead of
naming a backend: `batches`, `fails`, `fail_fast`, `queue_budget`), key building with
Redis Cluster hash tags, and what networked backends share: the per-call time budget
that a busy event loop does not break (`CallBudget`), and the failure guard
(consecutive-failure back-off with probes, the unavailable/recovered log lines, health
for /readyz). A multi-step operation is a `Script`: one Lua source for Redis (one round
trip, atomic) plus a Python twin run against a `KeySpace` (the in-process keyspace of
the memory backend, or a policy's local fallback), so every backend obeys one contract.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

Clock = Callable[[], float]
ScriptArg = str | bytes | int | float


class KeySpace(Protocol):
    """The Redis-shaped key operations a Python twin may use (what its Lua does with
    `redis.call`): strings and integers with TTLs (seconds), hashes and sorted sets as
    live dicts. `grew` tells a bounded keyspace that a script added members to the
    container at `key`. Implemented by `gateway.store.memory.MemoryData`."""

    def get(self, key: str) -> Any: ...

    def set(
        self, key: str, value: Any, ttl: float | None = None, keep_ttl: bool = False
    ) -> None: ...

    def exists(self, key: str) -> bool: ...

    def delete(self, key: str) -> int: ...

    def expire(self, key: str, ttl: float) -> None: ...

    def incr(self, key: str, amount: int = 1, ttl: float | None = None) -> int: ...

    def hash(self, key: str, create: bool = False) -> dict[bytes, bytes] | None: ...

    def zset(self, key: str, create: bool = False) -> dict[bytes, float] | None: ...

    def grew(self, key: str) -> None: ...


PyScript = Callable[[KeySpace, list[str], list[ScriptArg], int], Any]
# One call of a batch: (keys, args), keys unprefixed.
Call = tuple[Sequence[str], Sequence[ScriptArg]]

log = logging.getLogger("gateway.store")


class StoreError(Exception):
    """Any store failure: timeout, connection refused, script error, or fast-fail while
    backing off. `kind` is a small fixed vocabulary, safe as a metrics label."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Script:
    """A named atomic operation. `lua` runs on Redis with KEYS/ARGV (and must take the time
    from `redis.call('TIME')` if it needs one); `py` runs against a KeySpace and gets
    `now_ms` from the injected clock. Both return Redis-shaped values: int, bytes, list."""

    name: str
    lua: str
    py: PyScript

    @classmethod
    def from_file(cls, name: str, py: PyScript, *, directory: Path) -> Script:
        return cls(name, (directory / f"{name}.lua").read_text(), py)


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
    the store adds `key_prefix`. Values are bytes.

    Callers ask the capabilities below, never which backend they hold. `clock` is the
    store's own time (seconds): expiry on memory://, back-off and probes on Redis."""

    backend: str = "abstract"
    # run_many costs less than the same calls one by one (one round trip for many):
    # worth coalescing concurrent calls into batches.
    batches: bool = False
    # Calls can fail (a network in between): worth keeping a local fallback copy.
    fails: bool = True

    def __init__(self, key_prefix: str, clock: Clock = time.time) -> None:
        self.prefix = key_prefix
        self.clock = clock

    def k(self, key: str) -> str:
        return self.prefix + key

    @staticmethod
    def tag(value: str) -> str:
        """Wrap a key part in a Redis Cluster hash tag; braces inside are replaced so a
        caller-supplied value can never break out of the tag."""
        return "{" + value.replace("{", "(").replace("}", ")") + "}"

    def sizes(self) -> dict[str, Callable[[], int]]:
        """Entry counts of the bounded structures this store keeps in the process, by
        name, for edge_state_entries{structure}; a remote store keeps none."""
        return {}

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

    async def run_many(self, script: Script, calls: Sequence[Call]) -> list[Any]:
        """Run `script` once per (keys, args) in `calls`. Each call is its own atomic run;
        nothing is atomic *across* calls. Returns one entry per call, in order: the reply,
        or a StoreError for that call alone. Raises StoreError when the batch as a whole
        failed. This default runs them one by one; a backend with round trips to save
        overrides it (and sets `batches`)."""
        out: list[Any] = []
        for keys, args in calls:
            try:
                out.append(await self.run(script, keys, args))
            except StoreError as exc:
                out.append(exc)
        # No call answered, and not for a fault of its own: the store failed the batch.
        if out and all(isinstance(r, StoreError) and r.kind != "response" for r in out):
            raise out[0]
        return out

    def fail_fast(self, op: str) -> None:  # noqa: B027 - optional hook
        """Raise StoreError('backoff') now if a call made now would be refused without
        reaching the backend (backing off, no probe due); spends no probe, queues nothing.
        For a caller about to queue work for a later call (a coalescer)."""

    def queue_budget(self) -> AbstractAsyncContextManager[Any]:
        """The deadline for waiting on a call queued behind one batch already out: a
        context manager that raises TimeoutError when it passes. No deadline here."""
        return contextlib.nullcontext()

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Open connections, load scripts. Errors are not fatal: the store may come up later."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        pass


# A deadline timer that ran at most this late found the loop idle: the store itself is
# slow. It then waits GRACE once more, for a reply that came in the same loop turn.
LOOP_SLACK = 0.002
GRACE = 0.002
# At most one "unavailable"/"recovered" log pair per this many seconds (a flapping store
# would otherwise write a line per flap); the transitions are all counted in metrics.
TRANSITION_LOG_EVERY = 10.0


class CallBudget:
    """`async with CallBudget(budget, cap, lag)`: a deadline for one store call that CPU
    pressure alone does not break. The deadline timer measures how late it runs itself
    (the loop's lag at that moment): when it runs late (the loop was busy running other
    work, or the process was not scheduled) the reply may already be sitting unread in a
    socket buffer, so the call gets as much extra time as the loop was away, never more
    than `cap` in all. A timer that runs on time gives the call once more the loop's
    recent lag (`lag()`, measured by a probe: a machine that starves this process starves
    the store's process too), or GRACE when the loop has been idle (a reply that arrived
    in the same loop turn is read by then); only then it cancels the call and raises
    TimeoutError, as `asyncio.timeout` would. So an idle machine adds at most GRACE to
    `budget` against a hung store, and a busy one is not taken for the store failing."""

    __slots__ = (
        "_cancelling",
        "_graced",
        "_handle",
        "_lag",
        "_loop",
        "_start",
        "_task",
        "_when",
        "budget",
        "cap",
        "expired",
        "extended",
    )

    def __init__(self, budget: float, cap: float, lag: Callable[[], float] = lambda: 0.0) -> None:
        self.budget = budget
        self.cap = max(cap, budget)
        self._lag = lag
        self.expired = False
        self.extended = False
        self._graced = False

    async def __aenter__(self) -> CallBudget:
        loop = self._loop = asyncio.get_running_loop()
        task = asyncio.current_task(loop)  # with the loop: no second getpid() (3.11)
        assert task is not None
        self._task = task
        self._cancelling = task.cancelling()
        self._start = loop.time()
        self._when = self._start + self.budget
        self._handle = loop.call_at(self._when, self._check)
        return self

    def _check(self) -> None:
        now = self._loop.time()
        late = now - self._when
        end = self._start + self.cap
        if now < end and (late > LOOP_SLACK or not self._graced):
            if late > LOOP_SLACK:
                self.extended = True
            else:
                self._graced = True
                late = max(GRACE, self._lag())
            self._when = min(now + late, end)
            self._handle = self._loop.call_at(self._when, self._check)
            return
        self.expired = True
        self._task.cancel()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, _tb: Any
    ) -> None:
        self._handle.cancel()
        cancelled = exc_type is not None and issubclass(exc_type, asyncio.CancelledError)
        ours = self.expired and cancelled
        # Ours unless someone else cancelled the task too (then let theirs through).
        if ours and self._task.uncancel() <= self._cancelling:
            raise TimeoutError from exc


class FailureGuard:
    """Shared by networked backends: counts consecutive failures, and after `threshold`
    of them answers StoreError('backoff') at once for `backoff` seconds, so a dead Redis
    costs one timeout per probe instead of one per request. While backing off, one call
    per `probe_interval` is still let through: its success ends the back-off at once, so
    a store that only looked down (a burst of slow calls) is not skipped by everyone
    for the whole back-off. Logs one line when the store becomes unavailable and one
    when it recovers (rate-limited), and reports each transition to `on_state`."""

    def __init__(
        self,
        health: StoreHealth,
        *,
        threshold: int,
        backoff: float,
        probe_interval: float = 0.25,
        clock: Clock = time.monotonic,
        on_error: Callable[[str, str], None] | None = None,
        on_state: Callable[[bool], None] | None = None,
    ) -> None:
        self.health = health
        self.threshold = threshold
        self.backoff = backoff
        self.probe_interval = probe_interval
        self.clock = clock
        self.on_error = on_error
        self.on_state = on_state
        self.down_since: float | None = None
        self._next_probe = 0.0
        self._logged_at = float("-inf")
        self._quiet = False  # the last "unavailable" was not logged: neither is its end
        self._suppressed = 0

    def blocked(self) -> bool:
        """Backing off and no probe due: a call now would fail fast (no side effect)."""
        h = self.health
        if not h.backoff_until:
            return False
        now = self.clock()
        return now < h.backoff_until and now < self._next_probe

    def check(self, op: str) -> None:
        h = self.health
        if not h.backoff_until:
            return
        now = self.clock()
        if now >= h.backoff_until:
            return
        if now >= self._next_probe:
            self._next_probe = now + self.probe_interval
            return  # this call is the probe
        self.count(op, "backoff")
        raise StoreError("backoff", "store unavailable (backing off after failures)")

    def success(self) -> None:
        h = self.health
        if h.consecutive_failures or not h.ok:
            h.consecutive_failures = 0
            h.backoff_until = 0.0
            h.ok = True
        if self.down_since is not None:
            self._transition(False, "")

    def failure(self, op: str, kind: str, message: str) -> StoreError:
        h = self.health
        h.consecutive_failures += 1
        h.last_error = f"{kind}: {message}"
        h.ok = False
        if h.consecutive_failures >= self.threshold:
            now = self.clock()
            h.backoff_until = now + self.backoff
            self._next_probe = now + self.probe_interval
            if self.down_since is None:
                self._transition(True, f"{op} {h.last_error}")
        self.count(op, kind)
        return StoreError(kind, message)

    def _transition(self, down: bool, reason: str) -> None:
        now = self.clock()
        if down:
            self.down_since = now
            self._quiet = now - self._logged_at < TRANSITION_LOG_EVERY
            if self._quiet:
                self._suppressed += 1
            else:
                self._logged_at = now
                log.warning(
                    "store unavailable",
                    extra={
                        "backend": self.health.backend,
                        "reason": reason,
                        "failures": self.health.consecutive_failures,
                        "suppressed_since_last": self._suppressed,
                    },
                )
                self._suppressed = 0
        else:
            since, self.down_since = self.down_since, None
            if not self._quiet:
                log.warning(
                    "store recovered",
                    extra={
                        "backend": self.health.backend,
                        "duration_s": round(now - (since or now), 3),
                    },
                )
        if self.on_state is not None:
            self.on_state(not down)

    def count(self, op: str, kind: str) -> None:
        """Count a failure of `op` (metrics, health counters) without a back-off step."""
        key = f"{op}:{kind}"
        self.health.counters[key] = self.health.counters.get(key, 0) + 1
        if self.on_error:
            self.on_error(op, kind)
