"""The access log line is the JSON json.dumps would write, whatever the path holds."""

from __future__ import annotations

import io
import json
import random
from typing import Any

import pytest

from gateway.observability.logging import AccessLog, _ms3


def reference(log: AccessLog, ts: float, **f: Any) -> str:
    """The line as the previous implementation built it: a dict and json.dumps."""
    line: dict[str, Any] = {
        "ts": round(ts, 3),
        "level": "info",
        "logger": "gateway.access",
        "msg": "access",
        "pid": log.pid,
        "request_id": f["request_id"],
        "route": f["route"],
        "method": f["method"],
        "path": f["path"],
        "status": f["status"],
        "duration_ms": round(f["duration"] * 1000, 3),
        "client_ip": f["client_ip"],
    }
    if f["upstream"] is not None:
        line["upstream_ms"] = round(f["upstream"] * 1000, 3)
    if f["notes"]:
        line["notes"] = f["notes"]
    return json.dumps(line, separators=(",", ":"))


@pytest.mark.parametrize(
    ("path", "notes", "upstream"),
    [
        ("/api/webinars/1/presence/ping", [], None),
        ('/a b/"quoted"/back\\slash', ["auth=anonymous"], 0.0123456),
        ("/caf\u00e9/\u2603/\U0001f600", ["hb=absorbed", "client_gone"], 1e-7),
        ("/ctl\x00\x1f\x7f\n\t", ['x"y'], 12.5),
        ("", [], 0.0),
    ],
)
def test_the_line_is_what_json_dumps_writes(
    path: str, notes: list[str], upstream: float | None
) -> None:
    sink = io.StringIO()
    log = AccessLog(sink, clock=lambda: 1764600000.123456)
    fields: dict[str, Any] = {
        "request_id": "abc-1.2:3",
        "route": "default",
        "method": "GET",
        "path": path,
        "status": 200,
        "duration": 0.000123456,
        "upstream": upstream,
        "client_ip": "2001:db8::1",
        "notes": notes,
    }
    log.write(**fields)
    log.flush()
    line = sink.getvalue().rstrip("\n")
    assert line == reference(log, 1764600000.123456, **fields)
    assert json.loads(line)["path"] == path


def test_durations_and_timestamps_are_written_as_round_3_would() -> None:
    rng = random.Random(20)
    values = [0.0, 1e-7, 0.0005, 0.0015, 2.675, 12500.0, 1764600000.0005, 1e12, 1e20]
    values += [rng.random() * 10 ** rng.randint(-6, 11) for _ in range(20000)]
    values += [rng.randint(0, 10**7) / 1000 for _ in range(20000)]
    for v in values:
        assert _ms3(v) == repr(round(v, 3)), v
