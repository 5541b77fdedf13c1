"""The auth policy: Supabase access tokens (HS256 secret or JWKS), from a Bearer header
or the session cookie; verified identities go upstream as X-Edge-* headers.

config.py: `RouteAuth` (a route's `auth:`), `AuthSettings` (the top-level `auth:`)
policy.py: `AuthPolicy`, `Verifier` (token cache, GoTrue revalidation), `JwksCache`
metrics.py: `edge_auth_*`, `edge_jwks_fetches_total`
"""

from __future__ import annotations

from gateway.policies.spec import PolicyFactory, PolicySpec


def _load() -> PolicyFactory:
    from gateway.policies.auth.policy import AuthPolicy

    return AuthPolicy


SPEC = PolicySpec(
    key="auth",
    enabled=lambda route: route.auth.mode != "off",
    load=_load,
    websocket=True,
)
