"""bench/workers.py's reading of its CPU figures: the cores the gateway used and the
projection for a core per worker, from the numbers wrk and /proc gave."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from common import WrkResult
from workers import scaling


def _run(rps: float, cpu_us: float | None) -> WrkResult:
    return WrkResult(100, 2, 4.0, int(rps * 4), rps, {"p50": 9.0}, cpu_us_per_request=cpu_us)


def test_scaling_reports_cores_used_and_the_per_core_projection() -> None:
    lines = scaling(_run(8000, 110.0), _run(10800, 136.0), cpus=2)
    assert lines[0] == (
        "cores the gateway used: one worker 0.88, two workers 1.47 (of 2, "
        "shared with wrk, nginx and Redis)"
    )
    # 2 x 110 / 136: two workers cost 24 % more CPU a request than one.
    assert lines[1] == (
        "CPU per request, two workers / one: 1.236; a core per worker, load elsewhere "
        "(projection): 1.62 x"
    )


def test_scaling_says_nothing_without_cpu_figures() -> None:
    assert scaling(_run(8000, None), _run(10800, 136.0), cpus=2) == []
