"""The auth policy: Supabase access tokens (HS256 secret or JWKS), from a Bearer header
or the session cookie; verified identities go upstream as X-Edge-* headers.

config.py: `RouteAuth` (a route's `auth:`), `AuthSettings` (the top-level `auth:`)
policy.py: `AuthPolicy`, `Verifier` (token cache, GoTrue revalidation), `JwksCache`
metrics.py: `edge_auth_*`, `edge_jwks_fetches_total`
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.policies.spec import PolicySpec

if TYPE_CHECKING:
    from gateway.config import Route
    from gateway.http import Handler
    from gateway.runtime import Runtime


def _build(next_handler: Handler, route: Route, rt: Runtime) -> Handler:
    from gateway.policies.auth.policy import AuthPolicy

    return AuthPolicy(next_handler, route, rt)


SPEC = PolicySpec(
    key="auth",
    enabled=lambda route: route.auth.mode != "off",
    build=_build,
    websocket=True,
)
