"""Prometheus metrics of the gateway.

Owns: the registry, the collectors of the request path, proxy, store, process and alerts
(names follow Prometheus conventions: `edge_` prefix, `_total` for counters, `_seconds`
for durations), and exposition (with the multiprocess collector when
`PROMETHEUS_MULTIPROC_DIR` is set for `server.workers > 1`). Each policy's families are
defined in its package (gateway/policies/<name>/metrics.py) and composed here as
`metrics.<name>`.
Labels are small fixed vocabularies (route names, status codes, outcome words): never a
token, user id, path or claim value.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

from gateway.observability.collectors import LATENCY_BUCKETS, Children
from gateway.policies.auth.metrics import AuthMetrics
from gateway.policies.breaker.metrics import BreakerMetrics
from gateway.policies.cache.metrics import CacheMetrics
from gateway.policies.concurrency.metrics import ConcurrencyMetrics
from gateway.policies.heartbeat.metrics import HeartbeatMetrics
from gateway.policies.ratelimit.metrics import RateLimitMetrics
from gateway.policies.refresh.metrics import RefreshMetrics

# `_created` series double the exposition for no use on dashboards.
disable_created_metrics()


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        # Registration order is exposition order: kept as it always was.
        self._request_families(r)
        self._upstream_families(r)
        self._store_and_process_families(r)
        # Each policy's families, defined in its package (in the exposition order they
        # always had).
        self.cache = CacheMetrics(r)
        self.refresh = RefreshMetrics(r)
        self.breaker = BreakerMetrics(r)
        self.auth = AuthMetrics(r)
        self.ratelimit = RateLimitMetrics(r)
        self.concurrency = ConcurrencyMetrics(r)
        self.heartbeat = HeartbeatMetrics(r)
        self._alert_families(r)

        # Cached children of the counters the per-request paths touch.
        self.upstream_status = Children(self.upstream_requests)
        self.upstream_error = Children(self.upstream_errors)
        self._store_errors = Children(self.store_errors)

    def _request_families(self, r: CollectorRegistry) -> None:
        """Requests as the clients see them, and config reloads."""
        self.config_reloads = Counter(
            "edge_config_reloads_total",
            "Config reloads, by result (ok, error, unchanged).",
            ["result"],
            registry=r,
        )
        self.requests = Counter(
            "edge_requests_total",
            "Requests answered, by route and status.",
            ["route", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "edge_request_duration_seconds",
            "Time to answer a request, by route.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "edge_requests_in_flight",
            "Requests being handled.",
            registry=r,
            multiprocess_mode="livesum",
        )

    def _upstream_families(self, r: CollectorRegistry) -> None:
        """Requests to the upstreams (gateway/proxy), WebSockets included."""
        self.upstream_requests = Counter(
            "edge_upstream_requests_total",
            "Requests sent upstream, by upstream and status.",
            ["upstream", "status"],
            registry=r,
        )
        self.upstream_errors = Counter(
            "edge_upstream_errors_total",
            "Upstream requests that failed without a response, by kind.",
            ["upstream", "kind"],
            registry=r,
        )
        self.upstream_retries = Counter(
            "edge_upstream_retries_total",
            "Requests sent again on a new connection after a reused one failed before "
            "any answer (the upstream closed it while idle), by reason.",
            ["upstream", "reason"],
            registry=r,
        )
        self.upstream_latency = Histogram(
            "edge_upstream_duration_seconds",
            "Time to upstream response headers.",
            ["upstream"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.websockets = Gauge(
            "edge_websockets_open",
            "Proxied WebSocket connections open.",
            ["route"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.websocket_closes = Counter(
            "edge_websocket_closes_total",
            "WebSocket closes, by route and who closed.",
            ["route", "by"],
            registry=r,
        )

    def _store_and_process_families(self, r: CollectorRegistry) -> None:
        """The store's health and this process's own state."""
        self.store_errors = Counter(
            "edge_store_errors_total",
            "Store operations that failed, by operation and kind.",
            ["op", "kind"],
            registry=r,
        )
        self.store_fallbacks = Counter(
            "edge_store_fallbacks_total",
            "Requests handled by the on_failure rule because the store failed.",
            ["policy", "mode"],
            registry=r,
        )
        self.store_up = Gauge(
            "edge_store_up",
            "1 while the store answers (0 from failure_threshold consecutive failures until "
            "a call succeeds again).",
            registry=r,
            multiprocess_mode="min",
        )
        self.store_up.set(1)
        self.store_transitions = Counter(
            "edge_store_transitions_total",
            "Store availability changes, by new state (down, up).",
            ["to"],
            registry=r,
        )
        self.loop_lag = Gauge(
            "edge_event_loop_lag_seconds",
            "Worst event-loop lag over the last second (how late a due callback ran).",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.state_entries = Gauge(
            "edge_state_entries",
            "Entries held in process memory, by structure (bounded by configuration).",
            ["structure"],
            registry=r,
            multiprocess_mode="livesum",
        )

    def _alert_families(self, r: CollectorRegistry) -> None:
        """Alert delivery (gateway/observability/alerts.py)."""
        self.alerts_sent = Counter(
            "edge_alerts_sent_total",
            "Webhook deliveries, by kind (slack, discord, generic) and result (ok, retry, "
            "failed, dropped).",
            ["kind", "result"],
            registry=r,
        )
        self.alerts_firing = Gauge(
            "edge_alerts_firing",
            "1 while the alert rule is firing (fleet-wide state, as last read from the store).",
            ["rule"],
            registry=r,
            multiprocess_mode="livemax",
        )

    def on_store_error(self, op: str, kind: str) -> None:
        self._store_errors(op, kind).inc()

    def on_store_state(self, up: bool) -> None:
        self.store_up.set(1 if up else 0)
        self.store_transitions.labels("up" if up else "down").inc()

    def exposition(self) -> bytes:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            reg = CollectorRegistry()
            MultiProcessCollector(reg)
            return generate_latest(reg)
        return generate_latest(self.registry)
