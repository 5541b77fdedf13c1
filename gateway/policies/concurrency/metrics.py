"""The concurrency policy's metric families (composed by observability.metrics.Metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter


class ConcurrencyMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.rejections = Counter(
            "edge_concurrency_rejections_total",
            "Requests refused because the route's concurrency cap was full.",
            ["route"],
            registry=registry,
        )
