"""Metric families of the rate-limit policy. Names, labels and help text are what dashboards
and alerts read: change none. `Metrics` (gateway/observability/metrics.py) builds one per
registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter


class RateLimitMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.decisions = Counter(
            "edge_ratelimit_decisions_total",
            "Rate-limit decisions, by route and result (allowed, limited, limited_cached, "
            "local_allowed, local_limited, store_open, store_closed).",
            ["route", "result"],
            registry=registry,
        )
