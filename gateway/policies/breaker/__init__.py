"""The breaker policy: a per-route circuit breaker and negative cache.

Behaviour in policy.py."""
