"""CPU cost of the breaker policy per request, in-process with a stub upstream handler.

Run for the figures in docs/breaker.md:  .venv/bin/python -m tests.test_breaker_bench
As a test it only guards against an order-of-magnitude regression (the machine is shared).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from gateway.http import Message, Receive, RequestContext, Send
from gateway.policies.breaker.policy import BreakerPolicy
from gateway.runtime import Runtime
from tests.helpers import make_config


def _policy(status: int, **breaker: Any) -> BreakerPolicy:
    cfg = make_config(
        "http://127.0.0.1:9",
        routes=[
            {
                "name": "chat",
                "match": {"path": "/api/chat/{room}"},
                "upstream": "app",
                "auth": "off",
                "breaker": {"group": "chat", **breaker},
            }
        ],
    )
    return BreakerPolicy(_stub(status), cfg.routes[0], Runtime(cfg))


def _stub(status: int) -> Any:
    async def upstream(ctx: RequestContext, receive: Receive, send: Send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": b"{}", "more_body": False})

    return upstream


async def _sink(msg: Message) -> None:
    return None


async def _receive() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


def _ctx() -> RequestContext:
    scope = {
        "type": "http",
        "method": "GET",
        "path": "/api/chat/r1",
        "raw_path": b"/api/chat/r1",
        "query_string": b"since=1",
        "headers": [(b"host", b"edge")],
    }
    return RequestContext(scope, None, {}, "rid", "10.0.0.1")  # type: ignore[arg-type]


async def _cpu_us(handler: Any, n: int) -> float:
    for _ in range(min(n, 1000)):
        await handler(_ctx(), _receive, _sink)
    t = time.process_time()
    for _ in range(n):
        await handler(_ctx(), _receive, _sink)
    return (time.process_time() - t) / n * 1e6


async def measure(n: int = 50_000) -> dict[str, float]:
    base = await _cpu_us(_stub(200), n)
    return {
        "stub upstream alone (us/request)": base,
        "breaker closed, added (us)": await _cpu_us(_policy(200), n) - base,
        "closed + negative-cache lookup, added (us)": (
            await _cpu_us(_policy(200, negative_ttl="30s"), n) - base
        ),
        "negative-cache hit answer (us)": await _cpu_us(_policy(404, negative_ttl="30s"), n),
        "open: 503 shed answer (us)": await _cpu_us(
            _policy(500, failure_threshold=1, cooldown="1h"), n
        ),
    }


async def test_breaker_costs_microseconds_not_milliseconds() -> None:
    figures = await measure(5_000)
    assert figures["breaker closed, added (us)"] < 200
    assert figures["open: 503 shed answer (us)"] < 500


if __name__ == "__main__":
    for name, value in asyncio.run(measure()).items():
        print(f"{name:45s} {value:7.2f}")
