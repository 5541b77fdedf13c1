"""Cache behind the real AuthPolicy: HS256 access tokens made with joserfc, verified by
the gateway; the identity the cache keys its authorization memory on is the verified
`sub`, and `authorize` reads the verified `app_metadata.role`."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from joserfc import jwt
from joserfc.jwk import OctKey

from tests.fakes.clock import FakeClock
from tests.fakes.stats_app import StatsApp
from tests.helpers import make_config, run_gateway

SECRET = "cache-test-secret-0123456789abcdef0123456789"
PATH = "/api/webinars/w1/stats/access"


@pytest.fixture
async def stats() -> AsyncIterator[StatsApp]:
    app = StatsApp()
    await app.start()
    app.admins = {"user-admin-1"}
    yield app
    await app.stop()


def token(clock: FakeClock, sub: str, role: str, secret: str = SECRET) -> str:
    claims = {
        "sub": sub,
        "aud": "authenticated",
        "role": "authenticated",
        "iat": int(clock()),
        "exp": int(clock()) + 3600,
        "session_id": "s-" + sub,
        "app_metadata": {"role": role},
    }
    return jwt.encode({"alg": "HS256"}, claims, OctKey.import_key(secret))


def bearer(t: str) -> dict[str, str]:
    return {"Authorization": "Bearer " + t}


def config(upstream: str, store_url: str, **cache: Any) -> Any:
    return make_config(
        upstream,
        store={"url": store_url, "timeout": "1s"},
        auth={"hs256_secret": SECRET, "audience": "authenticated"},
        routes=[
            {
                "name": "admin_stats",
                "match": {"methods": ["GET"], "path": "/api/webinars/{webinar_id}/stats/access"},
                "upstream": "app",
                "auth": "required",
                "cache": {"ttl": "10s", **cache},
            }
        ],
    )


async def test_real_tokens_default_rule(stats: StatsApp, store_url: str) -> None:
    clock = FakeClock(time.time())
    admin = token(clock, "user-admin-1", "admin")
    viewer = token(clock, "user-viewer-1", "viewer")
    async with run_gateway(config(stats.url, store_url), clock=clock) as gw:
        async with httpx.AsyncClient() as c:
            r1 = await c.get(gw.url + PATH, headers=bearer(admin))
            assert r1.status_code == 200
            assert "stored" in r1.headers["cache-status"]
            assert (
                (await c.get(gw.url + PATH, headers=bearer(admin)))
                .headers["cache-status"]
                .startswith("edge; hit")
            )
            # A valid token of a non-admin: the app is asked, says 403; then remembered.
            for expected in ("edge; fwd=request; fwd-status=403", "edge; hit; detail=denied"):
                r = await c.get(gw.url + PATH, headers=bearer(viewer))
                assert r.status_code == 403
                assert "viewers" not in r.text
                assert r.headers["cache-status"] == expected
            # No token, or a forged one: AuthPolicy refuses before the cache is consulted.
            for headers in ({}, bearer(token(clock, "user-admin-1", "admin", "x" * 40))):
                r = await c.get(gw.url + PATH, headers=headers)
                assert r.status_code == 401
                assert "viewers" not in r.text
            assert stats.calls == 2
            assert stats.calls_by_user == {"user-admin-1": 1, "user-viewer-1": 1}


async def test_real_tokens_authorize_by_claim(stats: StatsApp) -> None:
    clock = FakeClock(time.time())
    cfg = config(stats.url, "memory://", authorize={"claim": "app_metadata.role", "in": ["admin"]})
    async with run_gateway(cfg, clock=clock) as gw, httpx.AsyncClient() as c:
        r1 = await c.get(gw.url + PATH, headers=bearer(token(clock, "user-admin-1", "admin")))
        assert "stored" in r1.headers["cache-status"]
        # Another admin by verified claim, never seen by the app: served from the cache.
        r2 = await c.get(gw.url + PATH, headers=bearer(token(clock, "user-admin-2", "admin")))
        assert r2.headers["cache-status"] == "edge; hit; ttl=10"
        assert r2.json() == r1.json()
        # A viewer by verified claim is forwarded and gets the app's own 403.
        r3 = await c.get(gw.url + PATH, headers=bearer(token(clock, "user-viewer-1", "viewer")))
        assert r3.status_code == 403
        assert stats.calls == 2
