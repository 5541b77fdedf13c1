"""What every metrics class shares (gateway/observability/metrics.py and each policy's
metrics.py): the latency buckets, the cache of label children for the hot path, and the
lock-free increments of those children (`fast`).

With `server.workers > 1` (Prometheus multiprocess mode) a child's value lives in an
mmap file the supervisor reads, and prometheus_client writes that file under a lock on
every increment: 1.5-2.4 µs each, about 67k instructions (+20 %) a forwarded request.
There `fast` gives a deferred child instead: the event-loop thread adds to plain totals
and one flusher thread per process moves them into the mmap values every
`FLUSH_INTERVAL` and at exit, as Envoy flushes its stats on an interval. A worker's
counts reach the supervisor's /metrics within that interval; a SIGKILLed worker loses
at most that interval's worth.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from bisect import bisect_left
from collections.abc import Callable
from typing import Any, Protocol

from prometheus_client.values import MutexValue

log = logging.getLogger("gateway.metrics")

LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


class Children:
    """A metric's children by label values, each made once: prometheus_client's
    `labels()` validates, builds a tuple and takes a lock on every call (1-2 µs on the
    hot path). Label values are the small fixed vocabularies this module allows, so the
    cache stays small."""

    __slots__ = ("cache", "metric")

    def __init__(self, metric: Any) -> None:
        self.metric = metric
        self.cache: dict[tuple[str, ...], Any] = {}

    def __call__(self, *labels: str) -> Any:
        child = self.cache.get(labels)
        if child is None:
            child = self.cache[labels] = fast(self.metric.labels(*labels))
        return child


class _FastValue:
    """`inc`/`dec` of a Counter or Gauge child straight on its value. prometheus_client
    takes a threading lock and runs two layers of checks per increment (~1 µs); each
    gateway process is one event-loop thread, so the lock guards nothing here. Reading
    (exposition) still goes through prometheus_client, which sees the same float."""

    __slots__ = ("_value",)

    def __init__(self, value: MutexValue) -> None:
        self._value = value

    def inc(self, amount: float = 1) -> None:
        self._value._value += amount

    def dec(self, amount: float = 1) -> None:
        self._value._value -= amount


class _FastHistogram:
    """`observe` of a Histogram child: the same buckets prometheus_client fills (the first
    upper bound >= the amount; bounds end with +Inf) found by bisection, and the sum."""

    __slots__ = ("_bounds", "_buckets", "_sum")

    def __init__(self, child: Any) -> None:
        self._bounds: list[float] = list(child._upper_bounds)
        self._buckets: list[MutexValue] = list(child._buckets)
        self._sum: MutexValue = child._sum

    def observe(self, amount: float) -> None:
        self._sum._value += amount
        if amount == amount:  # NaN fills no bucket in prometheus_client either
            self._buckets[bisect_left(self._bounds, amount)]._value += 1


# How often each process moves its deferred totals into the mmap files (multiprocess
# mode only). Short enough that a scrape right after a burst sees it; a pass over the
# children (one per label set: small fixed vocabularies, reloads reuse them) is a list
# comparison each for the idle ones.
FLUSH_INTERVAL = 0.1


class _Deferred(Protocol):
    def flush(self) -> None: ...

    def settle(self) -> None: ...


class _Flusher:
    """The process's deferred children (one per prometheus_client child) and the daemon
    thread that flushes them. Each child has one writer per field: the event-loop thread
    only adds to its totals, the flush only advances what it has already moved (under
    one lock, so the thread and the exit hook never move the same amount twice). No
    increment is lost and the hot path takes no lock, as long as only the event-loop
    thread increments (true of every caller in gateway/)."""

    def __init__(self) -> None:
        self.children: dict[int, _Deferred] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._failing = False
        atexit.register(self.flush)
        # prometheus_client starts a forked child on files of its own pid: what the parent
        # had counted stays the parent's to move, and the child needs its own thread.
        os.register_at_fork(after_in_child=self._after_fork)

    def get(self, child: Any, make: Callable[[Any], _Deferred]) -> _Deferred:
        """The deferred twin of `child`, made once: a reload builds its policies again
        and asks again, and a second twin would be a second entry to flush forever."""
        with self._lock:
            twin = self.children.get(id(child))
            if twin is None:  # the twin keeps `child` alive, so its id stays its own
                twin = self.children[id(child)] = make(child)
            if self._thread is None:
                self._start()
        return twin

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="edge-metrics-flush", daemon=True)
        self._thread.start()

    def flush(self) -> None:
        with self._lock:
            for twin in self.children.values():
                twin.flush()

    def _run(self) -> None:
        while True:
            time.sleep(FLUSH_INTERVAL)
            try:
                self.flush()
            except Exception:  # a full disk under the mmap files: keep counting, say so once
                if not self._failing:
                    log.exception("moving metrics into the multiprocess files failed")
                self._failing = True
            else:
                self._failing = False

    def _after_fork(self) -> None:
        self._lock = threading.Lock()
        for twin in self.children.values():
            twin.settle()
        self._thread = None
        if self.children:
            self._start()


_FLUSHER = _Flusher()


def flush_pending() -> None:
    """Move every deferred total into its mmap value now (tests; the thread does it)."""
    _FLUSHER.flush()


class _DeferredValue:
    """`inc`/`dec` of a multiprocess Counter or Gauge child: a plain float total, moved
    into the mmap value (prometheus_client's own locked `inc`) by the flusher."""

    __slots__ = ("_flushed", "_target", "total")

    def __init__(self, target: Any) -> None:
        self._target = target
        self.total = 0.0
        self._flushed = 0.0

    def inc(self, amount: float = 1) -> None:
        self.total += amount

    def dec(self, amount: float = 1) -> None:
        self.total -= amount

    def flush(self) -> None:
        total = self.total
        if total != self._flushed:
            self._target.inc(total - self._flushed)
            self._flushed = total

    def settle(self) -> None:
        self._flushed = self.total


class _DeferredHistogram:
    """`observe` of a multiprocess Histogram child: per-bucket counts (not cumulative,
    as prometheus_client stores them) and a sum, moved by the flusher."""

    __slots__ = ("_bounds", "_flushed", "_targets", "counts", "total")

    def __init__(self, child: Any) -> None:
        self._bounds: list[float] = list(child._upper_bounds)
        self._targets: list[Any] = [*child._buckets, child._sum]
        self.counts: list[float] = [0] * len(child._buckets)
        self.total = 0.0
        self._flushed: list[float] = [0.0] * len(self._targets)

    def observe(self, amount: float) -> None:
        self.total += amount
        if amount == amount:  # NaN fills no bucket in prometheus_client either
            self.counts[bisect_left(self._bounds, amount)] += 1

    def flush(self) -> None:
        now = [*self.counts, self.total]
        if now == self._flushed:  # the common idle case: one C-level list comparison
            return
        for i, (value, done) in enumerate(zip(now, self._flushed, strict=True)):
            if value != done:
                self._targets[i].inc(value - done)
                self._flushed[i] = value

    def settle(self) -> None:
        self._flushed = [*self.counts, self.total]


def _histogram(child: Any, buckets: list[Any]) -> Any:
    values = [*buckets, getattr(child, "_sum", None)]
    if not (hasattr(child, "_upper_bounds") and len(child._upper_bounds) == len(buckets)):
        return child
    if all(type(v) is MutexValue and hasattr(v, "_value") for v in values):
        return _FastHistogram(child)
    if all(getattr(v, "_multiprocess", False) for v in values):
        return _FLUSHER.get(child, _DeferredHistogram)
    return child


def fast(child: Any) -> Any:
    """A Counter/Gauge/Histogram child with lock-free `inc`/`dec`/`observe` for the
    per-request paths: in-process floats written directly, or in multiprocess mode
    (`server.workers > 1`, values in mmap files) deferred totals the flusher moves. The
    child itself when the library's layout is not the one this was written against.
    Only for children that are incremented by amounts the caller controls (no
    validation here), and from the event-loop thread only (no lock on either path)."""
    buckets = getattr(child, "_buckets", None)
    if buckets is not None:
        return _histogram(child, list(buckets))
    value = getattr(child, "_value", None)
    if type(value) is MutexValue and hasattr(value, "_value"):
        return _FastValue(value)
    if getattr(value, "_multiprocess", False):
        return _FLUSHER.get(value, _DeferredValue)
    return child
