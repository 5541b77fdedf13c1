"""The cache policy: a shared response cache in the store with single flight, stale
serving and per-caller authorization of cached answers.

config.py: `CacheConfig` (a route's `cache:`)
policy.py: `CachePolicy` and the scripts' Python twins; vary.py: the answer's Vary
lua/cache_{mget,lock,fill}.lua
metrics.py: `edge_cache_*`
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.policies.cache import config
from gateway.policies.spec import PolicySpec

if TYPE_CHECKING:
    from gateway.config import Route
    from gateway.http import Handler
    from gateway.runtime import Runtime


def _build(next_handler: Handler, route: Route, rt: Runtime) -> Handler:
    from gateway.policies.cache.policy import CachePolicy

    return CachePolicy(next_handler, route, rt)


SPEC = PolicySpec(
    key="cache",
    enabled=lambda route: route.cache is not None,
    build=_build,
    route_issues=config.route_issues,
)
