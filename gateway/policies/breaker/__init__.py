"""The breaker policy: a circuit breaker per group of routes, and a per-caller negative
cache of repeated 4xx.

config.py: `BreakerConfig` (a route's `breaker:`)
policy.py: `BreakerPolicy`, `Breaker`, `BreakerRegistry`
metrics.py: `edge_breaker_*`, `edge_negative_cache_hits_total`
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.policies.spec import PolicySpec

if TYPE_CHECKING:
    from gateway.config import Route
    from gateway.http import Handler
    from gateway.runtime import Runtime


def _build(next_handler: Handler, route: Route, rt: Runtime) -> Handler:
    from gateway.policies.breaker.policy import BreakerPolicy

    return BreakerPolicy(next_handler, route, rt)


SPEC = PolicySpec(
    key="breaker",
    enabled=lambda route: route.breaker is not None,
    build=_build,
)
