"""The gateway on the shipped config.yaml in front of a real Next.js 15 App Router app
(`next build && next start`, e2e/nextapp): what broke there before is asserted here.

- admin stats are cached although Next adds `Vary: rsc, next-router-state-tree, ...`
  to every answer: one admin's 20 concurrent polls → 1 upstream call; M admins → M
  first checks (the first also fills) and nothing more within the TTL;
- heartbeats are absorbed at the edge; Next sees the verified identity, never a forged one;
- `NextResponse.redirect(new URL(p, req.url))` points at the gateway, not localhost:<port>;
- server-sent events arrive one by one;
- no 502 for POSTs whose gaps straddle Node's real idle close (5 s advertised, ~6 s).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.config import parse_config
from tests.conftest import free_port
from tests.e2e.conftest import NextApp
from tests.fakes.clock import FakeClock
from tests.fakes.gotrue import sign_hs256
from tests.helpers import Running, run_gateway

SECRET = "e2e-secret-at-least-32-bytes-long-xxxx"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def gw(next_app: NextApp) -> AsyncIterator[Running]:
    supabase = f"http://127.0.0.1:{free_port()}"  # nothing listens: HS256 tokens only
    env = {"APP_URL": next_app.url, "SUPABASE_URL": supabase, "SUPABASE_JWT_SECRET": SECRET}
    cfg = parse_config((ROOT / "config.yaml").read_text(), env=env)
    async with httpx.AsyncClient() as c:
        await c.delete(next_app.url + "/api/test-counts")
    # The gateway's clock stands still: a TTL cannot run out on a busy machine mid-test.
    async with run_gateway(cfg, clock=FakeClock(time.time())) as running:
        running.supabase = supabase  # type: ignore[attr-defined]
        yield running


def token(gw: Running, sub: str) -> dict[str, str]:
    now = int(time.time())
    claims = {
        "sub": sub,
        "aud": "authenticated",
        "role": "authenticated",
        "iss": gw.supabase + "/auth/v1",  # type: ignore[attr-defined]
        "iat": now,
        "exp": now + 3600,
        "session_id": f"s-{sub}",
    }
    return {"Authorization": "Bearer " + sign_hs256(claims, SECRET)}


async def app_counts(next_app: NextApp) -> dict[str, Any]:
    async with httpx.AsyncClient() as c:
        data: dict[str, Any] = (await c.get(next_app.url + "/api/test-counts")).json()
        return data


STATS = "/api/webinars/{w}/stats/access"


async def test_admin_stats_are_cached_behind_next(gw: Running, next_app: NextApp) -> None:
    w = uuid.uuid4().hex[:8]
    limits = httpx.Limits(max_connections=100)
    async with httpx.AsyncClient(timeout=30, limits=limits) as c:
        url = gw.url + STATS.format(w=w)
        first = await asyncio.gather(*(c.get(url, headers=token(gw, "admin-1")) for _ in range(20)))
        assert [r.status_code for r in first] == [200] * 20
        assert "rsc" in first[0].headers["vary"]
        calls = (await app_counts(next_app))["byUser"]
        assert calls == {"admin_stats:admin-1": 1}
        # Two more admins, ten widgets each, at once: one first check each.
        more = await asyncio.gather(
            *(c.get(url, headers=token(gw, u)) for u in ("admin-2", "admin-3") for _ in range(10))
        )
        assert [r.status_code for r in more] == [200] * 20
        # A viewer is refused by the app once, and the refusal replayed to its other polls.
        denied = await asyncio.gather(
            *(c.get(url, headers=token(gw, "viewer-9")) for _ in range(5))
        )
        assert [r.status_code for r in denied] == [403] * 5
        # Within the TTL every admin's next poll is a hit.
        again = [await c.get(url, headers=token(gw, u)) for u in ("admin-1", "admin-2", "admin-3")]
        assert all(r.headers["cache-status"].startswith("edge; hit") for r in again)
        # An RSC request is another variant: never the JSON body.
        rsc = await c.get(url, headers={**token(gw, "admin-1"), "RSC": "1"})
        assert rsc.headers["cache-status"] != again[0].headers["cache-status"]
    calls = (await app_counts(next_app))["byUser"]
    assert calls["admin_stats:admin-1"] == 2  # the plain fill + the RSC variant
    assert calls["admin_stats:admin-2"] == 1
    assert calls["admin_stats:admin-3"] == 1
    assert calls["admin_stats:viewer-9"] == 1


async def test_heartbeats_absorbed_and_identity_seen(gw: Running, next_app: NextApp) -> None:
    w = uuid.uuid4().hex[:8]
    async with httpx.AsyncClient(timeout=30) as c:
        headers = {**token(gw, "viewer-1"), "X-Edge-User-Id": "forged", "X-Edge-User-Role": "admin"}
        for _ in range(10):
            r = await c.post(gw.url + f"/api/webinars/{w}/presence/ping", headers=headers)
            assert r.status_code in (200, 204)
    counts = await app_counts(next_app)
    assert counts["calls"]["presence_ping"] == 1
    seen = [i for i in counts["identity"] if i["route"] == "presence_ping"]
    assert seen == [
        {
            "route": "presence_ping",
            "user": "viewer-1",
            "role": "authenticated",
            "session": "s-viewer-1",
        }
    ]


async def test_redirects_point_at_the_gateway(gw: Running, next_app: NextApp) -> None:
    async with httpx.AsyncClient() as c:
        direct = await c.get(next_app.url + "/api/go")
        assert direct.headers["location"].startswith("http://localhost:")
        r = await c.get(gw.url + "/api/go")
        assert r.status_code == 307
        assert r.headers["location"] == gw.url + "/dashboard?from=go"


async def test_server_sent_events_stream_incrementally(gw: Running) -> None:
    reads: list[bytes] = []
    async with httpx.AsyncClient(timeout=30) as c, c.stream("GET", gw.url + "/api/stream") as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        async for chunk in r.aiter_raw():
            if chunk:
                reads.append(chunk)
    assert b"".join(reads) == b"".join(b"data: %d\n\n" % i for i in range(5))
    # Five events 200 ms apart: buffered, they would arrive in one read.
    assert len(reads) >= 3


async def test_no_502_across_nodes_idle_close(gw: Running, next_app: NextApp) -> None:
    """Node advertises `Keep-Alive: timeout=5` and closes about 6 s after its last
    answer. 100 clients POST, wait 5.9-6.1 s, and POST again."""
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    async with httpx.AsyncClient(timeout=30, limits=limits) as c:

        async def pair(i: int) -> list[int]:
            a = await c.post(gw.url + "/api/echo", content=b"x" * 64)
            await asyncio.sleep(5.9 + 0.2 * i / 100)
            b = await c.post(gw.url + "/api/echo", content=b"y" * 64)
            return [a.status_code, b.status_code]

        results = await asyncio.gather(*(pair(i) for i in range(100)))
    assert [s for p in results for s in p] == [200] * 200
