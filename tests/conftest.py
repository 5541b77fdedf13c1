from __future__ import annotations

import os
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from tests.fakes.app import FakeApp

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/15")


@pytest.fixture
async def fake_app() -> AsyncIterator[FakeApp]:
    app = FakeApp()
    await app.start()
    yield app
    app.slow_release.set()
    await app.stop()


@pytest.fixture
async def redis_url() -> AsyncIterator[str]:
    """The real Redis, database 15, flushed. Under CI=true an unreachable Redis fails the
    test instead of skipping it."""
    client = aioredis.from_url(REDIS_URL)
    try:
        await client.ping()
    except Exception as exc:
        await client.aclose()
        if os.environ.get("CI") == "true":
            pytest.fail(f"Redis at {REDIS_URL} is required under CI=true: {exc}")
        pytest.skip(f"Redis at {REDIS_URL} not reachable: {exc}")
    await client.flushdb()
    yield REDIS_URL
    await client.flushdb()
    await client.aclose()
