"""The lock-free children (gateway/observability/collectors.fast) expose exactly what
prometheus_client's own inc/dec/observe would."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
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
# "once" and "at-exit" park the flusher thread, so only flush_pending() or the exit hook
# can move anything.
_MP_CODE = """
import sys
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
import gateway.observability.collectors as col
mode = sys.argv[1]
if mode in ("once", "at-exit"):
    col.FLUSH_INTERVAL = 1e9
c = Counter("t_requests_total", "h", ["route"])
g = Gauge("t_in_flight", "h", multiprocess_mode="livesum")
h = Histogram("t_seconds", "h", ["route"], buckets=col.LATENCY_BUCKETS)
wrap = (lambda child: child) if mode == "plain" else col.fast
cc, gg, hh = wrap(c.labels("a")), wrap(g), wrap(h.labels("a"))
print(type(cc).__name__, type(gg).__name__, type(hh).__name__, file=sys.stderr)
for amount in map(float, sys.argv[2].split(",")):
    cc.inc()
    gg.inc(0.5)
    hh.observe(amount)
    if mode == "flush-often":
        col.flush_pending()
gg.dec(0.25)
cc.inc(2.125)
if mode != "at-exit":
    col.flush_pending()
    r = CollectorRegistry()
    MultiProcessCollector(r)
    # Family order follows the files' order on disk: sorted, the text compares.
    sys.stdout.write("\\n".join(sorted(generate_latest(r).decode().splitlines())))
"""
# Binary fractions: every partial sum is exact, so a total moved in many deltas equals
# one accumulated in place to the last bit (and a wrong sum shows: no NaN here).
_EXACT = [0.0, 2**-11, 2**-10, 0.25, 0.5, 2.5, 29.75, 30.0, 31.0]


def _multiprocess(mode: str, tmp_path: Path, amounts: list[float]) -> tuple[str, str]:
    d = tmp_path / f"{mode}-{len(amounts)}"
    d.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(d)}
    arg = ",".join(str(a) for a in amounts)
    out = subprocess.run(
        [sys.executable, "-c", _MP_CODE, mode, arg], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return out.stdout, out.stderr


@pytest.mark.parametrize("amounts", [_EXACT, AMOUNTS], ids=["exact", "inf-nan"])
def test_multiprocess_children_defer_and_expose_what_prometheus_client_would(
    tmp_path: Path, amounts: list[float]
) -> None:
    """With server.workers > 1 values live in mmap files the supervisor reads: the hot
    path adds to plain totals and the flush writes the same numbers prometheus_client's
    own locked increments would have, whether it runs once or after every increment."""
    plain, kinds = _multiprocess("plain", tmp_path, amounts)
    assert "Deferred" not in kinds and "t_seconds_bucket" in plain
    once, kinds = _multiprocess("once", tmp_path, amounts)
    assert kinds.split() == ["_DeferredValue", "_DeferredValue", "_DeferredHistogram"]
    often, _ = _multiprocess("flush-often", tmp_path, amounts)
    assert once == plain
    assert often == plain
    if amounts is _EXACT:
        assert 't_seconds_sum{route="a"} 94.00146484375' in plain.splitlines()


def test_the_exit_flush_moves_what_the_thread_had_not(tmp_path: Path) -> None:
    """A worker that exits (a drain ends in interpreter exit) leaves its last counts in
    its file: the supervisor's /metrics still adds them up."""
    from prometheus_client.multiprocess import MultiProcessCollector

    plain, _ = _multiprocess("plain", tmp_path, _EXACT)
    _multiprocess("at-exit", tmp_path, _EXACT)
    r = CollectorRegistry()
    MultiProcessCollector(r, path=str(tmp_path / f"at-exit-{len(_EXACT)}"))
    assert "\n".join(sorted(generate_latest(r).decode().splitlines())) == plain


def _run_mp(code: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )


# What the supervisor would expose for a_total{x="1"}, and a bounded wait for a value
# another thread or process moves there.
_SEEN = (
    "def seen():\n"
    "    r = CollectorRegistry()\n"
    "    MultiProcessCollector(r)\n"
    "    return r.get_sample_value('a_total', {'x': '1'})\n"
    "def wait_seen(value):\n"
    "    deadline = time.monotonic() + 30\n"
    "    while seen() != value and time.monotonic() < deadline:\n"
    "        time.sleep(0.01)\n"
)
_IMPORTS = (
    "import os, time\n"
    "from prometheus_client import CollectorRegistry, Counter\n"
    "from prometheus_client.multiprocess import MultiProcessCollector\n"
    "import gateway.observability.collectors as col\n"
)


def test_a_reload_gets_the_same_deferred_child_back(tmp_path: Path) -> None:
    """Every reload builds its policies again and asks `fast` again: one twin per child,
    or the flusher's list would grow with every SIGHUP."""
    code = _IMPORTS + (
        "c = Counter('a_total', 'h', ['x'])\n"
        "twins = {id(col.fast(c.labels('1'))) for _ in range(100)}\n"
        "print(len(twins), len(col._FLUSHER.children))\n"
    )
    out = _run_mp(code, tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "1"]


def test_a_forked_child_moves_only_its_own_counts(tmp_path: Path) -> None:
    """prometheus_client gives a forked child files of its own: the parent's unmoved
    counts stay the parent's to move, and the child gets a flusher thread of its own."""
    code = (
        _IMPORTS
        + _SEEN
        + (
            "c = col.fast(Counter('a_total', 'h', ['x']).labels('1'))\n"
            "c.inc(5)\n"
            "col.flush_pending()\n"
            "c.inc(2)\n"
            "pid = os.fork()\n"
            "if pid == 0:\n"
            "    c.inc(1)\n"
            "    wait_seen(8.0)\n"
            "    os._exit(0 if seen() == 8.0 else 1)\n"
            "_, status = os.waitpid(pid, 0)\n"
            "col.flush_pending()\n"
            "print(os.waitstatus_to_exitcode(status), seen())\n"
        )
    )
    out = _run_mp(code, tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0", "8.0"]


def test_a_failing_flush_is_logged_once_and_the_thread_goes_on(tmp_path: Path) -> None:
    code = (
        _IMPORTS
        + _SEEN
        + (
            "import logging\n"
            "logging.basicConfig()\n"
            "c = col.fast(Counter('a_total', 'h', ['x']).labels('1'))\n"
            "target, calls = c._target, []\n"
            "real = target.inc\n"
            "def inc(amount):\n"
            "    calls.append(amount)\n"
            "    if len(calls) <= 3:\n"
            "        raise OSError('no space left on device')\n"
            "    real(amount)\n"
            "target.inc = inc\n"
            "c.inc(3)\n"
            "wait_seen(3.0)\n"
            "print(seen(), len(calls))\n"
        )
    )
    out = _run_mp(code, tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["3.0", "4"]
    assert out.stderr.count("moving metrics into the multiprocess files failed") == 1


def test_the_flusher_thread_moves_totals_without_being_asked(tmp_path: Path) -> None:
    code = (
        _IMPORTS
        + _SEEN
        + (
            "c = col.fast(Counter('a_total', 'h', ['x']).labels('1'))\n"
            "c.inc(3)\n"
            "wait_seen(3.0)\n"
            "print(seen())\n"
        )
    )
    out = _run_mp(code, tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["3.0"]
