"""Per-key concurrency caps.

Owns `ConcurrencyPolicy`: the route's `concurrency: {by, max, retry_after}`, a cap on
in-flight upstream requests per key, counted *per process* (503 + Retry-After when full).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from gateway.http import Handler, Receive, RequestContext, Send, error_body, send_json
from gateway.services import ServiceKey, StatusFn

if TYPE_CHECKING:
    from gateway.config import Route
    from gateway.runtime import Runtime


# In-flight counts per route and key, shared by every route of the process.
CONCURRENCY: ServiceKey[dict[str, dict[str, int]]] = ServiceKey("concurrency")


class ConcurrencyPolicy:
    """Caps in-flight requests per key (webinar, route, user or IP) past this point of the
    chain, i.e. while the upstream request and the response streaming are running. The
    count is per process: with N replicas the effective cap is up to N x max (documented;
    a store-backed semaphore would cost a round trip at both ends of every request)."""

    def __init__(self, next_handler: Handler, route_cfg: Route, rt: Runtime) -> None:
        cfg = route_cfg.concurrency
        assert cfg is not None
        self.next = next_handler
        self.by = cfg.by
        self.max = cfg.max
        self.retry_after = str(max(1, math.ceil(cfg.retry_after))).encode()
        self.rejections = rt.metrics.concurrency.rejections.labels(route_cfg.name)
        # Shared per-process state, visible in /readyz and /_edge/status.
        table = rt.services.setdefault(CONCURRENCY, {})
        self.in_flight: dict[str, int] = table.setdefault(route_cfg.name, {})
        rt.services.add_status(
            StatusFn(
                "concurrency",
                lambda: {
                    route: {"keys": len(counts), "in_flight": sum(counts.values())}
                    for route, counts in table.items()
                },
            )
        )
        self.policy = f'"concurrency";q={cfg.max};qu="concurrent-requests"'.encode()

    def _key(self, ctx: RequestContext) -> str | None:
        if self.by == "webinar":
            return ctx.params.get("webinar_id")
        if self.by == "route":
            return ""
        if self.by == "user" and ctx.identity is not None:
            return "u:" + ctx.identity.sub
        return "ip:" + ctx.client_ip

    async def __call__(self, ctx: RequestContext, receive: Receive, send: Send) -> None:
        key = self._key(ctx)
        if key is None:
            await self.next(ctx, receive, send)
            return
        counts = self.in_flight
        n = counts.get(key, 0)
        if n >= self.max:
            self.rejections.inc()
            ctx.notes.append("concurrency=full")
            ctx.status = 503
            await send_json(
                send,
                503,
                error_body(
                    "concurrency_limit",
                    f"too many requests in flight for this {self.by}; retry shortly",
                ),
                [
                    (b"retry-after", self.retry_after),
                    (b"ratelimit-policy", self.policy),
                    (b"ratelimit", b'"concurrency";r=0'),
                    *ctx.response_headers,
                ],
            )
            return
        counts[key] = n + 1
        try:
            await self.next(ctx, receive, send)
        finally:
            left = counts[key] - 1
            if left:
                counts[key] = left
            else:
                del counts[key]
