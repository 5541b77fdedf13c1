"""Config of the refresh policy: the route's `refresh:` section and what it asks of the
route."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from pydantic import field_validator

from gateway.model import ConfigIssue, FailureMode, Section
from gateway.units import Duration

if TYPE_CHECKING:
    from gateway.config import Route


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


def route_issues(key: str, route: Route) -> Iterator[ConfigIssue]:
    """`key` is the route's own (`routes[2]`)."""
    if route.refresh and route.cache:
        # Both answer from their own store entries; one request cannot be both.
        yield ConfigIssue(f"{key}.refresh", "refresh and cache cannot share a route")
