"""The breaker policy: a circuit breaker per group of routes, and a per-caller negative
cache of repeated 4xx.

config.py: `BreakerConfig` (a route's `breaker:`)
policy.py: `BreakerPolicy`, `Breaker`, `BreakerRegistry`
metrics.py: `edge_breaker_*`, `edge_negative_cache_hits_total`
"""

from __future__ import annotations

from gateway.policies.spec import PolicyFactory, PolicySpec


def _load() -> PolicyFactory:
    from gateway.policies.breaker.policy import BreakerPolicy

    return BreakerPolicy


SPEC = PolicySpec(
    key="breaker",
    enabled=lambda route: route.breaker is not None,
    load=_load,
)
