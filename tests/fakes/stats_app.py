"""A fake EventLive app for the cache tests: `GET /api/webinars/{id}/stats/access` answers
200 with the stats to admins and 403 to everyone else, deciding per caller from the
identity headers the gateway forwards (`X-Edge-User-Id`, `X-Edge-User-Role`), like the
real app does from its session. Counts every call; can be made to fail, to send
no-store / Set-Cookie, or to hold answers until the test releases them."""

from __future__ import annotations

import asyncio
import socket
from collections import Counter

from aiohttp import web

from gateway.app import Gateway
from gateway.http import Handler, Identity, Receive, RequestContext, Send


class StatsApp:
    def __init__(self) -> None:
        self.calls = 0
        self.calls_by_user: Counter[str] = Counter()
        self.last_headers: dict[str, str] = {}
        self.version = 0
        self.admins: set[str] = set()
        self.admin_roles = {"admin", "host"}
        # None = answer normally; an int = answer that status (e.g. 500, 503).
        self.fail_status: int | None = None
        self.extra_headers: dict[str, str] = {}
        self.body_padding = 0
        # Answer anonymous callers too (for `public: true` routes).
        self.allow_anonymous = False
        # When set (cleared Event), answers wait until the test sets it.
        self.gate: asyncio.Event | None = None
        self.entered = asyncio.Event()
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> str:
        a = web.Application()
        a.router.add_get("/api/webinars/{wid}/stats/access", self.stats)
        self.runner = web.AppRunner(a, access_log=None)
        await self.runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        await web.SockSite(self.runner, sock).start()
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        return self.url

    async def stop(self) -> None:
        if self.runner:
            await self.runner.cleanup()
            self.runner = None

    def allowed(self, user: str, role: str) -> bool:
        if not user:
            return self.allow_anonymous
        return user in self.admins or role in self.admin_roles

    async def stats(self, request: web.Request) -> web.StreamResponse:
        self.calls += 1
        user = request.headers.get("X-Edge-User-Id", "")
        role = request.headers.get("X-Edge-User-Role", "")
        self.calls_by_user[user or "-"] += 1
        self.last_headers = dict(request.headers)
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_status is not None:
            return web.json_response({"error": "boom"}, status=self.fail_status)
        if not user and not self.allow_anonymous:
            return web.json_response({"error": "unauthorized"}, status=401)
        if not self.allowed(user, role):
            return web.json_response({"error": "forbidden", "message": "admins only"}, status=403)
        self.version += 1
        payload = {
            "webinar_id": request.match_info["wid"],
            "viewers": 42,
            "version": self.version,
            "range": request.query.get("range", ""),
            # An RSC request gets another representation (as in Next.js, with its Vary).
            "rsc": request.headers.get("RSC", ""),
            "pad": "x" * self.body_padding,
        }
        return web.json_response(payload, headers=self.extra_headers)


class FakeClock:
    """Injected wall clock: tests move time instead of sleeping."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def install_test_identity(gw: Gateway) -> None:
    """Test-only stand-in for AuthPolicy on the cached routes of a running gateway: sets
    `ctx.identity` from `X-Test-User` / `X-Test-Role` and forwards the identity headers
    the way AuthPolicy does, then calls the route's real chain (cache → breaker → proxy).
    Routes are built with `auth: off`, so nothing else sets the identity."""
    # The route table lives on `gw.state` once config reload is in (on `gw` before).
    holder = getattr(gw, "state", gw)
    for route in holder.table.routes:
        if route.config.cache is None or route.handler is None:
            continue
        route.handler = _shim(route.handler)


def _shim(inner: Handler) -> Handler:
    async def handler(ctx: RequestContext, receive: Receive, send: Send) -> None:
        user = ctx.header(b"x-test-user")
        if user:
            role = (ctx.header(b"x-test-role") or b"").decode()
            sub = user.decode()
            ctx.identity = Identity(
                sub=sub,
                role="authenticated",
                session_id=None,
                claims={"sub": sub, "role": "authenticated", "app_metadata": {"role": role}},
                exp=4_000_000_000.0,
            )
            ctx.upstream_headers.append((b"x-edge-user-id", user))
            ctx.upstream_headers.append((b"x-edge-user-role", role.encode()))
        await inner(ctx, receive, send)

    return handler
