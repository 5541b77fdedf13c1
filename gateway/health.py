"""Upstream health as the clients should pace themselves by it.

Owns: the rolling ratio of failed upstream answers (5xx, including the proxy's own
502/504) over the last minute, bucketed so recording is O(1) per request. While it is
above `client.degraded_error_ratio` (with a minimum volume, so three failures at 3 a.m.
do not slow every client down), `/_edge/client-config` serves the degraded intervals.
"""

from __future__ import annotations

from collections.abc import Callable


class ErrorRatio:
    def __init__(
        self,
        threshold: float,
        clock: Callable[[], float],
        *,
        window: float = 60.0,
        buckets: int = 12,
        min_requests: int = 20,
    ) -> None:
        self.threshold = threshold
        self.clock = clock
        self.span = window / buckets
        self.min_requests = min_requests
        self.total = [0] * buckets
        self.failed = [0] * buckets
        self.slots = [-1] * buckets

    def _slot(self) -> int:
        tick = int(self.clock() // self.span)
        i = tick % len(self.slots)
        if self.slots[i] != tick:
            self.slots[i] = tick
            self.total[i] = 0
            self.failed[i] = 0
        return i

    def record(self, status: int) -> None:
        i = self._slot()
        self.total[i] += 1
        if status >= 500:
            self.failed[i] += 1

    def ratio(self) -> float:
        tick = int(self.clock() // self.span)
        oldest = tick - len(self.slots) + 1
        total = failed = 0
        for i, slot in enumerate(self.slots):
            if slot >= oldest:
                total += self.total[i]
                failed += self.failed[i]
        if total < self.min_requests:
            return 0.0
        return failed / total

    def unhealthy(self) -> bool:
        return self.ratio() >= self.threshold
