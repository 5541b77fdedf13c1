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
    # The server's own receive for this request (set by app.py). A policy that hands the
    # proxy another one (a refresh flight) decouples it from the client connection, so
    # the proxy uses the connection's loss hook only when handed this one.
    receive: Receive | None = None

    def header(self, name: bytes) -> bytes | None:
        return header_value(self.scope, name)


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


# --------------------------------------------------------------------------- composition
# Policies compose by handing the next handler a different `receive` (to replay a body
# they had to read) or `send` (to look at, hold, or replace the answer).


def replay_receive(body: bytes, receive: Receive) -> Receive:
    """A receive that yields `body` once, then defers to the real one (for disconnects)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


@dataclass(slots=True)
class CapturedResponse:
    """A whole response held in memory (for policies that must see or keep the body)."""

    status: int = 0
    headers: Headers = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    complete: bool = False
    too_large: bool = False

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None

    def header_list(self, name: bytes) -> list[bytes]:
        return [v for k, v in self.headers if k.lower() == name]


async def send_captured(
    send: Send,
    resp: CapturedResponse,
    extra_headers: Headers | None = None,
    *,
    head: bool = False,
) -> None:
    """Send a captured (or cached) response, fixing Content-Length to the body held."""
    headers = [
        (k, v) for k, v in resp.headers if k not in (b"content-length", b"transfer-encoding")
    ]
    headers.append((b"content-length", str(len(resp.body)).encode()))
    if extra_headers:
        headers.extend(extra_headers)
    await send({"type": "http.response.start", "status": resp.status, "headers": headers})
    await send(
        {
            "type": "http.response.body",
            "body": b"" if head else bytes(resp.body),
            "more_body": False,
        }
    )
