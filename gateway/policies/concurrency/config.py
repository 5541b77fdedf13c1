"""Config of the concurrency policy: the route's `concurrency:` section and what it asks of
the route."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from gateway.model import ConfigIssue, Section
from gateway.units import Duration

if TYPE_CHECKING:
    from gateway.config import Route


class ConcurrencyConfig(Section):
    by: Literal["webinar", "route", "user", "ip"] = "webinar"
    max: int = Field(ge=1)
    retry_after: Duration = 1.0


def route_issues(key: str, route: Route) -> Iterator[ConfigIssue]:
    """`key` is the route's own (`routes[2]`)."""
    cfg = route.concurrency
    if cfg and cfg.by == "webinar" and "{webinar_id" not in route.match.path:
        yield ConfigIssue(
            f"{key}.concurrency.by", "by: webinar needs a {webinar_id} parameter in match.path"
        )
