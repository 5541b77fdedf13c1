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


# The same families as _families, in a process with PROMETHEUS_MULTIPROC_DIR set (it
# is read when prometheus_client is imported), printed as the supervisor exposes them.
_MP_CODE = """
import sys
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from gateway.observability.collectors import LATENCY_BUCKETS, fast, flush_pending
mode = sys.argv[1]
c = Counter("t_requests_total", "h", ["route"])
g = Gauge("t_in_flight", "h", multiprocess_mode="livesum")
h = Histogram("t_seconds", "h", ["route"], buckets=LATENCY_BUCKETS)
wrap = (lambda child: child) if mode == "plain" else fast
cc, gg, hh = wrap(c.labels("a")), wrap(g), wrap(h.labels("a"))
print(type(cc).__name__, type(gg).__name__, type(hh).__name__, file=sys.stderr)
for amount in map(float, sys.argv[2].split(",")):
    cc.inc()
    gg.inc()
    hh.observe(amount)
    if mode == "flush-often":
        flush_pending()
gg.dec()
cc.inc(2.5)
if mode != "at-exit":
    flush_pending()
    r = CollectorRegistry()
    MultiProcessCollector(r)
    # Family order follows the files' order on disk: sorted, the text compares.
    sys.stdout.write("\\n".join(sorted(generate_latest(r).decode().splitlines())))
"""
_MP_AMOUNTS = ",".join(str(a) for a in AMOUNTS)


def _multiprocess(mode: str, tmp_path: Path) -> tuple[str, str]:
    d = tmp_path / mode
    d.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(d)}
    out = subprocess.run(
        [sys.executable, "-c", _MP_CODE, mode, _MP_AMOUNTS], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return out.stdout, out.stderr


def test_multiprocess_children_defer_and_expose_what_prometheus_client_would(
    tmp_path: Path,
) -> None:
    """With server.workers > 1 values live in mmap files the supervisor reads: the hot
    path adds to plain totals and the flush writes the same numbers prometheus_client's
    own locked increments would have, whether it runs once or after every increment."""
    plain, kinds = _multiprocess("plain", tmp_path)
    assert "Deferred" not in kinds and "t_seconds_bucket" in plain
    once, kinds = _multiprocess("fast", tmp_path)
    assert kinds.split() == ["_DeferredValue", "_DeferredValue", "_DeferredHistogram"]
    often, _ = _multiprocess("flush-often", tmp_path)
    assert once == plain
    assert often == plain


def test_the_exit_flush_moves_what_the_thread_had_not(tmp_path: Path) -> None:
    """A worker that exits (a drain ends in interpreter exit) leaves its last counts in
    its file: the supervisor's /metrics still adds them up."""
    from prometheus_client.multiprocess import MultiProcessCollector

    plain, _ = _multiprocess("plain", tmp_path)
    _multiprocess("at-exit", tmp_path)
    r = CollectorRegistry()
    MultiProcessCollector(r, path=str(tmp_path / "at-exit"))
    assert "\n".join(sorted(generate_latest(r).decode().splitlines())) == plain


def test_the_flusher_thread_moves_totals_without_being_asked(tmp_path: Path) -> None:
    code = (
        "import time\n"
        "from prometheus_client import Counter\n"
        "from prometheus_client.multiprocess import MultiProcessCollector\n"
        "from prometheus_client import CollectorRegistry\n"
        "from gateway.observability.collectors import fast\n"
        "c = fast(Counter('a_total', 'h', ['x']).labels('1'))\n"
        "c.inc(3)\n"
        "def seen():\n"
        "    r = CollectorRegistry()\n"
        "    MultiProcessCollector(r)\n"
        "    return r.get_sample_value('a_total', {'x': '1'})\n"
        "deadline = time.monotonic() + 30\n"
        "while seen() != 3.0 and time.monotonic() < deadline:\n"
        "    time.sleep(0.01)\n"
        "print(seen())\n"
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["3.0"]
