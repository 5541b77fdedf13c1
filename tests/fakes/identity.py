"""Identity for the tests, injected one way: real HS256 access tokens minted for a user
id and role, which the gateway's auth policy verifies as it does in production. A test
sets its route's `auth` to optional or required and the top-level `auth:` section to
`AUTH`; nothing stands in for the auth policy or replaces a route handler."""

from __future__ import annotations

from typing import Any

from joserfc import jwt
from joserfc.jwk import OctKey

SECRET = "edge-test-identity-secret-0123456789abcdef"
AUDIENCE = "authenticated"
# The top-level `auth:` section the minted tokens verify against.
AUTH: dict[str, Any] = {"hs256_secret": SECRET, "audience": AUDIENCE}
# Far past any clock the tests use (real or fake), so a token never expires mid-test.
NEVER = 4_000_000_000


def mint(sub: str, role: str = "", **claims: Any) -> str:
    """An access token for `sub`. `role` is its `role` claim (the gateway forwards it as
    X-Edge-User-Role) and `app_metadata.role` (what vary_claims/authorize read); an empty
    role leaves the `role` claim out."""
    body: dict[str, Any] = {
        "sub": sub,
        "aud": AUDIENCE,
        "exp": NEVER,
        "app_metadata": {"role": role},
        **({"role": role} if role else {}),
        **claims,
    }
    return jwt.encode({"alg": "HS256", "typ": "JWT"}, body, OctKey.import_key(SECRET))


def bearer(sub: str, role: str = "") -> dict[str, str]:
    """The request headers of a caller signed in as `sub` with `role`."""
    return {"Authorization": "Bearer " + mint(sub, role)}
