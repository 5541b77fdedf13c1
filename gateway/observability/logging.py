"""JSON-lines logging.

Owns: the log format (one JSON object per line on stderr), the access log line (route,
status, duration, upstream time, request id, client ip, notes) and redaction: query
strings are never logged (they can carry `apikey=` or `access_token=`), nor are headers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from json.encoder import encode_basestring_ascii
from typing import Any, TextIO

log = logging.getLogger("gateway")

# A str as a JSON string literal, exactly as json.dumps writes it (ensure_ascii): the C
# function json.dumps itself calls, without json.dumps' per-call argument handling.
_js: Callable[[str], str] = encode_basestring_ascii

# `color_message` is uvicorn's copy of the message with ANSI colour codes.
_RESERVED = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "color_message",
}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k, v in record.__dict__.items():
            if k not in _RESERVED and not k.startswith("_"):
                out[k] = v
        if record.exc_info and record.levelno >= logging.ERROR:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, separators=(",", ":"))


def _no_uvicorn_lifecycle(record: logging.LogRecord) -> bool:
    """uvicorn's INFO lines ("Started server process", "Application startup complete",
    "Uvicorn running on ...") come once per listener, so twice per process, and say less
    than the gateway's own startup line: dropped unless the level is debug. Its warnings
    and errors (a bad request line, a failed startup) still pass."""
    return record.levelno > logging.INFO


def setup_logging(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        lg = logging.getLogger(name)
        lg.handlers[:] = []
        lg.propagate = True
        for f in [f for f in lg.filters if f is _no_uvicorn_lifecycle]:
            lg.removeFilter(f)
        if level != "debug":
            lg.addFilter(_no_uvicorn_lifecycle)
    # The gateway writes its own access line; uvicorn's would log query strings.
    logging.getLogger("uvicorn.access").disabled = True
    # httpx logs every request's full URL at INFO: webhook URLs are secrets, and JWKS /
    # GoTrue calls need no line each.
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _ms3(x: float) -> str:
    """`repr(round(x, 3))`, the text json.dumps writes for it, without `round` (which
    goes through a decimal string and back to a float): `%.3f` rounds the same way
    (correctly, half-even on the exact binary value) and below 1e12 the shortest repr
    of the rounded float is those digits minus trailing zeros (15 significant digits or
    fewer round-trip). Anything else (negative, huge, inf, nan) takes the long way."""
    if 0.0 <= x < 1e12:
        s = f"{x:.3f}".rstrip("0")
        return s + "0" if s[-1] == "." else s
    return repr(round(x, 3))


# One request's fields as recorded on the request path: (ts, request_id, route, method,
# path, status, duration, upstream, client_ip, notes).
_Entry = tuple[float, str, str, str, str, int, float, float | None, str, list[str]]


class AccessLog:
    """The access log: one JSON line per request, in the same shape as JsonFormatter's.

    Not through `logging`: a LogRecord plus a formatter per request cost ~35 µs, a
    quarter of a proxied request's CPU (docs/bench.md). The request path only records
    its fields (a tuple); lines are formatted and written in batches (every
    `flush_interval`, or at `max_lines`), off the request's own latency. The price is
    that a hard kill can lose the last `flush_interval` of lines; a drain flushes them."""

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        flush_interval: float = 0.05,
        max_lines: int = 256,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.stream = stream
        self.flush_interval = flush_interval
        self.max_lines = max_lines
        self.clock = clock
        self.entries: list[_Entry] = []
        # Which worker answered (server.workers > 1): cheap to log, handy to debug.
        self.pid = os.getpid()
        self._fixed = f'"level":"info","logger":"gateway.access","msg":"access","pid":{self.pid}'

    def write(
        self,
        *,
        request_id: str,
        route: str,
        method: str,
        path: str,
        status: int,
        duration: float,
        upstream: float | None,
        client_ip: str,
        notes: list[str],
    ) -> None:
        # The notes list is the request's own; copied in case anything appends later.
        self.entries.append(
            (
                self.clock(),
                request_id,
                route,
                method,
                path,
                status,
                duration,
                upstream,
                client_ip,
                list(notes) if notes else notes,
            )
        )
        if len(self.entries) >= self.max_lines:
            self.flush()

    def _line(self, e: _Entry) -> str:
        # The same text json.dumps(dict, separators=(",", ":")) gives for these fields,
        # in the same order, formatted directly (docs/performance.md).
        ts, request_id, route, method, path, status, duration, upstream, client_ip, notes = e
        line = (
            f'{{"ts":{_ms3(ts)},{self._fixed},"request_id":{_js(request_id)},'
            f'"route":{_js(route)},"method":{_js(method)},"path":{_js(path)},'
            f'"status":{int(status)},"duration_ms":{_ms3(duration * 1000)},'
            f'"client_ip":{_js(client_ip)}'
        )
        if upstream is not None:
            line += f',"upstream_ms":{_ms3(upstream * 1000)}'
        if notes:
            return line + ',"notes":[' + ",".join(map(_js, notes)) + "]}"
        return line + "}"

    def flush(self) -> None:
        if not self.entries:
            return
        entries, self.entries = self.entries, []
        text = "".join([self._line(e) + "\n" for e in entries])
        stream = self.stream or sys.stderr
        try:
            stream.write(text)
            stream.flush()
        except (OSError, ValueError):
            pass  # a closed or broken stderr must not take requests down with it

    async def run(self) -> None:
        try:
            while True:
                await asyncio.sleep(self.flush_interval)
                self.flush()
        finally:
            self.flush()
