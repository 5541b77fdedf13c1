"""Event-loop lag: how late the loop runs a callback that was due.

Owns: one process-wide probe (`LOOP_LAG`) that sleeps `interval` and measures how late
it woke up, keeps the samples of the last second, and hands each sample to whoever
listens (the runtime's metrics: `edge_event_loop_lag_seconds`). The store reads
`recent()` to tell a slow store from a busy loop: a call whose reply sat unread while
the loop ran other work is not a store failure (gateway/store/base.py `CallBudget`).
One per process because there is one loop per process, and because a reloaded runtime
shares the store with its predecessor.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable

# How often the probe samples the loop, and how many samples `recent()` looks at (1 s).
INTERVAL = 0.1
WINDOW = 10


class LoopLag:
    def __init__(self, interval: float = INTERVAL, window: int = WINDOW) -> None:
        self.interval = interval
        self.samples: deque[float] = deque(maxlen=window)
        self.listeners: list[Callable[[float], None]] = []
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def recent(self) -> float:
        """The worst lag of the last `window` samples (0 when not running)."""
        return max(self.samples, default=0.0)

    def record(self, lag: float) -> None:
        self.samples.append(lag)
        for fn in self.listeners:
            fn(lag)

    def ensure_running(self) -> None:
        """Start the probe on the running loop unless it already runs there (idempotent:
        every runtime of the process calls it; tests run one loop per test)."""
        loop = asyncio.get_running_loop()
        if self._task is not None and not self._task.done() and self._loop is loop:
            return
        self.samples.clear()
        self._loop = loop
        self._task = loop.create_task(self._run(), name="loop-lag")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + self.interval
            await asyncio.sleep(self.interval)
            self.record(max(0.0, loop.time() - due))


LOOP_LAG = LoopLag()
