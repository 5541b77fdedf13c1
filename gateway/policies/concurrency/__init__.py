"""The concurrency policy: a per-process cap on in-flight upstream requests per key.

config.py: `ConcurrencyConfig` (a route's `concurrency:`)
policy.py: `ConcurrencyPolicy`
metrics.py: `edge_concurrency_rejections_total`
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.policies.concurrency import config
from gateway.policies.spec import PolicySpec

if TYPE_CHECKING:
    from gateway.config import Route
    from gateway.http import Handler
    from gateway.runtime import Runtime


def _build(next_handler: Handler, route: Route, rt: Runtime) -> Handler:
    from gateway.policies.concurrency.policy import ConcurrencyPolicy

    return ConcurrencyPolicy(next_handler, route, rt)


SPEC = PolicySpec(
    key="concurrency",
    enabled=lambda route: route.concurrency is not None,
    build=_build,
    route_issues=config.route_issues,
)
