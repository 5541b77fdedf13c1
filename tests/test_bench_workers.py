"""bench/workers.py's reading of its CPU figures: the cores the gateway used and the
projection for a core per worker, from the numbers wrk and /proc gave."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from common import WrkResult
from workers import scaling, summary


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


def test_summary_takes_the_median_round_and_shows_the_spread() -> None:
    pairs = [
        (_run(8000, 110.0), _run(16000, 110.0)),  # 2.000
        (_run(8000, 110.0), _run(12000, 140.0)),  # 1.500
        (_run(10000, 100.0), _run(17000, 118.0)),  # 1.700: the median
    ]
    lines = summary(pairs, cpus=2)
    assert lines[0] == (
        "two workers / one: 1.700 x requests/s, median of 3 round(s) [1.500 .. 2.000] "
        "(target >= 1.8: MISSED)"
    )
    # The CPU reading is the median round's own: 2 x 100 / 118.
    assert lines[2].endswith("(projection): 1.69 x")


def test_summary_of_an_even_number_of_rounds_takes_the_lower_middle() -> None:
    pairs = [(_run(1000, None), _run(r, None)) for r in (1900, 1700, 2100, 1800)]
    assert summary(pairs, cpus=2) == [
        "two workers / one: 1.800 x requests/s, median of 4 round(s) [1.700 .. 2.100] "
        "(target >= 1.8: ok)"
    ]
