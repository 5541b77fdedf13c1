"""The ratelimit policy's metric families (composed by observability.metrics.Metrics)."""

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
