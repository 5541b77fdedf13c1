"""Edge attack suite: requests as an attacker writes them, on real sockets, through the
real gateway; each case says what the client gets and what the app may see. Covers the
findings of issue 16 and the cases the gateway already refused, so none regresses.

JWT cases live in tests/test_auth_attacks.py (same table style); refresh-body and apikey
cases are at the end of this file.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

from tests.fakes.app import FakeApp
from tests.helpers import make_config, run_gateway
from tests.test_proxy import raw_request

# A deadline for events the gateway produces itself (a close, an answer): generous for a
# busy 2-core machine, never a measured duration.
EVENT_BOUND = 20.0


def status_of(resp: bytes) -> int:
    assert resp.startswith(b"HTTP/1.1 "), resp[:80]
    return int(resp[9:12])


def error_of(resp: bytes) -> str:
    doc = json.loads(resp.split(b"\r\n\r\n", 1)[1])
    assert set(doc) >= {"error", "message"}
    return str(doc["error"])


async def open_raw(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = url.removeprefix("http://").split(":")
    return await asyncio.open_connection(host, int(port))


async def read_until_closed(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it closes the connection."""
    out = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := await asyncio.wait_for(reader.read(65536), EVENT_BOUND):
            out += chunk
    return out


# ----------------------------------------------------------------- head size and time


async def test_a_huge_header_streamed_is_431_and_others_are_served_meanwhile(
    fake_app: FakeApp,
) -> None:
    """64 MB of one header value, written as fast as the socket takes it: the gateway
    answers 431 at 32 KiB and closes; the attacker's bytes never reach the parser beyond
    the limit, and a normal client on another connection is answered meanwhile."""
    async with run_gateway(make_config(fake_app.url)) as gw:
        reader, writer = await open_raw(gw.url)

        async def attack() -> None:
            writer.write(b"GET /x HTTP/1.1\r\nHost: a\r\nX-Big: ")
            chunk = b"x" * 65536
            with contextlib.suppress(ConnectionError):
                for _ in range(1024):  # 64 MB
                    writer.write(chunk)
                    await writer.drain()

        sender = asyncio.ensure_future(attack())
        resp = await read_until_closed(reader)
        normal = await raw_request(
            gw.url, b"GET /ok HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
        )
        await asyncio.wait_for(sender, EVENT_BOUND)
        writer.close()
    assert status_of(resp) == 431
    assert error_of(resp) == "header_too_large"
    assert status_of(normal) == 200
    assert [r["path"] for r in fake_app.requests] == ["/ok"]


async def test_an_unfinished_head_is_closed_at_header_timeout(fake_app: FakeApp) -> None:
    """Slowloris: a head that never ends. The connection is closed without an answer."""
    cfg = make_config(fake_app.url, server={"header_timeout": "300ms"})
    async with run_gateway(cfg) as gw:
        reader, writer = await open_raw(gw.url)
        writer.write(b"GET /x HTTP/1.1\r\nHost: a\r\nX-A: b\r\n")
        await writer.drain()
        assert await read_until_closed(reader) == b""
        writer.close()
    assert fake_app.requests == []


async def test_an_idle_new_connection_is_closed_at_header_timeout(fake_app: FakeApp) -> None:
    """Connections opened and never used (a connection flood) do not stay open."""
    cfg = make_config(fake_app.url, server={"header_timeout": "300ms"})
    async with run_gateway(cfg) as gw:
        conns = [await open_raw(gw.url) for _ in range(20)]
        for reader, writer in conns:
            assert await read_until_closed(reader) == b""
            writer.close()


async def test_limit_concurrency_answers_503_json(fake_app: FakeApp) -> None:
    cfg = make_config(fake_app.url, server={"limit_concurrency": 3})
    async with run_gateway(cfg) as gw:
        # Three connections held open by unfinished heads fill the limit.
        idle = [await open_raw(gw.url) for _ in range(3)]
        for _, writer in idle:
            writer.write(b"GET /x HTTP/1.1\r\nHost: a\r\n")
            await writer.drain()
        resp = await raw_request(gw.url, b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        for _, writer in idle:
            writer.close()
    assert status_of(resp) == 503
    assert error_of(resp) == "overloaded"
    assert b"retry-after: 1" in resp.lower()
