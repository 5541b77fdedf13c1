"""The refresh policy: one upstream call per Supabase refresh token across replicas, its
answer replayed (sealed) to the callers that share the token.

config.py: `RefreshConfig` (a route's `refresh:`)
policy.py: `RefreshPolicy` and the scripts' Python twins
lua/refresh_{begin,poll,commit,renew}.lua
metrics.py: `edge_refresh_*`
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.policies.refresh import config
from gateway.policies.spec import PolicySpec

if TYPE_CHECKING:
    from gateway.config import Route
    from gateway.http import Handler
    from gateway.runtime import Runtime


def _build(next_handler: Handler, route: Route, rt: Runtime) -> Handler:
    from gateway.policies.refresh.policy import RefreshPolicy

    return RefreshPolicy(next_handler, route, rt)


SPEC = PolicySpec(
    key="refresh",
    enabled=lambda route: route.refresh is not None,
    build=_build,
    route_issues=config.route_issues,
)
