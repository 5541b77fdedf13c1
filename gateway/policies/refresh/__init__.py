"""The refresh policy: one upstream call per Supabase refresh token across replicas, its
answer replayed (sealed) to the callers that share the token.

config.py: `RefreshConfig` (a route's `refresh:`)
policy.py: `RefreshPolicy` and the scripts' Python twins
lua/refresh_{begin,poll,commit,renew}.lua
metrics.py: `edge_refresh_*`
"""

from __future__ import annotations

from gateway.policies.refresh import config
from gateway.policies.spec import PolicyFactory, PolicySpec


def _load() -> PolicyFactory:
    from gateway.policies.refresh.policy import RefreshPolicy

    return RefreshPolicy


SPEC = PolicySpec(
    key="refresh",
    enabled=lambda route: route.refresh is not None,
    load=_load,
    route_issues=config.route_issues,
)
