"""The proxy's own HTTP/1.1 client (gateway/proxy/client.py) against a raw socket server
that answers exactly the bytes each case needs: framing (Content-Length, chunked,
close-delimited, none for HEAD/204/304, 1xx skipped), which answers leave the connection
fit for reuse, and how broken answers, truncation and silence are classified."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from gateway.config import UpstreamConfig
from gateway.proxy.client import request_head
from gateway.proxy.errors import ConnectionDropped, ConnectTimeout, ReadTimeout
from gateway.proxy.upstream import Upstream

ANSWERS = {
    b"/cl": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
    b"/ka": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nKeep-Alive: timeout=5\r\n\r\nok",
    b"/chunked": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n3\r\nabc\r\n0\r\n\r\n"
    ),
    b"/head": b"HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n",
    b"/204": b"HTTP/1.1 204 No Content\r\n\r\n",
    b"/304": b"HTTP/1.1 304 Not Modified\r\nContent-Length: 12\r\n\r\n",
    b"/103": (
        b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    ),
    b"/until-close": b"HTTP/1.1 200 OK\r\n\r\nuntil close",
    b"/conn-close": b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nhi",
    b"/cl-and-te": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\nhi",
    b"/truncated": b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc",
    b"/stalls": b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc",
}
CLOSE_AFTER = {b"/until-close", b"/truncated", b"/conn-close"}


class RawServer:
    def __init__(self) -> None:
        self.connections = 0
        self.tasks: set[asyncio.Task[None]] = set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            while line := await reader.readline():
                path = line.split()[1]
                while (await reader.readline()) not in (b"\r\n", b""):
                    pass
                if path == b"/silent":
                    await asyncio.sleep(10)
                    return
                writer.write(ANSWERS[path])
                await writer.drain()
                if path in CLOSE_AFTER:
                    return
                if path == b"/stalls":
                    await asyncio.sleep(10)
        except (asyncio.CancelledError, ConnectionError):
            pass
        finally:
            writer.close()
            self.tasks.discard(task)


@asynccontextmanager
async def upstream(**cfg: str | int) -> AsyncIterator[tuple[Upstream, RawServer]]:
    raw = RawServer()
    server = await asyncio.start_server(raw.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    up = Upstream("t", UpstreamConfig(url=f"http://127.0.0.1:{port}", **cfg))  # type: ignore[arg-type]
    await up.open()
    try:
        yield up, raw
    finally:
        await up.close()
        for task in list(raw.tasks):
            task.cancel()
        server.close()
        await server.wait_closed()


async def get(up: Upstream, path: bytes, method: bytes = b"GET") -> tuple[int, bytes]:
    head = request_head(method, path, [(b"Host", b"t")], None, None)
    resp = await up.send(head, None, method == b"HEAD", 0.3, False)
    body = b""
    try:
        while chunk := await resp.read():
            body += chunk
    finally:
        resp.release()
    return resp.status, body


async def test_framings_and_which_answers_keep_the_connection() -> None:
    async with upstream() as (up, raw):
        assert await get(up, b"/cl") == (200, b"hello")
        assert await get(up, b"/chunked") == (200, b"helloabc")
        # A HEAD's answer has no body whatever its Content-Length says, and the
        # connection carries the next request.
        assert await get(up, b"/head", b"HEAD") == (200, b"")
        assert await get(up, b"/204") == (204, b"")
        assert await get(up, b"/304") == (304, b"")
        assert await get(up, b"/103") == (200, b"ok")
        assert await get(up, b"/cl") == (200, b"hello")
        assert raw.connections == 1
        # Delimited by the close, or announced with Connection: close: not reused.
        assert await get(up, b"/until-close") == (200, b"until close")
        assert await get(up, b"/conn-close") == (200, b"hi")
        assert await get(up, b"/cl") == (200, b"hello")
        assert raw.connections == 3
        assert up.pool is not None and up.pool.size == 1


async def test_keep_alive_timeout_retires_the_connection_early() -> None:
    async with upstream() as (up, _raw):
        await get(up, b"/ka")
        assert up.pool is not None
        conn = up.pool.idle[-1]
        left = conn.retire_at - asyncio.get_running_loop().time()
        assert 3.5 < left <= 4.0  # timeout=5 -> 4 s


async def test_broken_truncated_and_silent_answers() -> None:
    async with upstream(read_timeout="300ms") as (up, _raw):
        # Content-Length with Transfer-Encoding is a smuggling vector: refused.
        with pytest.raises(ConnectionDropped):
            await get(up, b"/cl-and-te")
        with pytest.raises(ConnectionDropped):
            await get(up, b"/truncated")
        with pytest.raises(ReadTimeout):
            await get(up, b"/stalls")
        with pytest.raises(ReadTimeout):
            await get(up, b"/silent")
        assert up.pool is not None and up.pool.size == 0
        assert await get(up, b"/cl") == (200, b"hello")


async def test_pool_wait_is_bounded_and_a_cancelled_request_frees_its_slot() -> None:
    async with upstream(max_connections=1, pool_timeout="100ms") as (up, _raw):
        head = request_head(b"GET", b"/silent", [(b"Host", b"t")], None, None)
        held = asyncio.ensure_future(up.send(head, None, False, 10.0, False))
        await asyncio.sleep(0.05)
        with pytest.raises(ConnectTimeout):
            await get(up, b"/cl")
        held.cancel()
        await asyncio.gather(held, return_exceptions=True)
        assert await get(up, b"/cl") == (200, b"hello")


def test_request_head_framing() -> None:
    h = [(b"Host", b"t")]
    assert request_head(b"GET", b"/", h, None, None) == b"GET / HTTP/1.1\r\nHost: t\r\n\r\n"
    # As aiohttp frames it: a body-less POST says Content-Length: 0.
    assert request_head(b"POST", b"/p", h, None, None).endswith(b"Content-Length: 0\r\n\r\n")
    assert request_head(b"POST", b"/p", h, b"abc", 3).endswith(b"Content-Length: 3\r\n\r\n")
