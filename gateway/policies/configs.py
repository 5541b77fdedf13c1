"""Config sections of the route policies, kept apart from their behaviour so that config.py
(and `gateway check`) can validate a file without importing the request path."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from gateway.model import Section
from gateway.units import Duration, Rate

# local: decide with this process's own bounded state (the default; docs/redis.md),
# open: act as if there were no edge, closed: answer 503.
FailureMode = Literal["local", "open", "closed"]


class RouteAuth(Section):
    """`auth: required` or `auth: {mode: required, revalidate: 60s}`."""

    mode: Literal["required", "optional", "off"] = "optional"
    # Ask GoTrue /auth/v1/user at most once per token per interval, so a logged-out
    # session stops working within it (0 = never).
    revalidate: Duration = 0.0


class LocalResponse(Section):
    status: int = Field(200, ge=100, le=599)
    body: Any = Field(default_factory=lambda: {"success": True})
    content_type: str = "application/json"


class RefusedResponse(LocalResponse):
    # Status of the edge's answer to a viewer the flush target refused (400-599).
    status: int = Field(403, ge=100, le=599)
    # Body (non-strings are JSON-encoded).
    body: Any = Field(
        default_factory=lambda: {"error": "forbidden", "message": "not allowed to join"}
    )
    # Content-Type of the edge's answer.
    content_type: str = "application/json"


_KEY_SOURCE = re.compile(r"^(user|ip|cookie:[!#$%&'*+.^_`|~0-9A-Za-z-]+|header:[A-Za-z0-9-]+)$")


class HeartbeatConfig(Section):
    mode: Literal["sample", "batch"] = "sample"
    forward_interval: Duration = 300.0
    local_response: LocalResponse = Field(default_factory=LocalResponse)
    key: list[str] = Field(default_factory=lambda: ["user", "ip"])
    negative_ttl: Duration = 60.0
    negative_statuses: list[int] = Field(default_factory=lambda: [401, 403, 404])
    presence_window: Duration | None = None
    flush_interval: Duration = 10.0
    flush_url: str | None = None
    flush_upstream: str | None = None
    flush_headers: dict[str, str] = Field(default_factory=dict)
    # Batch mode: who registers a viewer. forward: its first heartbeat reaches the app;
    # batch: it is answered at the edge and flushed with the rest, marked as a join, and
    # flush_url registers the viewer (or refuses it) in the same statement.
    join: Literal["forward", "batch"] = "forward"
    # join: batch: the answer to a viewer the flush refused, for negative_ttl.
    refused_response: RefusedResponse = Field(default_factory=RefusedResponse)
    on_failure: FailureMode | None = None

    @field_validator("key")
    @classmethod
    def _key_sources(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("at least one key source is needed")
        for src in v:
            if not _KEY_SOURCE.match(src):
                raise ValueError(
                    f"unknown key source {src!r}; use user, ip, cookie:NAME or header:NAME"
                )
        return v

    @field_validator("flush_interval")
    @classmethod
    def _flush_positive(cls, v: float) -> float:
        if v <= 0:
            raise ValueError("flush_interval must be greater than 0")
        return v

    @field_validator("negative_statuses")
    @classmethod
    def _negative_4xx_5xx(cls, v: list[int]) -> list[int]:
        for status in v:
            if not 400 <= status <= 599:
                raise ValueError(f"{status} is not an error status (400-599)")
        return v

    @model_validator(mode="after")
    def _batch_needs_target(self) -> HeartbeatConfig:
        if self.mode == "batch" and not (self.flush_url and self.flush_upstream):
            raise ValueError("mode: batch needs flush_upstream and flush_url")
        if self.join == "batch" and self.mode != "batch":
            raise ValueError("join: batch needs mode: batch (joins are flushed)")
        if not 400 <= self.refused_response.status <= 599:
            raise ValueError("refused_response.status must be an error status (400-599)")
        return self


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


class RefreshConfig(Section):
    # How long a successful answer is replayed to the same parent token (capped by the
    # new access token's expires_at). 0 = coalesce concurrent calls only. The default is
    # hosted GoTrue's own refresh-token reuse interval (10 s).
    grace: Duration = 10.0
    # Cross-replica lock per token; a live leader renews it, a dead one lets it expire.
    lock_ttl: Duration = 10.0
    # How long a follower waits for another replica's leader (default: the upstream's
    # connect + read timeout).
    wait_timeout: Duration | None = None
    poll_interval: Duration = 0.025
    on_failure: FailureMode | None = None

    @field_validator("lock_ttl", "poll_interval")
    @classmethod
    def _refresh_positive(cls, v: float) -> float:
        if v <= 0:
            raise ValueError("must be greater than 0")
        return v


class BreakerConfig(Section):
    group: str
    failure_threshold: int = Field(5, ge=1)
    failure_ratio: float = Field(0.5, gt=0, le=1)
    window: Duration = 10.0
    min_requests: int = Field(20, ge=1)
    cooldown: Duration = 30.0
    max_cooldown: Duration = 300.0
    half_open_probes: int = Field(1, ge=1)
    jitter: float = Field(0.2, ge=0, lt=1)
    negative_ttl: Duration = 0.0
    negative_statuses: list[int] = Field(default_factory=lambda: [400, 404])
    # An upstream 429 counts as a failure and its Retry-After opens the whole group (the
    # app is shedding load). Set false when the app rate-limits *per user*: one client's
    # 429 must then not open the group for everyone.
    count_429: bool = True


_BY = re.compile(r"^(user|ip|webinar|route|header:[A-Za-z0-9-]+)$")


class RateLimitRule(Section):
    by: str
    rate: Rate
    burst: int = Field(1, ge=1)
    on_failure: FailureMode | None = None

    @field_validator("by")
    @classmethod
    def _by(cls, v: str) -> str:
        if not _BY.match(v):
            raise ValueError(f"unknown key {v!r}; use user, ip, webinar, route or header:NAME")
        return v


class ConcurrencyConfig(Section):
    by: Literal["webinar", "route", "user", "ip"] = "webinar"
    max: int = Field(ge=1)
    retry_after: Duration = 1.0


RateLimitList = Annotated[list[RateLimitRule], Field(min_length=1)]
