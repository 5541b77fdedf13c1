"""Parsing of the human units used in config.yaml: durations (`50ms`, `10s`, `5m`) and
rates (`5/s`, `100/min`). Owns nothing else; config.py wraps these as pydantic types."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BeforeValidator, PlainSerializer

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_RATE_RE = re.compile(
    r"^\s*(\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)?\s*(ms|s|sec|m|min|h|hour|d|day)\s*$"
)
_RATE_UNIT = {
    "ms": 0.001,
    "s": 1.0,
    "sec": 1.0,
    "m": 60.0,
    "min": 60.0,
    "h": 3600.0,
    "hour": 3600.0,
    "d": 86400.0,
    "day": 86400.0,
}


def parse_duration(value: Any) -> float:
    """Seconds from `50ms`, `10s`, `1.5m`, `2h`. A bare number is refused: the unit is
    what makes a config readable, and `30` (ms? s?) is exactly the ambiguity to avoid."""
    if isinstance(value, bool):
        raise ValueError("expected a duration with a unit, like 50ms, 10s or 5m")
    if isinstance(value, int | float):
        if value == 0:
            return 0.0
        raise ValueError(f"duration {value!r} has no unit; write e.g. '{value}s' or '{value}ms'")
    if not isinstance(value, str):
        raise ValueError("expected a duration with a unit, like 50ms, 10s or 5m")
    m = _DURATION_RE.match(value)
    if not m:
        raise ValueError(f"invalid duration {value!r}; use a number and a unit: ms, s, m, h, d")
    return float(m.group(1)) * _UNIT_SECONDS[m.group(2)]


def format_duration(seconds: float) -> str:
    if seconds and seconds < 1:
        return f"{seconds * 1000:g}ms"
    return f"{seconds:g}s"


def parse_rate(value: Any) -> float:
    """Events per second from `5/s`, `100/min`, `10/5m`."""
    if not isinstance(value, str):
        raise ValueError("expected a rate like 5/s or 100/min")
    m = _RATE_RE.match(value)
    if not m:
        raise ValueError(f"invalid rate {value!r}; use N/s, N/min, N/h (e.g. 100/min)")
    count = float(m.group(1))
    span = float(m.group(2) or 1) * _RATE_UNIT[m.group(3)]
    if count <= 0 or span <= 0:
        raise ValueError(f"rate {value!r} must be positive")
    return count / span


Duration = Annotated[float, BeforeValidator(parse_duration), PlainSerializer(format_duration)]
Rate = Annotated[float, BeforeValidator(parse_rate), PlainSerializer(lambda r: f"{r:g}/s")]
