"""The cache policy's metric families (composed by observability.metrics.Metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from gateway.observability.collectors import LATENCY_BUCKETS


class CacheMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.results = Counter(
            "edge_cache_results_total",
            "Requests on cached routes, by result (hit, miss, stale, bypass, denied, error).",
            ["route", "result"],
            registry=registry,
        )
        self.fill_latency = Histogram(
            "edge_cache_refresh_duration_seconds",
            "Time of the upstream call that fills or refreshes a cache entry.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
