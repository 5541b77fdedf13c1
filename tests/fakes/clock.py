"""The one fake clock of the tests: injected wherever the gateway takes a clock (the
runtime's wall clock and monotonic clock, a store, a breaker, an error ratio), so tests
move time instead of sleeping."""

from __future__ import annotations

import time

# A fixed wall time (2027-01-15 08:00 UTC) for tests that must not depend on today.
FIXED_NOW = 1_800_000_000.0


class FakeClock:
    """`clock()` returns `clock.now`, which only moves when the test says so. Without a
    start it begins at the current wall time (whole seconds), so tokens and store TTLs
    that compare against real time stay consistent."""

    def __init__(self, now: float | None = None) -> None:
        self.now = float(int(time.time())) if now is None else float(now)

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
