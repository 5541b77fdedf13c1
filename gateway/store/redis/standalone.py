"""One Redis server: `redis://`, `rediss://`, `unix://` (redis-py parses the URL).

Owns: the single-server client with a blocking connection pool (callers queue for a
connection inside `store.timeout`), and which way script calls take: the ScriptLane
(gateway/store/redis/lane.py), with connections of the pool's class and arguments.
Everything else is the RedisStore base's.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis

from gateway.store.redis.base import RedisStore
from gateway.store.redis.lane import ScriptLane


class StandaloneRedisStore(RedisStore):
    backend = "redis"

    def _connect(self, max_connections: int, common: dict[str, Any]) -> aioredis.Redis:
        pool = aioredis.BlockingConnectionPool.from_url(
            self.url,
            max_connections=max_connections,
            timeout=max(self.timeout, 0.001),
            **common,
        )
        # Script calls (every hot path's) take the lane; other commands the pool. Each
        # holds up to max_connections.
        self.lane = ScriptLane(pool, max_connections)
        return aioredis.Redis(connection_pool=pool)
