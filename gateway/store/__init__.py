"""Store factory: picks the backend class from the scheme of `store.url` (memory://, or
the RedisStore subclass for redis://, rediss://, unix://, redis+cluster:// and
redis+sentinel://; see gateway/store/redis/)."""

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
    monotonic: Callable[[], float] = time.monotonic,
    on_error: Callable[[str, str], None] | None = None,
    on_state: Callable[[bool], None] | None = None,
    lag: Callable[[], float] = lambda: 0.0,
) -> Store:
    """`clock` (wall time) times memory:// expiry; `monotonic` times a networked store's
    back-off, probes and rediscovery."""
    if cfg.is_memory:
        return MemoryStore(cfg.key_prefix, max_keys=cfg.memory_max_keys, clock=clock)
    # Imported here: a memory:// gateway never loads redis-py.
    from gateway.store.redis import store_class

    return store_class(cfg.url)(
        cfg.url,
        cfg.key_prefix,
        timeout=cfg.timeout,
        max_connections=cfg.max_connections,
        failure_threshold=cfg.failure_threshold,
        backoff=cfg.backoff,
        probe_interval=cfg.probe_interval,
        clock=monotonic,
        on_error=on_error,
        on_state=on_state,
        lag=lag,
    )
