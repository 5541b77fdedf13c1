"""Process-wide state shared by the public app, the admin app and the policies.

Owns: the config in force, the store, the metrics, the upstream pools, the clock, the
draining flag, the upstream error ratio, the typed services container (gateway/services.py),
and the start/stop of everything that holds a connection or a task.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from gateway import __version__
from gateway.config import GatewayConfig, config_digest
from gateway.health import ErrorRatio
from gateway.net import TrustedProxies
from gateway.observability.logging import AccessLog
from gateway.observability.looplag import LOOP_LAG
from gateway.observability.metrics import Metrics
from gateway.proxy import Upstream
from gateway.services import Services
from gateway.store import Store, create_store

log = logging.getLogger("gateway")

Clock = Callable[[], float]

# Loop-lag samples (100 ms apart) between two exports of the structure sizes.
SIZES_EVERY = 10


class Runtime:
    def __init__(
        self,
        config: GatewayConfig,
        *,
        store: Store | None = None,
        metrics: Metrics | None = None,
        clock: Clock = time.time,
        monotonic: Clock = time.monotonic,
    ) -> None:
        self.config = config
        self.version = __version__
        self.digest = config_digest(config)
        self.clock = clock
        self.monotonic = monotonic
        self.metrics = metrics or Metrics()
        self.store = store or create_store(
            config.store,
            clock=clock,
            on_error=self.metrics.on_store_error,
            on_state=self.metrics.on_store_state,
            lag=LOOP_LAG.recent,
        )
        self.trusted = TrustedProxies(config.server.trusted_proxies)
        self.upstreams = {name: Upstream(name, u) for name, u in config.upstreams.items()}
        self.draining = False
        self.started = False
        # False when a reload hands this runtime's store to its successor.
        self.owns_store = True
        self._tasks: set[asyncio.Task[Any]] = set()
        self._on_stop: list[Callable[[], Awaitable[None]]] = []
        self._on_start: list[Callable[[], Awaitable[None]]] = []
        self.access_log: AccessLog | None = (
            AccessLog(clock=clock) if config.server.access_log else None
        )
        # The rolling ratio of failed upstream answers, recorded by the public app.
        self.upstream_health = ErrorRatio(config.client.degraded_error_ratio, monotonic)
        # Signals that upstream is unhealthy (breaker open, error ratio), read by
        # /_edge/client-config to hand out the degraded intervals.
        self.degraded_checks: list[Callable[[], bool]] = [self.upstream_health.unhealthy]
        # Shared services created lazily by the policies that need them (one per process),
        # and the status providers /readyz and /_edge/status iterate.
        self.services = Services()
        # /readyz checks beyond the store: name -> why the process is not ready, or None.
        self.readiness: dict[str, Callable[[], str | None]] = {}
        # Entry counts of the bounded in-process structures (token cache, local fallback
        # state, memory store), exported as edge_state_entries{structure} every second.
        self.sizes: dict[str, Callable[[], int]] = dict(self.store.sizes())
        self._samples = 0

    def _lag_sample(self, _lag: float) -> None:
        self.metrics.loop_lag.set(LOOP_LAG.recent())
        self._samples += 1
        if self._samples % SIZES_EVERY == 0:
            self.export_sizes()

    def export_sizes(self) -> None:
        """edge_state_entries{structure}: how full each bounded in-process structure is."""
        gauge = self.metrics.state_entries
        for name, size in self.sizes.items():
            gauge.labels(name).set(size())

    def degraded(self) -> bool:
        return any(check() for check in self.degraded_checks)

    def on_start(self, fn: Callable[[], Awaitable[None]]) -> None:
        self._on_start.append(fn)

    def on_stop(self, fn: Callable[[], Awaitable[None]]) -> None:
        """Run at shutdown, before pools and the store close (e.g. a final flush)."""
        self._on_stop.append(fn)

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """A background task that lives until stop(); its failure is logged, not raised."""
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.error("background task failed", extra={"task": name}, exc_info=t.exception())

        task.add_done_callback(done)
        return task

    async def start(self) -> None:
        if self.started:
            return
        for up in self.upstreams.values():
            await up.open()
        LOOP_LAG.ensure_running()
        LOOP_LAG.listeners.append(self._lag_sample)
        await self.store.start()
        for fn in self._on_start:
            await fn()
        if self.access_log is not None:
            self.spawn(self.access_log.run(), "access-log-flush")
        self.started = True

    async def stop(self) -> None:
        if not self.started:
            return
        self.draining = True
        for fn in reversed(self._on_stop):
            try:
                await fn()
            except Exception:
                log.exception("shutdown hook failed")
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(BaseException):
                await t
        for up in self.upstreams.values():
            await up.close()
        if self._lag_sample in LOOP_LAG.listeners:
            LOOP_LAG.listeners.remove(self._lag_sample)
        if not LOOP_LAG.listeners:  # the last runtime of the process (a reload keeps it)
            await LOOP_LAG.stop()
        if self.owns_store:
            await self.store.close()
        self.started = False
