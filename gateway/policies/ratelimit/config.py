"""Config of the rate-limit policy: the route's `rate_limit: [rules]` and what the rules
ask of the route."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Annotated

from pydantic import Field, field_validator

from gateway.model import ConfigIssue, FailureMode, Section
from gateway.units import Rate

if TYPE_CHECKING:
    from gateway.config import Route


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


RateLimitList = Annotated[list[RateLimitRule], Field(min_length=1)]


def route_issues(key: str, route: Route) -> Iterator[ConfigIssue]:
    """`key` is the route's own (`routes[2]`)."""
    if "{webinar_id" in route.match.path:
        return
    for j, rule in enumerate(route.rate_limit or []):
        if rule.by == "webinar":
            yield ConfigIssue(
                f"{key}.rate_limit[{j}].by",
                "by: webinar needs a {webinar_id} parameter in match.path",
            )
