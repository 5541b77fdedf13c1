"""The lock-free children (gateway/observability/collectors.fast) expose exactly what
prometheus_client's own inc/dec/observe would."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from gateway.observability.collectors import LATENCY_BUCKETS, Children, fast

AMOUNTS = [0.0, 0.0005, 0.00050001, 0.001, 0.3, 2.5, 29.9, 30.0, 31.0, math.inf, math.nan]


def _families(fast_path: bool) -> bytes:
    r = CollectorRegistry()
    c = Counter("t_requests_total", "h", ["route"], registry=r)
    g = Gauge("t_in_flight", "h", registry=r)
    h = Histogram("t_seconds", "h", ["route"], buckets=LATENCY_BUCKETS, registry=r)
    wrap = fast if fast_path else (lambda child: child)
    cc, gg, hh = wrap(c.labels("a")), wrap(g), wrap(h.labels("a"))
    for amount in AMOUNTS:
        cc.inc()
        gg.inc()
        hh.observe(amount)
    gg.dec()
    cc.inc(2.5)
    return generate_latest(r)


def test_fast_children_expose_what_prometheus_client_would() -> None:
    assert _families(True) == _families(False)


def test_fast_children_are_lock_free_in_process() -> None:
    r = CollectorRegistry()
    c = Counter("t2_total", "h", ["x"], registry=r)
    h = Histogram("t2_seconds", "h", ["x"], registry=r)
    assert type(fast(c.labels("a"))).__name__ == "_FastValue"
    assert type(fast(h.labels("a"))).__name__ == "_FastHistogram"
    children = Children(c)
    assert children("a") is children("a")
    assert type(children("a")).__name__ == "_FastValue"


def test_anything_else_is_left_as_it_is() -> None:
    class Other:
        def inc(self) -> None:
            pass

    o = Other()
    assert fast(o) is o


def test_multiprocess_values_are_left_to_prometheus_client(tmp_path: Path) -> None:
    """With server.workers > 1 values live in mmap files other processes read: no fast path."""
    code = (
        "from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram\n"
        "from gateway.observability.collectors import fast\n"
        "r = CollectorRegistry()\n"
        "c = Counter('a_total', 'h', ['x'], registry=r).labels('1')\n"
        "h = Histogram('b_seconds', 'h', ['x'], registry=r).labels('1')\n"
        "g = Gauge('g', 'h', registry=r, multiprocess_mode='livesum')\n"
        "print(fast(c) is c, fast(h) is h, fast(g) is g)\n"
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["True", "True", "True"]
