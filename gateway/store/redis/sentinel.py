"""Redis behind Sentinel: `redis+sentinel://host:port[,host:port...]/service_name[/db]`.

Owns: the master-following client (`Sentinel.master_for`), the connection gate (its pool
raises when full instead of blocking), the script lane on the master (gateway/store/redis/
lane.py), and finding the master again in the background after an outage, so a dead
first sentinel does not eat every call's budget.
"""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.sentinel import Sentinel

from gateway.store.redis.base import RedisStore
from gateway.store.redis.lane import ScriptLane
from gateway.store.redis.url import parse_store_url


class SentinelRedisStore(RedisStore):
    backend = "redis-sentinel"
    refresh_failed = "sentinel master discovery failed"

    def _connect(self, max_connections: int, common: dict[str, Any]) -> aioredis.Redis:
        parsed = parse_store_url(self.url)
        if parsed is None or parsed.kind != "sentinel":
            raise ValueError(f"{type(self).__name__} wants a redis+sentinel:// URL")
        self._gate = asyncio.Semaphore(max_connections)
        sentinel_kwargs = {
            k: v for k, v in common.items() if k.startswith("socket_") or k == "retry"
        }
        self._sentinel = Sentinel(parsed.nodes, sentinel_kwargs=sentinel_kwargs)  # type: ignore[no-untyped-call, unused-ignore]
        self._service = parsed.service
        client: aioredis.Redis = self._sentinel.master_for(
            parsed.service,
            # The gate keeps the total in flight at max_connections.
            max_connections=max_connections + 4,
            username=parsed.username,
            password=parsed.password,
            db=parsed.db,
            **common,
        )
        # Script calls take the lane, on connections of the pool's class: they ask the
        # sentinels for the master when they connect and turn a READONLY answer from a
        # demoted one into a connection error. A failed call drops the idle ones too,
        # so the next call connects afresh instead of trying each (see ScriptLane).
        self.lane = ScriptLane(
            client.connection_pool, max_connections + 4, drop_idle_on_failure=True
        )
        return client

    def _outage(self, exc: BaseException | None) -> None:
        """A new connection asks the sentinels for the master in list order, each dead
        one costing its connect timeout: with the first sentinel down, that lookup never
        fits in store.timeout, so no connection could ever be made. A lookup in the
        background, with its own budget, reaches a live sentinel, and redis-py then
        moves it to the front of the list for every later lookup."""
        self._refresh_soon()

    async def _rediscover(self) -> None:
        await self._sentinel.discover_master(self._service)

    async def _learn(self) -> None:
        # The master's address up front: a first sentinel that is down would otherwise
        # eat every early call's budget (see _outage).
        async with asyncio.timeout(max(2.0, self.timeout * 20)):
            await self._rediscover()

    async def close(self) -> None:
        try:
            await super().close()
        finally:
            for s in self._sentinel.sentinels:
                await s.aclose()
