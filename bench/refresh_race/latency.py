"""Latency of one refresh through the gateway: direct to the fake GoTrue, as leader (one
upstream call) and as replay (answered from the encrypted cache), sequential requests on
one keep-alive connection.

    .venv/bin/python bench/refresh_race/latency.py [memory:// | redis://127.0.0.1:6379/13]

The Redis database given is flushed at the end.
"""

from __future__ import annotations

import asyncio
import socket
import statistics
import sys
import time
from pathlib import Path

import httpx
import redis.asyncio as aioredis

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import tests.helpers as helpers  # noqa: E402
from tests.fakes.gotrue import FakeGoTrue  # noqa: E402
from tests.test_refresh import CLIENT_HEADERS, TOKEN_PATH, refresh_config  # noqa: E402


def _bound_socket() -> socket.socket:
    # With proto left at 0 asyncio does not set TCP_NODELAY on accepted connections, and
    # every keep-alive response after the first waits ~40 ms for a delayed ACK
    # (Kludex/uvicorn#3149); tests/helpers.py has that, so it is patched here.
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    return s


helpers._bound_socket = _bound_socket  # type: ignore[attr-defined]


def summary(xs: list[float]) -> str:
    xs = sorted(xs)
    return f"p50 {statistics.median(xs) * 1000:.2f} ms, p95 {xs[int(len(xs) * 0.95)] * 1000:.2f} ms"


async def main(store: str, n: int = 200) -> None:
    fake = FakeGoTrue()
    await fake.start()
    direct: list[float] = []
    leader: list[float] = []
    replay: list[float] = []
    try:
        cfg = refresh_config(fake.url, store)
        async with helpers.run_gateway(cfg) as gw, httpx.AsyncClient() as c:
            for i in range(n):
                token = fake.sign_in(f"d{i}@example.com")["refresh_token"]
                t0 = time.perf_counter()
                await c.post(fake.url + TOKEN_PATH, json={"refresh_token": token})
                direct.append(time.perf_counter() - t0)
            for i in range(n):
                token = fake.sign_in(f"g{i}@example.com")["refresh_token"]
                for how, bucket in (("leader", leader), ("replay", replay)):
                    t0 = time.perf_counter()
                    r = await c.post(
                        gw.url + TOKEN_PATH, json={"refresh_token": token}, headers=CLIENT_HEADERS
                    )
                    bucket.append(time.perf_counter() - t0)
                    assert r.headers["x-edge-refresh"] == how, r.headers
    finally:
        await fake.stop()
        if store.startswith("redis"):
            r = aioredis.from_url(store)
            await r.flushdb()
            await r.aclose()
    print(f"store {store}")
    print(f"  direct to GoTrue : {summary(direct)}")
    print(f"  gateway, leader  : {summary(leader)}")
    print(f"  gateway, replay  : {summary(replay)}")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "memory://"))
