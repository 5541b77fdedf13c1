"""The auth policy's metric families (composed by observability.metrics.Metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

from gateway.observability.collectors import Children


class AuthMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.verifications = Counter(
            "edge_auth_verifications_total",
            "Access-token verifications, by result (ok, expired, bad_signature, ...).",
            ["result"],
            registry=registry,
        )
        self.token_cache = Counter(
            "edge_auth_token_cache_total",
            "Verified-token cache lookups, by outcome (hit, miss).",
            ["outcome"],
            registry=registry,
        )
        self.jwks_fetches = Counter(
            "edge_jwks_fetches_total",
            "JWKS fetches, by outcome (ok, error, timeout, invalid).",
            ["outcome"],
            registry=registry,
        )
        self.revalidations = Counter(
            "edge_auth_revalidations_total",
            "GoTrue /user revalidations, by outcome (ok, revoked, error).",
            ["outcome"],
            registry=registry,
        )
        # Cached children: every request on an auth route counts one verification and
        # one token-cache lookup.
        self.result = Children(self.verifications)
        self.cache = Children(self.token_cache)
