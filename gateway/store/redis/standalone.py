"""One Redis server: `redis://`, `rediss://`, `unix://` (redis-py parses the URL).

Owns: the single-server client with a blocking connection pool (callers queue for a
connection inside `store.timeout`). Everything else is the RedisStore base's.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis

from gateway.store.redis.base import RedisStore


class StandaloneRedisStore(RedisStore):
    backend = "redis"

    def _connect(self, max_connections: int, common: dict[str, Any]) -> aioredis.Redis:
        pool = aioredis.BlockingConnectionPool.from_url(
            self.url,
            max_connections=max_connections,
            timeout=max(self.timeout, 0.001),
            **common,
        )
        return aioredis.Redis(connection_pool=pool)
