"""Store factory: picks the backend from `store.url` (memory://, or RedisStore for
redis://, rediss://, unix://, redis+cluster:// and redis+sentinel://)."""

from __future__ import annotations

import time
from collections.abc import Callable

from gateway.config import StoreConfig
from gateway.store.base import Script, Store, StoreError, StoreHealth
from gateway.store.memory import MemoryStore

__all__ = ["Script", "Store", "StoreError", "StoreHealth", "create_store"]


def create_store(
    cfg: StoreConfig,
    *,
    clock: Callable[[], float] = time.time,
    on_error: Callable[[str, str], None] | None = None,
    on_state: Callable[[bool], None] | None = None,
    lag: Callable[[], float] = lambda: 0.0,
) -> Store:
    if cfg.is_memory:
        return MemoryStore(cfg.key_prefix, max_keys=cfg.memory_max_keys, clock=clock)
    from gateway.store.redis import RedisStore

    return RedisStore(
        cfg.url,
        cfg.key_prefix,
        timeout=cfg.timeout,
        max_connections=cfg.max_connections,
        failure_threshold=cfg.failure_threshold,
        backoff=cfg.backoff,
        probe_interval=cfg.probe_interval,
        on_error=on_error,
        on_state=on_state,
        lag=lag,
    )
