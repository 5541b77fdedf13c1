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
