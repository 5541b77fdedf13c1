"""What every metrics class shares (gateway/observability/metrics.py and each policy's
metrics.py): the latency buckets, the cache of label children for the hot path, and the
lock-free increments of those children (`fast`)."""

from __future__ import annotations

from bisect import bisect_left
from typing import Any

from prometheus_client.values import MutexValue

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


def fast(child: Any) -> Any:
    """A Counter/Gauge/Histogram child with lock-free `inc`/`dec`/`observe` for the
    per-request paths, or the child itself when its values are not plain in-process
    floats (multiprocess mode, `server.workers > 1`: they live in mmap files) or the
    library's layout is not the one this was written against. Only for children that
    are incremented by non-negative amounts the caller controls (no validation here)."""
    buckets = getattr(child, "_buckets", None)
    if buckets is not None:
        values = [*buckets, getattr(child, "_sum", None)]
        ok = hasattr(child, "_upper_bounds") and len(child._upper_bounds) == len(buckets)
        if ok and all(type(v) is MutexValue and hasattr(v, "_value") for v in values):
            return _FastHistogram(child)
        return child
    value = getattr(child, "_value", None)
    if type(value) is MutexValue and hasattr(value, "_value"):
        return _FastValue(value)
    return child
