"""The rate-limit policy: GCRA rules checked and updated in one store round trip.

config.py: `RateLimitRule` (a route's `rate_limit: [rules]`)
policy.py: `RateLimitPolicy`, `GcraBatcher`, the `gcra` script's Python twin
lua/gcra.lua
metrics.py: `edge_ratelimit_decisions_total`
"""

from __future__ import annotations

from gateway.policies.ratelimit import config
from gateway.policies.spec import PolicyFactory, PolicySpec


def _load() -> PolicyFactory:
    from gateway.policies.ratelimit.policy import RateLimitPolicy

    return RateLimitPolicy


SPEC = PolicySpec(
    key="rate_limit",
    enabled=lambda route: bool(route.rate_limit),
    load=_load,
    route_issues=config.route_issues,
)
