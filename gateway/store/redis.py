"""Redis store: one server (`redis://`, `rediss://`, `unix://`), Redis Cluster
(`redis+cluster://host:port[,host:port...]`) and Sentinel
(`redis+sentinel://host:port[,host:port...]/service_name[/db]`).

Owns: the redis-py asyncio client of each kind (no client-side retries, since the gateway
would rather fail fast and apply its `on_failure` policy than multiply `store.timeout`),
store-URL parsing, script calls (EVALSHA; on NOSCRIPT loaded again, or on a cluster sent
as EVAL to that master only), batches of script calls (`run_many`: one pipelined write
per server, which on a cluster means one per master touched, sent concurrently), keeping a
cluster's slot map current without stalling requests (background refresh after failures),
and mapping every client error to StoreError through the FailureGuard. See docs/redis.md
for URL forms, hash-tag rules and failover behaviour.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
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
    CallBudget,
    Clock,
    FailureGuard,
    Script,
    ScriptArg,
    Store,
    StoreError,
    StoreHealth,
)

log = logging.getLogger("gateway.store")

T = TypeVar("T")
Call = tuple[Sequence[str], Sequence[ScriptArg]]

CLUSTER_SCHEME = "redis+cluster"
SENTINEL_SCHEME = "redis+sentinel"
PLAIN_SCHEMES = frozenset({"redis", "rediss", "unix"})

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

# Cluster: least time between two background re-reads of the slot map.
TOPOLOGY_REFRESH_INTERVAL = 1.0
# How long a cluster node that failed a call is kept off the default-node role.
FAILED_NODE_MEMORY = 30.0


@dataclass(frozen=True)
class StoreURL:
    """A parsed `redis+cluster://` or `redis+sentinel://` URL."""

    kind: str  # "cluster" | "sentinel"
    nodes: tuple[tuple[str, int], ...]
    username: str | None = None
    password: str | None = None
    service: str = ""
    db: int = 0


def _nodes(netloc: str, scheme: str) -> tuple[tuple[str, int], ...]:
    out: list[tuple[str, int]] = []
    for part in netloc.split(","):
        host, sep, port = part.strip().rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{scheme}:// wants host:port[,host:port...], got {part!r}")
        out.append((host.strip("[]"), int(port)))
    return tuple(out)


def parse_store_url(url: str) -> StoreURL | None:
    """Parse a cluster or sentinel URL (None for any other scheme). Raises ValueError with
    a message fit for `gateway check` when the URL is malformed."""
    scheme, _, rest = url.partition("://")
    if scheme not in (CLUSTER_SCHEME, SENTINEL_SCHEME):
        return None
    # urlsplit would choke on the comma-separated host list, so split by hand.
    netloc, _, path = rest.partition("/")
    path, _, query = path.partition("?")
    if query:
        raise ValueError(f"{scheme}:// takes no query string")
    username = password = None
    if "@" in netloc:
        userinfo, _, netloc = netloc.rpartition("@")
        user, sep, pw = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(pw) if sep else None
    nodes = _nodes(netloc, scheme)
    parts = [p for p in path.split("/") if p]
    if scheme == CLUSTER_SCHEME:
        if parts and parts != ["0"]:
            raise ValueError("Redis Cluster has only database 0; drop the path")
        return StoreURL("cluster", nodes, username, password)
    if not parts or len(parts) > 2:
        raise ValueError("redis+sentinel:// wants host:port[,host:port]/service_name[/db]")
    db = 0
    if len(parts) == 2:
        if not parts[1].isdigit():
            raise ValueError(f"database must be a number, got {parts[1]!r}")
        db = int(parts[1])
    return StoreURL("sentinel", nodes, username, password, unquote(parts[0]), db)


def check_store_url(url: str) -> None:
    """For the config validator: ValueError if `url` is not a store URL the gateway can use."""
    scheme = url.partition("://")[0] if "://" in url else urlsplit(url).scheme
    if scheme in PLAIN_SCHEMES or scheme == "memory":
        return
    if parse_store_url(url) is None:
        raise ValueError(
            f"unsupported store scheme {scheme!r}; use memory://, redis://, rediss://, "
            "unix://, redis+cluster:// or redis+sentinel://"
        )


def _error(exc: BaseException) -> tuple[str, str, bool]:
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
    backend = "redis"

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
        super().__init__(key_prefix)
        self.url = url
        self.timeout = timeout
        # A call delayed by a busy loop may run past `timeout` up to this (the socket
        # timeout below, so a dead connection is still found by redis-py too).
        self.cap = max(timeout * 4, 0.2)
        # The event loop's recent lag (observability/looplag.py), for CallBudget.
        self.lag = lag
        parsed = parse_store_url(url)
        common: dict[str, Any] = {
            "socket_timeout": self.cap,
            "socket_connect_timeout": self.cap,
            "retry": Retry(NoBackoff(), 0),
            "decode_responses": False,
        }
        # Cluster and Sentinel pools do not block when full (they raise "too many
        # connections"); this gate makes callers queue for a connection instead, like the
        # single-server BlockingConnectionPool, with the wait inside `store.timeout`.
        self._gate: asyncio.Semaphore | None = None
        self.client: aioredis.Redis | RedisCluster
        if parsed is None:
            pool = aioredis.BlockingConnectionPool.from_url(
                url, max_connections=max_connections, timeout=max(timeout, 0.001), **common
            )
            self.client = aioredis.Redis(connection_pool=pool)
        elif parsed.kind == "cluster":
            if "{" in key_prefix or "}" in key_prefix:
                raise ValueError("store.key_prefix must not contain braces on Redis Cluster")
            self.backend = "redis-cluster"
            self._gate = asyncio.Semaphore(max_connections)
            self.client = RedisCluster(
                startup_nodes=[ClusterNode(h, p) for h, p in parsed.nodes],
                username=parsed.username,
                password=parsed.password,
                # Per master; the gate keeps the total in flight at max_connections.
                max_connections=max_connections + 4,
                **common,
            )
        else:
            self.backend = "redis-sentinel"
            self._gate = asyncio.Semaphore(max_connections)
            sentinel_kwargs = {
                k: v for k, v in common.items() if k.startswith("socket_") or k == "retry"
            }
            sentinel = Sentinel(parsed.nodes, sentinel_kwargs=sentinel_kwargs)  # type: ignore[no-untyped-call]
            self.client = sentinel.master_for(
                parsed.service,
                max_connections=max_connections + 4,
                username=parsed.username,
                password=parsed.password,
                db=parsed.db,
                **common,
            )
            self._sentinel = sentinel
            self._service = parsed.service
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
        # Script name -> SHA1 (loaded on one server; computed locally on a cluster).
        self._shas: dict[str, str] = {}
        self._refresh_task: asyncio.Task[None] | None = None
        self._refreshed_at = float("-inf")
        # Cluster node name -> when a call to it last failed (see _avoid_failed_default).
        self._failed_nodes: dict[str, float] = {}

    @property
    def health(self) -> StoreHealth:
        return self._health

    def budget(self) -> CallBudget:
        """The time budget of one call: `store.timeout`, stretched by event-loop lag."""
        return CallBudget(self.timeout, self.cap, self.lag)

    async def _call(self, op: str, fn: Callable[[], Awaitable[T]]) -> T:
        self.guard.check(op)
        try:
            async with self.budget():
                if self._gate is None:
                    result = await fn()
                else:
                    async with self._gate:
                        result = await fn()
        except TimeoutError:
            self._cluster_outage(None)
            raise self.guard.failure(
                op, "timeout", f"store call exceeded {self.timeout}s"
            ) from None
        except (RedisError, RedisClusterException, OSError) as exc:
            kind, message, outage = _error(exc)
            if outage:
                self._cluster_outage(exc)
                raise self.guard.failure(op, kind, message) from None
            # A script or type error is a bug, not an outage: count it but do not back off.
            self.guard.success()
            self.guard._count(op, kind)
            raise StoreError(kind, message) from None
        self.guard.success()
        return result

    # --------------------------------------------------------- cluster topology

    def _cluster_outage(self, exc: BaseException | None) -> None:
        """Cluster only, after a call failed as an outage (timeout, lost node, CLUSTERDOWN):
        remember the node, keep the default node on a live master, and re-read the slot
        map in the background. (Sentinel: rediscover the master in the background.)"""
        client = self.client
        if self.backend == "redis-sentinel":
            self._sentinel_suspect(time.monotonic())
            return
        if not isinstance(client, RedisCluster):
            return
        now = time.monotonic()
        name = getattr(exc, "last_failed_node_name", None)
        if isinstance(name, str):
            self._failed_nodes[name] = now
        if client._initialize and self._cluster_ready():
            # redis-py would re-read the map inline on the next call, inside that call's
            # store.timeout, and then send COMMAND to the first master, dead or not: a dead
            # master owning slot 0 would fail every call until the cluster failed it over.
            # Keep serving from the current map; the background refresh replaces it.
            client._initialize = False
        self._avoid_failed_default(now)
        self._topology_suspect(now)

    def _cluster_ready(self) -> bool:
        assert isinstance(self.client, RedisCluster)
        return bool(self.client.nodes_manager.slots_cache) and bool(
            self.client.commands_parser.commands
        )

    def _avoid_failed_default(self, now: float) -> None:
        # The default node answers keyless commands: the health PING and, on a refresh,
        # COMMAND. Keep it off a master that just failed.
        assert isinstance(self.client, RedisCluster)
        failed = {n for n, t in self._failed_nodes.items() if now - t < FAILED_NODE_MEMORY}
        node = self.client.get_default_node()
        if node is None or node.name not in failed:
            return
        live = [n for n in self.client.get_primaries() if n.name not in failed]
        if live:
            self.client.set_default_node(random.choice(live))

    async def _cluster_init(self) -> None:
        """redis-py's `initialize()` (slot map, then COMMAND for key positions), except
        that COMMAND goes to a master that answers."""
        client = self.client
        assert isinstance(client, RedisCluster)
        await client.nodes_manager.initialize()
        self._avoid_failed_default(time.monotonic())
        if not client.commands_parser.commands:
            default = client.get_default_node()
            others = [n for n in client.get_primaries() if n is not default]
            error: BaseException | None = None
            for node in [default, *random.sample(others, len(others))]:
                try:
                    await client.commands_parser.initialize(node)
                except (RedisError, OSError) as exc:
                    self._failed_nodes[node.name] = time.monotonic()
                    error = exc
                    continue
                client.set_default_node(node)
                break
            else:
                raise error or RedisClusterException("no master answered COMMAND")
        client._initialize = False

    def _topology_suspect(self, now: float) -> None:
        """Re-read the slot map in the background, one refresh at a time and at most one
        per TOPOLOGY_REFRESH_INTERVAL, with its own time budget. Not inside a request's
        `store.timeout`: a master that hangs (no RST) lets no call fail with a connection
        error, so redis-py never refreshes the map, and a refresh bounded by 50 ms would be
        cut off at the hung node every time; the slots it served would stay failed after
        their replica took over. Requests keep using the current map meanwhile."""
        if self._refresh_task is not None or now - self._refreshed_at < TOPOLOGY_REFRESH_INTERVAL:
            return
        self._refreshed_at = now
        self._refresh_task = asyncio.get_running_loop().create_task(self._refresh_topology())

    def _sentinel_suspect(self, now: float) -> None:
        """A new connection asks the sentinels for the master in list order, each dead
        one costing its connect timeout: with the first sentinel down, that lookup never
        fits in store.timeout, so no connection could ever be made. A lookup in the
        background, with its own budget, reaches a live sentinel, and redis-py then
        moves it to the front of the list for every later lookup."""
        if self._refresh_task is not None or now - self._refreshed_at < TOPOLOGY_REFRESH_INTERVAL:
            return
        self._refreshed_at = now

        async def rediscover() -> None:
            try:
                async with asyncio.timeout(max(2.0, self.timeout * 20)):
                    await self._sentinel.discover_master(self._service)
            except Exception as exc:  # the next failing call tries again
                log.warning("sentinel master discovery failed", extra={"error": type(exc).__name__})
            finally:
                self._refresh_task = None

        self._refresh_task = asyncio.get_running_loop().create_task(rediscover())

    async def _refresh_topology(self) -> None:
        try:
            # CLUSTER SLOTS from the known nodes in random order; a hung one costs its
            # socket timeout, then the next is asked. The new map replaces the old at once.
            async with asyncio.timeout(max(2.0, self.timeout * 20)):
                await self._cluster_init()
        except Exception as exc:  # the next failing call tries again
            log.warning("cluster slot map refresh failed", extra={"error": type(exc).__name__})
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
        EVALSHA; nothing is atomic *across* calls. On a cluster the calls are grouped by
        the master owning their slot and the groups go out concurrently, so the wait is
        about one round trip to the slowest master involved.

        Returns one entry per call, in order: the reply, or a StoreError for that call
        alone (a script error, a slot moving mid-failover). Raises StoreError when the
        batch as a whole failed (timeout, connection, backing off): the caller decides
        with its `on_failure` rule as for `run`."""
        if not calls:
            return []
        prefixed = [([self.k(k) for k in keys], list(args)) for keys, args in calls]
        if isinstance(self.client, RedisCluster) and len(prefixed) > 1:
            replies = await self._cluster_batches(script, prefixed)
        else:
            replies = await self._call(script.name, lambda: self._pipeline(script, prefixed))
        out: list[Any] = []
        outage: StoreError | None = None
        # A batch that some server answered is not an outage of the store: the failed
        # calls are errors of their own, and must not push every feature into back-off.
        partial = any(not isinstance(r, Exception) for r in replies)
        for reply in replies:
            if not isinstance(reply, Exception):
                out.append(reply)
                continue
            kind, message, is_outage = _error(reply)
            if is_outage and outage is None:
                if partial:
                    self.guard._count(script.name, kind)
                    outage = StoreError(kind, message)
                else:
                    # One failure per batch, not per call, for the back-off count.
                    outage = self.guard.failure(script.name, kind, message)
            elif not is_outage:
                self.guard._count(script.name, kind)
            out.append(outage if is_outage else StoreError(kind, message))
        return out

    async def _cluster_batches(
        self, script: Script, calls: list[tuple[list[str], list[Any]]]
    ) -> list[Any]:
        """One pipeline per master, each with its own `store.timeout`: a hung or dead
        master fails only the calls whose slots it owns (redis-py's ClusterPipeline would
        fail the whole batch, healthy masters' calls included, after those had already
        run). Raises StoreError only when no master answered."""
        op = script.name
        self.guard.check(op)
        client = self.client
        assert isinstance(client, RedisCluster)
        groups: dict[str, list[int]] = {}
        for i, (keys, _) in enumerate(calls):
            try:
                node = client.get_node_from_key(keys[0])
                name = node.name if node is not None else "?"
            except (RedisError, RedisClusterException):
                name = "?"  # no slot map yet: let redis-py route (and fail) this group
            groups.setdefault(name, []).append(i)

        async def one(indexes: list[int]) -> list[Any]:
            async with self.budget():
                batch = [calls[i] for i in indexes]
                if self._gate is None:
                    return await self._pipeline(script, batch)
                async with self._gate:
                    return await self._pipeline(script, batch)

        results = await asyncio.gather(*(one(ix) for ix in groups.values()), return_exceptions=True)
        replies: list[Any] = [None] * len(calls)
        failed: BaseException | None = None
        answered = False
        for indexes, result in zip(groups.values(), results, strict=True):
            if isinstance(result, asyncio.CancelledError):
                raise result
            if isinstance(result, BaseException):
                failed = failed or result
                self._cluster_outage(result if not isinstance(result, TimeoutError) else None)
                for i in indexes:
                    replies[i] = result
                continue
            answered = True
            for i, reply in zip(indexes, result, strict=True):
                replies[i] = reply
        if not answered and failed is not None:
            kind, message, _ = _error(failed)
            raise self.guard.failure(op, kind, message)
        self.guard.success()
        return replies

    async def _load(self, script: Script) -> str:
        sha = str(await self.client.script_load(script.lua))
        self._shas[script.name] = sha
        return sha

    async def _sha(self, script: Script) -> str:
        sha = self._shas.get(script.name)
        if sha is not None:
            return sha
        if isinstance(self.client, RedisCluster):
            # No SCRIPT LOAD on a cluster: redis-py sends it to every master, so one dead
            # master would fail every script call, healthy slots included. The SHA1 is
            # the script's own; a master without it answers NOSCRIPT and gets an EVAL.
            # Redis names scripts by SHA1 (an identifier here, not a security measure).
            digest = hashlib.sha1(script.lua.encode(), usedforsecurity=False)
            sha = self._shas[script.name] = digest.hexdigest()
            return sha
        return await self._load(script)

    async def _eval(self, script: Script, keys: Sequence[str], args: Sequence[ScriptArg]) -> Any:
        sha = await self._sha(script)
        try:
            return await self.client.evalsha(sha, len(keys), *keys, *args)
        except NoScriptError:
            # Redis restarted, SCRIPT FLUSH, or a promoted replica that never saw it.
            if isinstance(self.client, RedisCluster):
                # EVAL goes to the slot's master only, and caches the script there.
                return await self.client.eval(script.lua, len(keys), *keys, *args)
            sha = await self._load(script)
            return await self.client.evalsha(sha, len(keys), *keys, *args)

    async def _pipeline(
        self, script: Script, calls: list[tuple[list[str], list[Any]]]
    ) -> list[Any]:
        if len(calls) == 1:
            # Alone (low load): a plain EVALSHA is cheaper than a pipeline of one.
            keys, args = calls[0]
            return [await self._eval(script, keys, args)]
        sha = await self._sha(script)
        pipe = self.client.pipeline(transaction=False)
        for keys, args in calls:
            # execute_command, not pipe.evalsha(): redis-py's ClusterPipeline blocks the
            # evalsha() method (scripts may touch any key), but routes a raw EVALSHA by its
            # declared keys, which is exactly the contract every Script keeps.
            pipe.execute_command("EVALSHA", sha, len(keys), *keys, *args)
        replies: list[Any] = await pipe.execute(raise_on_error=False)
        missing = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
        if missing:
            # Send only those again (the others ran and must not run twice): one server
            # loads the script once; on a cluster each goes as EVAL to its own master.
            cluster = isinstance(self.client, RedisCluster)
            head: tuple[str, ...] = (
                ("EVAL", script.lua) if cluster else ("EVALSHA", await self._load(script))
            )
            pipe = self.client.pipeline(transaction=False)
            for i in missing:
                keys, args = calls[i]
                pipe.execute_command(*head, len(keys), *keys, *args)
            for i, r in zip(missing, await pipe.execute(raise_on_error=False), strict=True):
                replies[i] = r
        return replies

    async def start(self) -> None:
        # Not fatal: /readyz reports it and requests follow on_failure until it answers.
        if isinstance(self.client, RedisCluster):
            # Learn the slot map up front, with more time than one call gets, so the
            # first requests do not pay for it inside store.timeout.
            with contextlib.suppress(Exception):
                async with asyncio.timeout(max(1.0, self.timeout * 10)):
                    await self._cluster_init()
        elif self.backend == "redis-sentinel":
            # The same for the master's address: a first sentinel that is down would
            # otherwise eat every early call's budget (see _sentinel_suspect).
            with contextlib.suppress(Exception):
                async with asyncio.timeout(max(2.0, self.timeout * 20)):
                    await self._sentinel.discover_master(self._service)
        with contextlib.suppress(StoreError):
            await self.ping()

    async def close(self) -> None:
        if self._refresh_task is not None:
            self._refresh_task.cancel()
            with contextlib.suppress(BaseException):
                await self._refresh_task
        await self.client.aclose()
        if self.backend == "redis-sentinel":
            for s in self._sentinel.sentinels:
                await s.aclose()
