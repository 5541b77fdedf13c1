"""Config of the heartbeat policy: the route's `heartbeat:` section (its own cross-field
checks in the model) and the upstreams it names, checked against `upstreams:`."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from gateway.model import FailureMode, Section
from gateway.units import Duration

# Keys of the section that name an upstream (checked by config.py with the route's own).
UPSTREAM_REFS = ("flush_upstream",)


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
