"""Config of the auth policy: the route's `auth:` (mode, revalidate) and the top-level
`auth:` settings (issuer, keys, GoTrue), with the checks that need both."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator

from gateway.model import ConfigIssue, Section
from gateway.units import Duration

if TYPE_CHECKING:
    from gateway.config import Route


class RouteAuth(Section):
    """`auth: required` or `auth: {mode: required, revalidate: 60s}`."""

    mode: Literal["required", "optional", "off"] = "optional"
    # Ask GoTrue /auth/v1/user at most once per token per interval, so a logged-out
    # session stops working within it (0 = never).
    revalidate: Duration = 0.0


class AuthSettings(Section):
    issuer: str | None = None
    audience: str | list[str] = "authenticated"
    hs256_secret: str = ""
    jwks_url: str | None = None
    jwks_min_refetch: Duration = 30.0
    jwks_max_age: Duration = 600.0
    jwks_timeout: Duration = 3.0
    leeway: Duration = 30.0
    cookie_name: str | None = None  # default: any sb-<ref>-auth-token
    token_cache_size: int = Field(100_000, ge=0)
    identity_hmac_secret: str = ""
    user_url: str | None = None  # GoTrue /auth/v1/user, for `revalidate`
    apikey: str = ""

    @field_validator("jwks_url", "user_url")
    @classmethod
    def _http(cls, v: str | None) -> str | None:
        if v and urlsplit(v).scheme not in {"http", "https"}:
            raise ValueError(f"expected an http(s) URL, got {v!r}")
        return v or None


def settings_issues(auth: AuthSettings, routes: Sequence[Route]) -> Iterator[ConfigIssue]:
    """What the routes' `auth:` asks of the top-level `auth:` settings."""
    if any(r.auth.mode != "off" for r in routes) and not (auth.hs256_secret or auth.jwks_url):
        yield ConfigIssue(
            "auth",
            "routes verify tokens but neither auth.hs256_secret nor auth.jwks_url is set",
        )
    if any(r.auth.revalidate for r in routes) and not auth.user_url:
        yield ConfigIssue("auth.user_url", "auth.revalidate on a route needs auth.user_url")
