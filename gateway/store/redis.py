"""Redis store (`redis://`, `rediss://`, `unix://`).

Owns: the redis-py asyncio client (hiredis parser, bounded blocking pool, no client-side
retries, since the gateway would rather fail fast and apply its `on_failure` policy than
multiply `store.timeout`), script registration (EVALSHA, loaded on NOSCRIPT), and mapping
every client error to StoreError through the FailureGuard.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.store.base import (
    Clock,
    FailureGuard,
    Script,
    ScriptArg,
    Store,
    StoreError,
    StoreHealth,
)

T = TypeVar("T")

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
        clock: Clock = time.monotonic,
        on_error: Callable[[str, str], None] | None = None,
    ) -> None:
        super().__init__(key_prefix)
        self.url = url
        self.timeout = timeout
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=max(timeout, 0.001),
            socket_timeout=max(timeout * 4, 0.2),
            socket_connect_timeout=max(timeout * 4, 0.2),
            retry=Retry(NoBackoff(), 0),
            decode_responses=False,
        )
        self.client: aioredis.Redis = aioredis.Redis(connection_pool=pool)
        self._health = StoreHealth(backend="redis")
        self.guard = FailureGuard(
            self._health,
            threshold=failure_threshold,
            backoff=backoff,
            clock=clock,
            on_error=on_error,
        )
        self._scripts: dict[str, Any] = {}
        self._release = self.client.register_script(_RELEASE)
        self._incr = self.client.register_script(_INCR_TTL)

    @property
    def health(self) -> StoreHealth:
        return self._health

    async def _call(self, op: str, fn: Callable[[], Awaitable[T]]) -> T:
        self.guard.check(op)
        try:
            async with asyncio.timeout(self.timeout):
                result = await fn()
        except TimeoutError:
            raise self.guard.failure(
                op, "timeout", f"store call exceeded {self.timeout}s"
            ) from None
        except RedisTimeoutError as exc:
            raise self.guard.failure(op, "timeout", str(exc)) from None
        except (RedisConnectionError, OSError) as exc:
            raise self.guard.failure(op, "connection", str(exc) or type(exc).__name__) from None
        except ResponseError as exc:
            # A script or type error is a bug, not an outage: count it but do not back off.
            self.guard.success()
            self.guard._count(op, "response")
            raise StoreError("response", str(exc)) from None
        except RedisError as exc:
            raise self.guard.failure(op, "error", str(exc) or type(exc).__name__) from None
        self.guard.success()
        return result

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
        return int(await self._call("delete", lambda: self.client.delete(*ks)))

    async def incr(self, key: str, amount: int = 1, ttl: float | None = None) -> int:
        k = self.k(key)
        px = int(ttl * 1000) if ttl else 0
        return int(await self._call("incr", lambda: self._incr(keys=[k], args=[amount, px])))

    async def delete_if_equals(self, key: str, value: bytes) -> bool:
        k = self.k(key)
        return bool(await self._call("release", lambda: self._release(keys=[k], args=[value])))

    async def run(self, script: Script, keys: Sequence[str], args: Sequence[ScriptArg]) -> Any:
        registered = self._scripts.get(script.name)
        if registered is None:
            registered = self._scripts[script.name] = self.client.register_script(script.lua)
        ks = [self.k(k) for k in keys]
        return await self._call(script.name, lambda: registered(keys=ks, args=list(args)))

    async def start(self) -> None:
        # Not fatal: /readyz reports it and requests follow on_failure until it answers.
        with contextlib.suppress(StoreError):
            await self.ping()

    async def close(self) -> None:
        await self.client.aclose()
