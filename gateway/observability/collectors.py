"""What every metrics class shares (gateway/observability/metrics.py and each policy's
metrics.py): the latency buckets and the cache of label children for the hot path."""

from __future__ import annotations

from typing import Any

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
            child = self.cache[labels] = self.metric.labels(*labels)
        return child
