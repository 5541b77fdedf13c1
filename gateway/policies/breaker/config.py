"""Config of the breaker policy: the route's `breaker:` section."""

from __future__ import annotations

from pydantic import Field

from gateway.model import Section
from gateway.units import Duration


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
