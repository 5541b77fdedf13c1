"""The cache policy: a shared response cache in the store with single flight, stale
serving and per-caller authorization of cached answers.

config.py: `CacheConfig` (a route's `cache:`)
policy.py: `CachePolicy` and the scripts' Python twins; vary.py: the answer's Vary
lua/cache_{mget,lock,fill}.lua
metrics.py: `edge_cache_*`
"""

from __future__ import annotations

from gateway.policies.cache import config
from gateway.policies.spec import PolicyFactory, PolicySpec


def _load() -> PolicyFactory:
    from gateway.policies.cache.policy import CachePolicy

    return CachePolicy


SPEC = PolicySpec(
    key="cache",
    enabled=lambda route: route.cache is not None,
    load=_load,
    route_issues=config.route_issues,
)
