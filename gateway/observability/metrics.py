"""Prometheus metrics of the gateway.

Owns: every collector (names follow Prometheus conventions: `edge_` prefix, `_total` for
counters, `_seconds` for durations), the registry they live on, and exposition (with the
multiprocess collector when `PROMETHEUS_MULTIPROC_DIR` is set for `server.workers > 1`).
Labels are small fixed vocabularies (route names, status codes, outcome words): never a
token, user id, path or claim value.
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

# `_created` series double the exposition for no use on dashboards.
disable_created_metrics()

LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


class Children:
    """A metric's children by label values, each made once: prometheus_client's
    `labels()` validates, builds a tuple and takes a lock on every call (1-2 µs on the
    hot path). Label values are the small fixed vocabularies this module allows, so the
    cache stays small."""

    __slots__ = ("cache", "metric")

    def __init__(self, metric: Any) -> None:
        self.metric = metric
        self.cache: dict[tuple[str, ...], Any] = {}

    def __call__(self, *labels: str) -> Any:
        child = self.cache.get(labels)
        if child is None:
            child = self.cache[labels] = self.metric.labels(*labels)
        return child


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
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
        # cache policy (gateway/policies/cache.py)
        self.cache_results = Counter(
            "edge_cache_results_total",
            "Requests on cached routes, by result (hit, miss, stale, bypass, denied, error).",
            ["route", "result"],
            registry=r,
        )
        self.cache_refresh = Histogram(
            "edge_cache_refresh_duration_seconds",
            "Time of the upstream call that fills or refreshes a cache entry.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        # refresh (gateway/policies/refresh.py)
        self.refresh = Counter(
            "edge_refresh_total",
            "Token refreshes answered, by outcome (leader, follower, replay, passthrough,"
            " upstream_error, invalid_request, wait_timeout, store_closed).",
            ["outcome"],
            registry=r,
        )
        self.refresh_upstream_latency = Histogram(
            "edge_refresh_upstream_duration_seconds",
            "Time of the one upstream refresh call a coalesced group made.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.refresh_waiting = Gauge(
            "edge_refresh_waiting",
            "Refreshes waiting for a leader on another replica.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.refresh_takeovers = Counter(
            "edge_refresh_takeovers_total",
            "Refreshes that took over a token's lock after its leader stopped renewing it.",
            registry=r,
        )
        # breaker (gateway/policies/breaker.py)
        self.breaker_state = Gauge(
            "edge_breaker_state",
            "Circuit breaker state per group: 0 closed, 1 half-open, 2 open.",
            ["group"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.breaker_transitions = Counter(
            "edge_breaker_transitions_total",
            "Circuit breaker state changes, by group and new state.",
            ["group", "to"],
            registry=r,
        )
        self.breaker_shed = Counter(
            "edge_breaker_shed_total",
            "Requests answered 503 at the edge because the group's breaker was open.",
            ["group"],
            registry=r,
        )
        self.negative_cache_hits = Counter(
            "edge_negative_cache_hits_total",
            "Repeated 4xx answered from the per-caller negative cache, by route.",
            ["route"],
            registry=r,
        )
        # auth (gateway/policies/auth.py)
        self.auth_verifications = Counter(
            "edge_auth_verifications_total",
            "Access-token verifications, by result (ok, expired, bad_signature, ...).",
            ["result"],
            registry=r,
        )
        self.auth_token_cache = Counter(
            "edge_auth_token_cache_total",
            "Verified-token cache lookups, by outcome (hit, miss).",
            ["outcome"],
            registry=r,
        )
        self.jwks_fetches = Counter(
            "edge_jwks_fetches_total",
            "JWKS fetches, by outcome (ok, error, timeout, invalid).",
            ["outcome"],
            registry=r,
        )
        self.auth_revalidations = Counter(
            "edge_auth_revalidations_total",
            "GoTrue /user revalidations, by outcome (ok, revoked, error).",
            ["outcome"],
            registry=r,
        )
        # rate limiting and concurrency (gateway/policies/ratelimit.py)
        self.ratelimit_decisions = Counter(
            "edge_ratelimit_decisions_total",
            "Rate-limit decisions, by route and result (allowed, limited, limited_cached, "
            "local_allowed, local_limited, store_open, store_closed).",
            ["route", "result"],
            registry=r,
        )
        self.concurrency_rejections = Counter(
            "edge_concurrency_rejections_total",
            "Requests refused because the route's concurrency cap was full.",
            ["route"],
            registry=r,
        )
        # heartbeat shedding and presence (gateway/policies/heartbeat.py)
        self.heartbeats = Counter(
            "edge_heartbeats_total",
            "Heartbeats by route and outcome (forwarded, absorbed, negative, unkeyed, "
            "failed_open, failed_closed, local_forwarded, local_absorbed, local_negative; "
            "flushed counts viewer entries written by a flush).",
            ["route", "outcome"],
            registry=r,
        )
        self.heartbeat_flushes = Counter(
            "edge_heartbeat_flush_total",
            "Batch flush requests (one per webinar per flush), by result (ok, failed, "
            "store_error).",
            ["result"],
            registry=r,
        )
        self.heartbeat_flush_batch = Histogram(
            "edge_heartbeat_flush_batch_size",
            "Viewer entries sent in one flush request.",
            buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000),
            registry=r,
        )
        self.heartbeat_flush_latency = Histogram(
            "edge_heartbeat_flush_duration_seconds",
            "Time of one flush request to flush_upstream.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        # alerting (gateway/observability/alerts.py)
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

        # Cached children of the counters the per-request paths touch.
        self.auth_result = Children(self.auth_verifications)
        self.auth_cache = Children(self.auth_token_cache)
        self.upstream_status = Children(self.upstream_requests)
        self.upstream_error = Children(self.upstream_errors)
        self._store_errors = Children(self.store_errors)

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
