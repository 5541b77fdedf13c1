"""The concurrency policy: a per-process cap on in-flight upstream requests per key.

config.py: `ConcurrencyConfig` (a route's `concurrency:`)
policy.py: `ConcurrencyPolicy`
metrics.py: `edge_concurrency_rejections_total`
"""

from __future__ import annotations

from gateway.policies.concurrency import config
from gateway.policies.spec import PolicyFactory, PolicySpec


def _load() -> PolicyFactory:
    from gateway.policies.concurrency.policy import ConcurrencyPolicy

    return ConcurrencyPolicy


SPEC = PolicySpec(
    key="concurrency",
    enabled=lambda route: route.concurrency is not None,
    load=_load,
    route_issues=config.route_issues,
)
