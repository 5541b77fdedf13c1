"""The upstream client's cost: aiohttp, the gateway's own client, and a minimal protocol.

Starts the static nginx upstream (bench/common.py) and, in this one uvloop process, sends
GETs over 50 concurrent keep-alive connections: with an aiohttp ClientSession set up as
the proxy set it up before it had its own client (`auto_decompress=False`,
`skip_auto_headers`, a dummy cookie jar, connect and read timeouts); with the gateway's
client (gateway/proxy/client.py through `Upstream.send`: pool, read timeout, framing,
streaming reads); and with a minimal `asyncio.Protocol` that writes a prebuilt request
and parses the answer with `httptools.HttpResponseParser` (none of a real client's
duties: the floor). It prints the CPU time per request of each.

    .venv/bin/python bench/upstream_client.py            # 3 rounds of 30,000 requests
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import sys
import time
from pathlib import Path
from typing import cast

import aiohttp
import httptools
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

from common import require_tools, static_upstream

CONCURRENCY = 50


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class _Minimal(asyncio.Protocol):
    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.done: asyncio.Future[int] | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_begin(self) -> None:
        self.headers = []
        self.body = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        assert self.done is not None
        self.done.set_result(self.parser.get_status_code())


async def native(port: int, n: int) -> float:
    loop = asyncio.get_running_loop()
    protos = []
    for _ in range(CONCURRENCY):
        _, proto = await loop.create_connection(_Minimal, "127.0.0.1", port)
        protos.append(proto)
    request = (
        b"GET /bench/item HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Forwarded-For: 127.0.0.1\r\n"
        b"X-Request-Id: 0123456789abcdef\r\n\r\n"
    )

    async def worker(p: _Minimal, count: int) -> None:
        assert p.transport is not None
        for _ in range(count):
            p.done = loop.create_future()
            p.transport.write(request)
            await p.done
            b"".join(p.body)

    c0 = _cpu()
    await asyncio.gather(*(worker(p, n // CONCURRENCY) for p in protos))
    spent = _cpu() - c0
    for p in protos:
        assert p.transport is not None
        p.transport.close()
    return spent / n * 1e6


async def with_aiohttp(port: int, n: int) -> float:
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=100, limit_per_host=100),
        auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        cookie_jar=aiohttp.DummyCookieJar(),
        timeout=aiohttp.ClientTimeout(total=None, connect=5, sock_connect=2, sock_read=30),
    )
    url = f"http://127.0.0.1:{port}/bench/item"
    headers = {"X-Forwarded-For": "127.0.0.1", "X-Request-Id": "0123456789abcdef"}

    async def worker(count: int) -> None:
        for _ in range(count):
            resp = await session.request("GET", url, headers=headers, allow_redirects=False)
            await resp.content.readany()
            resp.release()

    await asyncio.gather(*(worker(100) for _ in range(CONCURRENCY)))  # open the pool
    c0 = _cpu()
    await asyncio.gather(*(worker(n // CONCURRENCY) for _ in range(CONCURRENCY)))
    spent = _cpu() - c0
    await session.close()
    return spent / n * 1e6


async def with_gateway(port: int, n: int) -> float:
    from gateway.config import UpstreamConfig
    from gateway.proxy.client import request_head
    from gateway.proxy.upstream import Upstream

    up = Upstream("bench", UpstreamConfig(url=f"http://127.0.0.1:{port}"))
    await up.open()
    headers = [
        (b"Host", b"127.0.0.1"),
        (b"X-Forwarded-For", b"127.0.0.1"),
        (b"X-Request-Id", b"0123456789abcdef"),
    ]

    async def worker(count: int) -> None:
        for _ in range(count):
            head = request_head(b"GET", b"/bench/item", headers, None, None)
            resp = await up.send(head, None, False, 30.0, False)
            await resp.read()
            resp.release()

    await asyncio.gather(*(worker(100) for _ in range(CONCURRENCY)))  # open the pool
    c0 = _cpu()
    await asyncio.gather(*(worker(n // CONCURRENCY) for _ in range(CONCURRENCY)))
    spent = _cpu() - c0
    await up.close()
    return spent / n * 1e6


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--requests", type=int, default=30000)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    require_tools()
    print(f"load average {os.getloadavg()}")
    with static_upstream() as up:
        for _ in range(args.rounds):
            for name, run in (
                ("aiohttp", with_aiohttp),
                ("gateway", with_gateway),
                ("minimal", native),
            ):
                t0 = time.perf_counter()
                us = uvloop.run(run(up.port, args.requests))
                rps = args.requests / (time.perf_counter() - t0)
                print(f"  {name:8} {us:6.1f} µs CPU per request  ({rps:,.0f} req/s)", flush=True)
    print(f"load average {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
