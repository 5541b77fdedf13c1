"""The admin listener (its own port, never the public one): `/healthz`, `/readyz`,
`/metrics` and `/_edge/status`.

Owns: liveness (the process answers), readiness (not draining, started, the runtime's
readiness checks such as a loaded token verification key; the store only with
`store.readiness_check`; the detail of each dependency), Prometheus exposition, and
the status document.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.config import Route as ConfigRoute
from gateway.runtime import Runtime
from gateway.store import StoreError


def _store_state(rt: Runtime) -> dict[str, Any]:
    h = rt.store.health
    return {
        "backend": h.backend,
        "ok": h.ok,
        "consecutive_failures": h.consecutive_failures,
        "backing_off": bool(h.backoff_until and rt.monotonic() < h.backoff_until),
        "last_error": h.last_error,
    }


_POLICIES = ("rate_limit", "concurrency", "refresh", "heartbeat", "cache", "breaker")


def _route_summary(r: ConfigRoute) -> dict[str, Any]:
    return {
        "name": r.name,
        "methods": r.match.methods,
        "path": r.match.path,
        "query": r.match.query,
        "upstream": r.upstream,
        "auth": r.auth.mode,
        "policies": [p for p in _POLICIES if getattr(r, p)],
    }


async def _store_ok(rt: Runtime) -> bool:
    """One ping of the store, bounded; also sets edge_store_up."""
    try:
        async with asyncio.timeout(max(rt.config.store.timeout * 4, 0.2)):
            await rt.store.ping()
        ok = True
    except (StoreError, TimeoutError):
        ok = False
    rt.metrics.store_up.set(1 if ok else 0)
    return ok


class _Endpoints:
    """The admin port's handlers. `current` returns the runtime in force (it follows a
    hot reload); `listening` tells whether the public port accepts connections yet."""

    def __init__(
        self, current: Callable[[], Runtime], listening: Callable[[], bool] | None
    ) -> None:
        self.current = current
        self.listening = listening
        self.started = time.time()

    async def healthz(self, _: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(self, _: Request) -> Response:
        rt = self.current()
        checks: dict[str, Any] = {}
        ready = True
        if rt.draining:
            ready = False
            checks["draining"] = True
        if not rt.started or (self.listening is not None and not self.listening()):
            ready = False
            checks["starting"] = True
        store_ok = await _store_ok(rt)
        checks["store"] = {**_store_state(rt), "ok": store_ok}
        # The store is shared: an outage would mark every replica unready at once and
        # turn it into a full outage at the ingress, whatever on_failure says. It shows
        # in the detail and in edge_store_up; store.readiness_check opts in to 503.
        if not store_ok and rt.config.store.readiness_check:
            ready = False
        for provider in rt.services.status_providers():
            checks[provider.name] = provider.status()
        for name, why_not in rt.readiness.items():
            reason = why_not()
            checks[name] = {"ok": True} if reason is None else {"ok": False, "reason": reason}
            ready = ready and reason is None
        body = {"status": "ready" if ready else "not_ready", "checks": checks}
        return JSONResponse(body, status_code=200 if ready else 503)

    async def metrics(self, _: Request) -> Response:
        return Response(
            self.current().metrics.exposition(),
            media_type="text/plain; version=0.0.4; charset=utf-8",
        )

    async def status(self, _: Request) -> Response:
        rt = self.current()
        cfg = rt.config
        return JSONResponse(
            {
                "version": rt.version,
                "config_digest": rt.digest,
                "uptime_s": round(time.time() - self.started, 1),
                "draining": rt.draining,
                "degraded": rt.degraded(),
                "store": _store_state(rt),
                "upstreams": {n: {"url": u.url} for n, u in cfg.upstreams.items()},
                "routes": [_route_summary(r) for r in cfg.routes],
                **{p.name: p.status() for p in rt.services.status_providers()},
            }
        )


def create_admin_app(
    runtime: Runtime | Callable[[], Runtime],
    listening: Callable[[], bool] | None = None,
) -> Starlette:
    """`runtime` may be a getter, so the admin port follows a hot-reloaded config.
    `listening` tells whether the public port accepts connections yet: until it does,
    /readyz says not ready, so no traffic is routed to a pod that would refuse it."""
    current = runtime if callable(runtime) else (lambda: runtime)
    ep = _Endpoints(current, listening)
    return Starlette(
        routes=[
            Route("/healthz", ep.healthz),
            Route("/readyz", ep.readyz),
            Route("/metrics", ep.metrics),
            Route("/_edge/status", ep.status),
        ]
    )
