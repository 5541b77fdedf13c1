"""JSON-lines logging.

Owns: the log format (one JSON object per line on stderr), the access log line (route,
status, duration, upstream time, request id, client ip, notes) and redaction: query
strings are never logged (they can carry `apikey=` or `access_token=`), nor are headers.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

ACCESS = logging.getLogger("gateway.access")
log = logging.getLogger("gateway")

_RESERVED = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message"}


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
    # The gateway writes its own access line; uvicorn's would log query strings.
    logging.getLogger("uvicorn.access").disabled = True


def access(
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
    if not ACCESS.isEnabledFor(logging.INFO):
        return
    extra: dict[str, Any] = {
        "request_id": request_id,
        "route": route,
        "method": method,
        "path": path,
        "status": status,
        "duration_ms": round(duration * 1000, 3),
        "client_ip": client_ip,
    }
    if upstream is not None:
        extra["upstream_ms"] = round(upstream * 1000, 3)
    if notes:
        extra["notes"] = notes
    ACCESS.info("access", extra=extra)
