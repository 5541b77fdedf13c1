"""Redis Cluster: `redis+cluster://host:port[,host:port...]`.

Owns: the cluster client and its connection gate (per-master pools raise when full
instead of blocking), script SHAs computed locally (no SCRIPT LOAD to every master),
batches split by master and sent concurrently, and keeping the slot map current without
stalling requests: after an outage the map is re-read in the background, and the default
node (keyless commands) is kept off a master that just failed.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import Sequence
from typing import Any

from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.exceptions import RedisClusterException, RedisError

from gateway.store.base import Script, ScriptArg
from gateway.store.redis.base import Prefixed, RedisStore, classify
from gateway.store.redis.url import parse_store_url

# How long a cluster node that failed a call is kept off the default-node role.
FAILED_NODE_MEMORY = 30.0


def _keep_slot_map(client: RedisCluster) -> None:
    """Tell redis-py its slot map is current. The one private attribute this store
    touches: after a connection error redis-py sets `_initialize` and re-reads the map
    inline on the next call, inside that call's store.timeout, then sends COMMAND to the
    first master, dead or not; and `RedisCluster.initialize()` (the public way, redis-py
    8.1 redis/asyncio/cluster.py) does exactly that inline read. There is no public
    switch to keep serving from the current map while our background refresh
    (`_rediscover`) replaces it, nor to mark a map we read ourselves as current."""
    client._initialize = False


class RedisClusterStore(RedisStore):
    backend = "redis-cluster"
    refresh_failed = "cluster slot map refresh failed"
    client: RedisCluster

    def _connect(self, max_connections: int, common: dict[str, Any]) -> RedisCluster:
        if "{" in self.prefix or "}" in self.prefix:
            raise ValueError("store.key_prefix must not contain braces on Redis Cluster")
        parsed = parse_store_url(self.url)
        if parsed is None or parsed.kind != "cluster":
            raise ValueError(f"{type(self).__name__} wants a redis+cluster:// URL")
        self._gate = asyncio.Semaphore(max_connections)
        # Cluster node name -> when a call to it last failed (see _avoid_failed_default).
        self._failed_nodes: dict[str, float] = {}
        return RedisCluster(
            startup_nodes=[ClusterNode(h, p) for h, p in parsed.nodes],
            username=parsed.username,
            password=parsed.password,
            # Per master; the gate keeps the total in flight at max_connections.
            max_connections=max_connections + 4,
            **common,
        )

    # --------------------------------------------------------- topology

    def _outage(self, exc: BaseException | None) -> None:
        """After a call failed as an outage (timeout, lost node, CLUSTERDOWN): remember
        the node, keep the default node on a live master, and re-read the slot map in
        the background. A master that hangs (no RST) lets no call fail with a connection
        error, so redis-py never refreshes the map, and a refresh bounded by 50 ms would
        be cut off at the hung node every time; the slots it served would stay failed
        after their replica took over."""
        now = self.clock()
        name = getattr(exc, "last_failed_node_name", None)
        if isinstance(name, str):
            self._failed_nodes[name] = now
        if self._ready():
            # A dead master owning slot 0 would otherwise fail every call until the
            # cluster failed it over (see _keep_slot_map).
            _keep_slot_map(self.client)
        self._avoid_failed_default(now)
        self._refresh_soon()

    def _ready(self) -> bool:
        return bool(self.client.nodes_manager.slots_cache) and bool(
            self.client.commands_parser.commands
        )

    def _avoid_failed_default(self, now: float) -> None:
        # The default node answers keyless commands: the health PING and, on a refresh,
        # COMMAND. Keep it off a master that just failed.
        failed = {n for n, t in self._failed_nodes.items() if now - t < FAILED_NODE_MEMORY}
        node = self.client.get_default_node()
        if node is None or node.name not in failed:
            return
        live = [n for n in self.client.get_primaries() if n.name not in failed]
        if live:
            self.client.set_default_node(random.choice(live))

    async def _rediscover(self) -> None:
        """redis-py's `initialize()` (slot map, then COMMAND for key positions), except
        that COMMAND goes to a master that answers. CLUSTER SLOTS is asked of the known
        nodes in random order; a hung one costs its socket timeout, then the next is
        asked. The new map replaces the old at once."""
        client = self.client
        await client.nodes_manager.initialize()
        self._avoid_failed_default(self.clock())
        if not client.commands_parser.commands:
            await self._learn_commands()
        _keep_slot_map(client)

    async def _learn_commands(self) -> None:
        client = self.client
        default = client.get_default_node()
        others = [n for n in client.get_primaries() if n is not default]
        error: BaseException | None = None
        for node in [default, *random.sample(others, len(others))]:
            try:
                await client.commands_parser.initialize(node)
            except (RedisError, OSError) as exc:
                self._failed_nodes[node.name] = self.clock()
                error = exc
                continue
            client.set_default_node(node)
            return
        raise error or RedisClusterException("no master answered COMMAND")

    async def _learn(self) -> None:
        # The slot map up front, with more time than one call gets, so the first
        # requests do not pay for it inside store.timeout.
        async with asyncio.timeout(max(1.0, self.timeout * 10)):
            await self._rediscover()

    # --------------------------------------------------------- scripts and batches

    async def _sha(self, script: Script) -> str:
        # No SCRIPT LOAD on a cluster: redis-py sends it to every master, so one dead
        # master would fail every script call, healthy slots included. The SHA1 is the
        # script's own; a master without it answers NOSCRIPT and gets an EVAL. Redis
        # names scripts by SHA1 (an identifier here, not a security measure).
        sha = self._shas.get(script.name)
        if sha is None:
            digest = hashlib.sha1(script.lua.encode(), usedforsecurity=False)
            sha = self._shas[script.name] = digest.hexdigest()
        return sha

    async def _on_noscript(
        self, script: Script, keys: Sequence[str], args: Sequence[ScriptArg]
    ) -> Any:
        # EVAL goes to the slot's master only, and caches the script there.
        return await self.client.eval(script.lua, len(keys), *keys, *args)

    async def _retry_head(self, script: Script) -> tuple[str, ...]:
        return ("EVAL", script.lua)

    async def _send_batch(self, script: Script, calls: list[Prefixed]) -> list[Any]:
        """One pipeline per master, each with its own `store.timeout`: a hung or dead
        master fails only the calls whose slots it owns (redis-py's ClusterPipeline would
        fail the whole batch, healthy masters' calls included, after those had already
        run). Raises StoreError only when no master answered."""
        if len(calls) == 1:
            return await super()._send_batch(script, calls)
        op = script.name
        self.guard.check(op)
        groups = self._by_master(calls)

        async def one(indexes: list[int]) -> list[Any]:
            async with self.budget():
                batch = [calls[i] for i in indexes]
                return await self._gated(lambda: self._pipeline(script, batch))

        results = await asyncio.gather(*(one(ix) for ix in groups), return_exceptions=True)
        replies: list[Any] = [None] * len(calls)
        failed: BaseException | None = None
        for indexes, result in zip(groups, results, strict=True):
            if isinstance(result, asyncio.CancelledError):
                raise result
            if isinstance(result, BaseException):
                failed = failed or result
                self._outage(result if not isinstance(result, TimeoutError) else None)
                result = [result] * len(indexes)
            for i, reply in zip(indexes, result, strict=True):
                replies[i] = reply
        if failed is not None and all(isinstance(r, BaseException) for r in results):
            kind, message, _ = classify(failed)
            raise self.guard.failure(op, kind, message)
        self.guard.success()
        return replies

    def _by_master(self, calls: list[Prefixed]) -> list[list[int]]:
        """Indexes of `calls` grouped by the master owning their slot."""
        groups: dict[str, list[int]] = {}
        for i, (keys, _) in enumerate(calls):
            try:
                node = self.client.get_node_from_key(keys[0])
                name = node.name if node is not None else "?"
            except (RedisError, RedisClusterException):
                name = "?"  # no slot map yet: let redis-py route (and fail) this group
            groups.setdefault(name, []).append(i)
        return list(groups.values())
