"""The rate-limit policy: GCRA rules checked and updated in one store round trip.

config.py: `RateLimitRule` (a route's `rate_limit: [rules]`)
policy.py: `RateLimitPolicy`, `GcraBatcher`, the `gcra` script's Python twin
lua/gcra.lua
metrics.py: `edge_ratelimit_decisions_total`
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.policies.ratelimit import config
from gateway.policies.spec import PolicySpec

if TYPE_CHECKING:
    from gateway.config import Route
    from gateway.http import Handler
    from gateway.runtime import Runtime


def _build(next_handler: Handler, route: Route, rt: Runtime) -> Handler:
    from gateway.policies.ratelimit.policy import RateLimitPolicy

    return RateLimitPolicy(next_handler, route, rt)


SPEC = PolicySpec(
    key="rate_limit",
    enabled=lambda route: bool(route.rate_limit),
    build=_build,
    route_issues=config.route_issues,
)
