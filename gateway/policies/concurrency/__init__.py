"""The concurrency policy: a per-process cap on in-flight upstream requests per key.

Behaviour in policy.py."""
