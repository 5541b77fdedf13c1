"""A fake Slack / Discord / generic webhook receiver on a real socket.

Records every POST (path and JSON body) and can be told to fail: answer a status (e.g.
500, 429 with Retry-After) for the next N posts, or to every post. `url(kind)` gives one
path per service so one receiver serves all configured webhooks.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass
from typing import Any

from aiohttp import web


@dataclass
class Post:
    path: str
    body: Any
    answered: int


class WebhookReceiver:
    def __init__(self) -> None:
        self.posts: list[Post] = []
        self.fail_status = 0  # answer this to every post while non-zero
        self.fail_next = 0  # answer fail_status (500 if unset) to this many more posts
        self.retry_after: str | None = None
        self.url = ""
        self.runner: web.AppRunner | None = None
        self._changed = asyncio.Condition()

    def url_for(self, kind: str) -> str:
        return f"{self.url}/{kind}"

    def bodies(self, kind: str, *, ok_only: bool = True) -> list[Any]:
        return [
            p.body for p in self.posts if p.path == f"/{kind}" and (not ok_only or p.answered < 300)
        ]

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/{kind}", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        await web.SockSite(self.runner, sock).start()
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        return self.url

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        status = 200
        if self.fail_status:
            status = self.fail_status
        elif self.fail_next > 0:
            self.fail_next -= 1
            status = 500
        self.posts.append(Post(request.path, body, status))
        async with self._changed:
            self._changed.notify_all()
        headers = {"Retry-After": self.retry_after} if self.retry_after and status >= 400 else {}
        # Slack answers a plain "ok"; Discord 204; both fine for the sender.
        return web.Response(status=status, text="ok" if status < 300 else "error", headers=headers)

    async def wait_for(self, n: int, timeout: float = 5.0) -> list[Post]:
        """Wait until at least `n` posts arrived (any answer)."""

        async def enough() -> None:
            async with self._changed:
                await self._changed.wait_for(lambda: len(self.posts) >= n)

        await asyncio.wait_for(enough(), timeout)
        return self.posts
