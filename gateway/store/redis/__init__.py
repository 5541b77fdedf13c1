"""Redis stores: one server (`redis://`, `rediss://`, `unix://`), Redis Cluster
(`redis+cluster://host:port[,host:port...]`) and Sentinel
(`redis+sentinel://host:port[,host:port...]/service_name[/db]`).

Owns: which RedisStore subclass serves a URL's scheme (`store_class`). The shared calls,
scripts, batches and failure mapping are in base.py; each deployment's client and what
differs about it in standalone.py, cluster.py and sentinel.py; URL parsing in url.py.
See docs/redis.md for URL forms, hash-tag rules and failover behaviour.
"""

from __future__ import annotations

from gateway.store.redis.base import RedisStore
from gateway.store.redis.cluster import RedisClusterStore
from gateway.store.redis.sentinel import SentinelRedisStore
from gateway.store.redis.standalone import StandaloneRedisStore
from gateway.store.redis.url import (
    CLUSTER_SCHEME,
    SENTINEL_SCHEME,
    StoreURL,
    check_store_url,
    parse_store_url,
    scheme_of,
)

__all__ = [
    "RedisClusterStore",
    "RedisStore",
    "SentinelRedisStore",
    "StandaloneRedisStore",
    "StoreURL",
    "check_store_url",
    "parse_store_url",
    "store_class",
]

_BY_SCHEME: dict[str, type[RedisStore]] = {
    CLUSTER_SCHEME: RedisClusterStore,
    SENTINEL_SCHEME: SentinelRedisStore,
}


def store_class(url: str) -> type[RedisStore]:
    """The RedisStore subclass for `url`'s scheme (one server for any other scheme;
    redis-py rejects a scheme it does not know)."""
    return _BY_SCHEME.get(scheme_of(url), StandaloneRedisStore)
