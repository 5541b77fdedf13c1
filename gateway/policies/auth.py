"""Placeholder: the auth policy is not implemented yet; it passes requests through."""

from __future__ import annotations

from typing import Any

from gateway.http import Handler, Receive, RequestContext, Send


class AuthPolicy:
    def __init__(self, next_handler: Handler, *args: Any) -> None:
        self.next = next_handler

    async def __call__(self, ctx: RequestContext, receive: Receive, send: Send) -> None:
        await self.next(ctx, receive, send)
