"""Config of the cache policy: the route's `cache:` section and what it asks of the route."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from pydantic import Field, field_validator

from gateway.model import ConfigIssue, FailureMode, Section
from gateway.units import Duration

if TYPE_CHECKING:
    from gateway.config import Route


class CacheAuthorize(Section):
    claim: str
    in_: list[str] = Field(alias="in")


class CacheConfig(Section):
    ttl: Duration
    stale_while_revalidate: Duration = 0.0
    stale_if_error: Duration = 0.0
    vary_query: list[str] = Field(default_factory=list)
    vary_claims: list[str] = Field(default_factory=list)
    # Request headers named in an answer's `Vary` that must not split the key (the
    # answer is the same whatever they say). Personal ones (Authorization, Cookie) and
    # `*` still make the answer unstorable.
    ignore_vary: list[str] = Field(default_factory=list)
    authz_ttl: Duration = 300.0
    deny_ttl: Duration = 30.0
    authorize: CacheAuthorize | None = None
    # Shared cache for anonymous callers too (public data only); off by default.
    public: bool = False
    lock_timeout: Duration = 5.0
    max_body_bytes: int = Field(1_048_576, gt=0)
    on_failure: FailureMode | None = None

    @field_validator("ttl")
    @classmethod
    def _positive(cls, v: float) -> float:
        if v <= 0:
            raise ValueError("ttl must be greater than 0")
        return v


def route_issues(key: str, route: Route) -> Iterator[ConfigIssue]:
    """`key` is the route's own (`routes[2]`)."""
    if route.cache and route.match.methods and not set(route.match.methods) <= {"GET", "HEAD"}:
        yield ConfigIssue(f"{key}.cache", "only GET/HEAD routes can be cached")
