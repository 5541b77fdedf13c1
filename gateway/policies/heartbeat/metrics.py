"""The heartbeat policy's metric families (composed by observability.metrics.Metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from gateway.observability.collectors import LATENCY_BUCKETS


class HeartbeatMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.outcomes = Counter(
            "edge_heartbeats_total",
            "Heartbeats by route and outcome (forwarded, absorbed, negative, unkeyed, "
            "failed_open, failed_closed, local_forwarded, local_absorbed, local_negative; "
            "flushed counts viewer entries written by a flush).",
            ["route", "outcome"],
            registry=registry,
        )
        self.flushes = Counter(
            "edge_heartbeat_flush_total",
            "Batch flush requests (one per webinar per flush), by result (ok, failed, "
            "store_error).",
            ["result"],
            registry=registry,
        )
        self.flush_batch = Histogram(
            "edge_heartbeat_flush_batch_size",
            "Viewer entries sent in one flush request.",
            buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000),
            registry=registry,
        )
        self.flush_latency = Histogram(
            "edge_heartbeat_flush_duration_seconds",
            "Time of one flush request to flush_upstream.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
