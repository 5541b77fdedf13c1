"""Small HTTP helpers shared by the pipeline: ASGI types, the per-request context, header
lookups, and the JSON error responses the gateway itself returns
(`{"error": "<code>", "message": "..."}`)."""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.routing import CompiledRoute

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]

JSON_CT = (b"content-type", b"application/json")


@dataclass(slots=True)
class Identity:
    """A verified caller, from the access token's claims."""

    sub: str
    role: str | None
    session_id: str | None
    claims: dict[str, Any]
    exp: float


@dataclass(slots=True)
class RequestContext:
    """Everything a policy may read or add for one request. Created by app.py for each
    request; policies keep their per-request state here, never on `self`."""

    scope: Scope
    route: CompiledRoute
    params: dict[str, str]
    request_id: str
    client_ip: str
    start: float = field(default_factory=time.perf_counter)
    identity: Identity | None = None
    # Extra headers for the upstream request (verified identity, etc.).
    upstream_headers: Headers = field(default_factory=list)
    # Extra headers for the client response (RateLimit, Cache-Status, ...).
    response_headers: Headers = field(default_factory=list)
    status: int = 0
    upstream_seconds: float | None = None
    # Short words for the access log (e.g. "cache=hit", "hb=absorbed").
    notes: list[str] = field(default_factory=list)

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.scope["headers"]:
            if k == name:
                return bytes(v)
        return None


Handler = Callable[[RequestContext, Receive, Send], Awaitable[None]]


def header_value(scope: Scope, name: bytes) -> bytes | None:
    for k, v in scope["headers"]:
        if k == name:
            return bytes(v)
    return None


def error_body(code: str, message: str, **extra: Any) -> bytes:
    return json.dumps({"error": code, "message": message, **extra}).encode()


async def send_json(
    send: Send,
    status: int,
    body: bytes,
    headers: Headers | None = None,
) -> None:
    hdrs: Headers = [JSON_CT, (b"content-length", str(len(body)).encode())]
    if headers:
        hdrs.extend(headers)
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def send_error(
    send: Send,
    status: int,
    code: str,
    message: str,
    headers: Headers | None = None,
) -> None:
    await send_json(send, status, error_body(code, message), headers)


def cookies(scope: Scope) -> dict[str, str]:
    """Parse the Cookie header(s) without raising on junk."""
    out: dict[str, str] = {}
    for k, v in scope["headers"]:
        if k != b"cookie":
            continue
        for part in v.decode("latin-1").split(";"):
            name, sep, value = part.strip().partition("=")
            if sep and name and name not in out:
                out[name] = value.strip()
    return out
