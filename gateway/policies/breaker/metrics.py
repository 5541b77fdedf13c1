"""The breaker policy's metric families (composed by observability.metrics.Metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class BreakerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.state = Gauge(
            "edge_breaker_state",
            "Circuit breaker state per group: 0 closed, 1 half-open, 2 open.",
            ["group"],
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.transitions = Counter(
            "edge_breaker_transitions_total",
            "Circuit breaker state changes, by group and new state.",
            ["group", "to"],
            registry=registry,
        )
        self.shed = Counter(
            "edge_breaker_shed_total",
            "Requests answered 503 at the edge because the group's breaker was open.",
            ["group"],
            registry=registry,
        )
        self.negative_hits = Counter(
            "edge_negative_cache_hits_total",
            "Repeated 4xx answered from the per-caller negative cache, by route.",
            ["route"],
            registry=registry,
        )
