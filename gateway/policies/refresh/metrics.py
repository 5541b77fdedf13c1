"""The refresh policy's metric families (composed by observability.metrics.Metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from gateway.observability.collectors import LATENCY_BUCKETS


class RefreshMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.outcomes = Counter(
            "edge_refresh_total",
            "Token refreshes answered, by outcome (leader, follower, replay, passthrough,"
            " upstream_error, invalid_request, wait_timeout, store_closed).",
            ["outcome"],
            registry=registry,
        )
        self.upstream_latency = Histogram(
            "edge_refresh_upstream_duration_seconds",
            "Time of the one upstream refresh call a coalesced group made.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.waiting = Gauge(
            "edge_refresh_waiting",
            "Refreshes waiting for a leader on another replica.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.takeovers = Counter(
            "edge_refresh_takeovers_total",
            "Refreshes that took over a token's lock after its leader stopped renewing it.",
            registry=registry,
        )
