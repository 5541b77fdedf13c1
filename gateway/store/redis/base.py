"""What every Redis deployment shares: `RedisStore`, the base of the standalone, Cluster
and Sentinel stores (gateway/store/redis/{standalone,cluster,sentinel}.py).

Owns: the redis-py asyncio calls behind the Store interface (no client-side retries, since
the gateway would rather fail fast and apply its `on_failure` policy than multiply
`store.timeout`), each call's time budget and optional connection gate, script calls
(EVALSHA; on NOSCRIPT loaded again), batches of script calls (`run_many`: one pipelined
write and one read), one background rediscovery at a time after outages, and mapping every
client error to StoreError through the FailureGuard. A subclass makes the client and says
what differs: how a script's SHA is known, what to do after an outage, how a batch is
routed, what to learn before the first call. See docs/redis.md for URL forms, hash-tag
rules and failover behaviour.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from abc import abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    ClusterDownError,
    NoScriptError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.store.base import (
    Call,
    CallBudget,
    Clock,
    FailureGuard,
    Script,
    ScriptArg,
    Store,
    StoreError,
    StoreHealth,
)
from gateway.store.redis.lane import ScriptLane

log = logging.getLogger("gateway.store")

T = TypeVar("T")
# The oldest Redis every script runs on: heartbeat_record reads with ZMSCORE (6.2).
MIN_REDIS = (6, 2)
# One call of a batch with its keys prefixed.
Prefixed = tuple[list[str], list[Any]]

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_INCR_TTL = """
local v = redis.call('INCRBY', KEYS[1], ARGV[1])
if v == tonumber(ARGV[1]) and tonumber(ARGV[2]) > 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return v
"""
_RELEASE_SCRIPT = Script("_release", _RELEASE, lambda *_: None)
_INCR_SCRIPT = Script("_incr_ttl", _INCR_TTL, lambda *_: None)

# Server errors that mean "the topology is moving" (a failover in progress, a master that
# became a replica), not "the script is wrong": they count as outages and back off.
_OUTAGE_REPLIES = (ClusterDownError, ReadOnlyError, TryAgainError)

# Least time between two background rediscoveries (a cluster's slot map, a sentinel
# service's master).
TOPOLOGY_REFRESH_INTERVAL = 1.0


def classify(exc: BaseException) -> tuple[str, str, bool]:
    """(kind, message, is_outage) for a client exception."""
    if isinstance(exc, TimeoutError | RedisTimeoutError):
        return "timeout", str(exc) or "timed out", True
    if isinstance(exc, RedisConnectionError | OSError):
        return "connection", str(exc) or type(exc).__name__, True
    if isinstance(exc, _OUTAGE_REPLIES):
        return "connection", str(exc) or type(exc).__name__, True
    if isinstance(exc, ResponseError):
        return "response", str(exc), False
    if isinstance(exc, RedisClusterException):
        msg = str(exc)
        # Keys of one call spanning slots is a bug in the caller (missing hash tag), not
        # an outage; anything else (no reachable node, slots not covered) is an outage.
        if "same key slot" in msg or "same slot" in msg:
            return "response", msg, False
        return "connection", msg or type(exc).__name__, True
    return "error", str(exc) or type(exc).__name__, True


class RedisStore(Store):
    """The Store on Redis. `RedisStore(url, ...)` builds the subclass for the URL's
    scheme (as `pathlib.Path(...)` builds the path class of the platform), so a caller
    that only holds a URL need not know the deployment; `create_store` does the same."""

    backend = "redis"
    batches = True
    # Log line when a background rediscovery fails.
    refresh_failed = "redis rediscovery failed"

    def __new__(cls, url: str, *args: Any, **kwargs: Any) -> RedisStore:
        if cls is RedisStore:
            from gateway.store.redis import store_class

            cls = store_class(url)
        return super().__new__(cls)

    def __init__(
        self,
        url: str,
        key_prefix: str = "edge:",
        *,
        timeout: float = 0.05,
        max_connections: int = 64,
        failure_threshold: int = 3,
        backoff: float = 2.0,
        probe_interval: float = 0.25,
        clock: Clock = time.monotonic,
        on_error: Callable[[str, str], None] | None = None,
        on_state: Callable[[bool], None] | None = None,
        lag: Callable[[], float] = lambda: 0.0,
    ) -> None:
        super().__init__(key_prefix, clock)
        self.url = url
        self.timeout = timeout
        # A call delayed by a busy loop may run past `timeout` up to this (the socket
        # timeout below, so a dead connection is still found by redis-py too).
        self.cap = max(timeout * 4, 0.2)
        # The event loop's recent lag (observability/looplag.py), for CallBudget.
        self.lag = lag
        # Callers queue here for a connection when the client's pool does not block when
        # full (the wait stays inside `store.timeout`); None where the pool blocks.
        self._gate: asyncio.Semaphore | None = None
        # Where script calls go when the topology has one (set by `_connect`): one
        # server, or Sentinel's master (gateway/store/redis/lane.py); else redis-py.
        self.lane: ScriptLane | None = None
        self.client: aioredis.Redis | RedisCluster = self._connect(
            max_connections,
            {
                "socket_timeout": self.cap,
                "socket_connect_timeout": self.cap,
                "retry": Retry(NoBackoff(), 0),
                "decode_responses": False,
            },
        )
        self._health = StoreHealth(backend=self.backend)
        self.guard = FailureGuard(
            self._health,
            threshold=failure_threshold,
            backoff=backoff,
            probe_interval=probe_interval,
            clock=clock,
            on_error=on_error,
            on_state=on_state,
        )
        # Script name -> SHA1.
        self._shas: dict[str, str] = {}
        self._refresh_task: asyncio.Task[None] | None = None
        self._refreshed_at = float("-inf")

    # ------------------------------------------------------------ subclass hooks

    @abstractmethod
    def _connect(
        self, max_connections: int, common: dict[str, Any]
    ) -> aioredis.Redis | RedisCluster:
        """Make the client from `self.url`; `common` are the socket and retry options."""

    def _outage(self, exc: BaseException | None) -> None:
        """A call failed as an outage (`exc` None: our own time budget ran out)."""

    async def _rediscover(self) -> None:
        """Learn the deployment afresh (slot map, master address), in the background."""

    async def _learn(self) -> None:
        """At start, before the first call: learn what a call would otherwise learn
        inside its own store.timeout."""

    async def _sha(self, script: Script) -> str:
        sha = self._shas.get(script.name)
        return sha if sha is not None else await self._load(script)

    async def _on_noscript(
        self, script: Script, keys: Sequence[str], args: Sequence[ScriptArg]
    ) -> Any:
        """EVALSHA answered NOSCRIPT (Redis restarted, SCRIPT FLUSH, a promoted replica
        that never saw it): load it and call again. On the lane, EVAL on the same
        connection: it runs the script once and caches it on that server."""
        if self.lane is None:
            sha = await self._load(script)
            return await self.client.evalsha(sha, len(keys), *keys, *args)
        return await self.lane.one(("EVAL", script.lua, len(keys), *keys, *args))

    async def _retry_head(self, script: Script) -> tuple[str, ...]:
        """The command head for pipelined calls that answered NOSCRIPT."""
        if self.lane is not None:
            return ("EVAL", script.lua)
        return ("EVALSHA", await self._load(script))

    async def _send_batch(self, script: Script, calls: list[Prefixed]) -> list[Any]:
        """Send a batch; per-call errors come back in the list (see run_many)."""
        return await self._call(script.name, lambda: self._pipeline(script, calls))

    # ------------------------------------------------------------ calls

    @property
    def health(self) -> StoreHealth:
        return self._health

    def budget(self) -> CallBudget:
        """The time budget of one call: `store.timeout`, stretched by event-loop lag."""
        return CallBudget(self.timeout, self.cap, self.lag)

    def queue_budget(self) -> CallBudget:
        # Lag-aware like a call's own budget, with room for one batch ahead: a busy loop,
        # or a call queued behind another batch, is not a failure.
        return CallBudget(self.timeout, 2 * self.cap, self.lag)

    def fail_fast(self, op: str) -> None:
        # Not guard.check(): that would spend the probe here, and the batch's own call
        # would then be refused.
        if self._health.backoff_until and self.guard.blocked():
            self.guard.count(op, "backoff")
            raise StoreError("backoff", "store unavailable (backing off after failures)")

    async def _gated(self, fn: Callable[[], Awaitable[T]]) -> T:
        if self._gate is None:
            return await fn()
        async with self._gate:
            return await fn()

    async def _call(self, op: str, fn: Callable[[], Awaitable[T]]) -> T:
        self.guard.check(op)
        try:
            async with self.budget():
                result = await self._gated(fn)
        except TimeoutError:
            self._outage(None)
            raise self.guard.failure(
                op, "timeout", f"store call exceeded {self.timeout}s"
            ) from None
        except (RedisError, RedisClusterException, OSError) as exc:
            kind, message, outage = classify(exc)
            if outage:
                self._outage(exc)
                raise self.guard.failure(op, kind, message) from None
            # A script or type error is a bug, not an outage: count it but do not back off.
            self.guard.success()
            self.guard.count(op, kind)
            raise StoreError(kind, message) from None
        self.guard.success()
        return result

    def _refresh_soon(self) -> None:
        """Rediscover in the background, one at a time and at most once per
        TOPOLOGY_REFRESH_INTERVAL, with its own time budget, never inside a request's
        store.timeout. Requests keep using what the client knows meanwhile."""
        now = self.clock()
        if self._refresh_task is not None or now - self._refreshed_at < TOPOLOGY_REFRESH_INTERVAL:
            return
        self._refreshed_at = now
        self._refresh_task = asyncio.get_running_loop().create_task(self._refresh())

    async def _refresh(self) -> None:
        try:
            async with asyncio.timeout(max(2.0, self.timeout * 20)):
                await self._rediscover()
        except Exception as exc:  # the next failing call tries again
            log.warning(self.refresh_failed, extra={"error": type(exc).__name__})
        finally:
            self._refresh_task = None

    async def ping(self) -> None:
        await self._call("ping", self.client.ping)

    async def get(self, key: str) -> bytes | None:
        k = self.k(key)
        result = await self._call("get", lambda: self.client.get(k))
        if isinstance(result, str):  # not with decode_responses=False; keeps mypy honest
            return result.encode()
        return result

    async def set(
        self, key: str, value: bytes, ttl: float | None = None, *, nx: bool = False
    ) -> bool:
        k = self.k(key)
        px = max(1, int(ttl * 1000)) if ttl else None
        result = await self._call("set", lambda: self.client.set(k, value, px=px, nx=nx))
        return bool(result)

    async def delete(self, *keys: str) -> int:
        ks = [self.k(k) for k in keys]
        if not ks:
            return 0
        # On a cluster redis-py splits a multi-key DEL by slot (not atomic across slots,
        # which no caller needs: each key is deleted or not on its own).
        return int(await self._call("delete", lambda: self.client.delete(*ks)))

    async def incr(self, key: str, amount: int = 1, ttl: float | None = None) -> int:
        k = self.k(key)
        px = int(ttl * 1000) if ttl else 0
        return int(await self._call("incr", lambda: self._eval(_INCR_SCRIPT, [k], [amount, px])))

    async def delete_if_equals(self, key: str, value: bytes) -> bool:
        k = self.k(key)
        return bool(await self._call("release", lambda: self._eval(_RELEASE_SCRIPT, [k], [value])))

    async def run(self, script: Script, keys: Sequence[str], args: Sequence[ScriptArg]) -> Any:
        ks = [self.k(k) for k in keys]
        return await self._call(script.name, lambda: self._eval(script, ks, args))

    async def run_many(self, script: Script, calls: Sequence[Call]) -> list[Any]:
        """Run `script` once per (keys, args) in `calls` (keys unprefixed), sent together:
        one pipelined write and one read per server. Each call is still its own atomic
        EVALSHA; nothing is atomic *across* calls.

        Returns one entry per call, in order: the reply, or a StoreError for that call
        alone (a script error, a slot moving mid-failover). Raises StoreError when the
        batch as a whole failed (timeout, connection, backing off): the caller decides
        with its `on_failure` rule as for `run`."""
        if not calls:
            return []
        prefixed = [([self.k(k) for k in keys], list(args)) for keys, args in calls]
        replies = await self._send_batch(script, prefixed)
        out: list[Any] = []
        outage: StoreError | None = None
        # A batch that some server answered is not an outage of the store: the failed
        # calls are errors of their own, and must not push every feature into back-off.
        partial = any(not isinstance(r, Exception) for r in replies)
        for reply in replies:
            if not isinstance(reply, Exception):
                out.append(reply)
                continue
            kind, message, is_outage = classify(reply)
            if is_outage and outage is None:
                if partial:
                    self.guard.count(script.name, kind)
                    outage = StoreError(kind, message)
                else:
                    # One failure per batch, not per call, for the back-off count.
                    outage = self.guard.failure(script.name, kind, message)
            elif not is_outage:
                self.guard.count(script.name, kind)
            out.append(outage if is_outage else StoreError(kind, message))
        return out

    # ------------------------------------------------------------ scripts

    async def _load(self, script: Script) -> str:
        # Through the pool even where calls take the lane: a server that never saw it
        # answers NOSCRIPT, and the lane then runs it with EVAL (see _on_noscript).
        sha = str(await self.client.script_load(script.lua))
        self._shas[script.name] = sha
        return sha

    async def _eval(self, script: Script, keys: Sequence[str], args: Sequence[ScriptArg]) -> Any:
        sha = await self._sha(script)
        try:
            if self.lane is None:
                return await self.client.evalsha(sha, len(keys), *keys, *args)
            return await self.lane.one(("EVALSHA", sha, len(keys), *keys, *args))
        except NoScriptError:
            return await self._on_noscript(script, keys, args)

    async def _pipeline(self, script: Script, calls: list[Prefixed]) -> list[Any]:
        if len(calls) == 1:
            # Alone (low load): a plain EVALSHA is cheaper than a pipeline of one.
            keys, args = calls[0]
            return [await self._eval(script, keys, args)]
        sha = await self._sha(script)
        replies = await self._commands([("EVALSHA", sha, len(k), *k, *a) for k, a in calls])
        missing = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
        if missing:
            # Send only those again (the others ran and must not run twice).
            head = await self._retry_head(script)
            again = [(*head, len(calls[i][0]), *calls[i][0], *calls[i][1]) for i in missing]
            for i, r in zip(missing, await self._commands(again), strict=True):
                replies[i] = r
        return replies

    async def _commands(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Send raw commands together (one write per server); a reply, or the error for
        that command alone, per command."""
        if self.lane is not None:
            return await self.lane.call(commands)
        pipe = self.client.pipeline(transaction=False)
        for command in commands:
            # execute_command, not pipe.evalsha(): redis-py's ClusterPipeline blocks the
            # evalsha() method (scripts may touch any key), but routes a raw EVALSHA by its
            # declared keys, which is exactly the contract every Script keeps.
            pipe.execute_command(*command)
        return list(await pipe.execute(raise_on_error=False))

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        # Not fatal: /readyz reports it and requests follow on_failure until it answers.
        with contextlib.suppress(Exception):
            await self._learn()
        with contextlib.suppress(StoreError):
            await self.ping()
        with contextlib.suppress(Exception):
            await self._check_version()

    async def _check_version(self) -> None:
        """Say at start when the server is older than the scripts need: otherwise every
        call of such a script fails and follows on_failure with only Redis's "unknown
        command" to explain it. On a cluster INFO goes to one node (redis-py's default node):
        the check sees that node's version. A reply without a version is skipped."""
        info = await self.client.info("server")
        version = info.get("redis_version") if isinstance(info, dict) else None
        if not isinstance(version, str):
            return
        parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
        if parts < MIN_REDIS:
            log.warning(
                "Redis %s is older than %d.%d: the heartbeat scripts will fail and follow "
                "on_failure",
                version,
                *MIN_REDIS,
                extra={"redis_version": version},
            )

    async def close(self) -> None:
        if self._refresh_task is not None:
            self._refresh_task.cancel()
            with contextlib.suppress(BaseException):
                await self._refresh_task
        try:
            if self.lane is not None:
                await self.lane.close()
        finally:
            await self.client.aclose()
