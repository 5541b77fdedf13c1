"""Rate limiting through the real gateway on a real socket, against memory:// (injected
clock) and the real Redis: burst then steady rate, independent keys, a limit shared by two
gateway instances, the RateLimit / RateLimit-Policy / Retry-After values, the blocked-key
short circuit (Redis commands counted with INFO commandstats on a private redis-server),
and each `on_failure` mode when that Redis is killed mid-test."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from gateway.app import Gateway
from gateway.config import GatewayConfig
from gateway.policies.ratelimit.policy import hash_value
from tests.conftest import PrivateRedis
from tests.fakes.app import FakeApp
from tests.fakes.clock import FIXED_NOW, FakeClock
from tests.fakes.identity import AUTH, bearer
from tests.helpers import make_config, run_gateway

HOUR = "1/h"


def route(name: str, path: str, rate_limit: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "match": {"path": path},
        "upstream": "app",
        "auth": "off",
        "rate_limit": rate_limit,
        **extra,
    }


def config(
    upstream: str, routes: list[dict[str, Any]], store: dict[str, Any] | None = None
) -> GatewayConfig:
    default = {"name": "default", "match": {"path": "/{path:path}"}, "upstream": "app"}
    return make_config(
        upstream,
        routes=[*routes, {**default, "auth": "off"}],
        store=store or {"url": "memory://"},
        # Verifies the tests' tokens on routes with `auth` on (tests/fakes/identity.py).
        auth=AUTH,
    )


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def store_for(backend: str, redis_url: str) -> dict[str, Any]:
    if backend == "memory":
        return {"url": "memory://"}
    return {"url": redis_url, "timeout": "500ms"}


def counter(gw: Any, name: str, **labels: str) -> float:
    value = gw.app.rt.metrics.registry.get_sample_value(name, labels)
    return float(value or 0.0)


# --------------------------------------------------------------------------- burst + headers


async def test_burst_then_refused_with_headers(
    fake_app: FakeApp, backend: str, redis_url: str
) -> None:
    # 1 request per hour, burst 3: three pass at once, the fourth waits a whole interval.
    cfg = config(
        fake_app.url,
        [route("limited", "/limited", [{"by": "ip", "rate": HOUR, "burst": 3}])],
        store_for(backend, redis_url),
    )
    clock = FakeClock(FIXED_NOW)
    kwargs = {"clock": clock} if backend == "memory" else {}
    async with run_gateway(cfg, **kwargs) as gw, httpx.AsyncClient(base_url=gw.url) as c:
        seen = []
        for _ in range(3):
            r = await c.get("/limited")
            assert r.status_code == 200
            assert r.headers["ratelimit-policy"] == '"ip";q=3;w=10800'
            seen.append(r.headers["ratelimit"])
        assert seen == ['"ip";r=2;t=3600', '"ip";r=1;t=7200', '"ip";r=0;t=10800']
        r = await c.get("/limited")
        assert r.status_code == 429
        assert r.headers["content-type"] == "application/json"
        assert r.json() == {
            "error": "rate_limited",
            "message": "too many requests; retry in 3600s",
            "retry_after": 3600,
        }
        assert r.headers["retry-after"] == "3600"
        assert r.headers["ratelimit-policy"] == '"ip";q=3;w=10800'
        assert r.headers["ratelimit"] == '"ip";r=0;t=3600'
        assert "x-request-id" in r.headers
        assert fake_app.hits["/limited"] == 3
        # An unlimited route is untouched and carries no RateLimit fields.
        r = await c.get("/free")
        assert r.status_code == 200
        assert "ratelimit" not in r.headers
        assert counter(gw, "edge_ratelimit_decisions_total", route="limited", result="allowed") == 3
        assert counter(gw, "edge_ratelimit_decisions_total", route="limited", result="limited") == 1


async def test_steady_rate_after_the_burst_memory(fake_app: FakeApp) -> None:
    # 2/s burst 2: after the burst, one request every 500 ms.
    cfg = config(fake_app.url, [route("r", "/r", [{"by": "ip", "rate": "2/s", "burst": 2}])])
    clock = FakeClock(FIXED_NOW)
    async with run_gateway(cfg, clock=clock) as gw, httpx.AsyncClient(base_url=gw.url) as c:
        assert [(await c.get("/r")).status_code for _ in range(3)] == [200, 200, 429]
        r = await c.get("/r")
        assert r.status_code == 429
        assert r.headers["retry-after"] == "1"  # 500 ms, rounded up
        assert r.headers["ratelimit"] == '"ip";r=0;t=1'
        for _ in range(4):
            clock.advance(0.5)
            assert (await c.get("/r")).status_code == 200
            assert (await c.get("/r")).status_code == 429
        # Idle for long enough, the whole burst is back (and no more than the burst).
        clock.advance(10)
        assert [(await c.get("/r")).status_code for _ in range(3)] == [200, 200, 429]
        assert fake_app.hits["/r"] == 2 + 4 + 2


async def test_steady_rate_after_the_burst_redis(fake_app: FakeApp, redis_url: str) -> None:
    """Redis keeps its own clock (TIME), so instead of sleeping the test moves the stored
    theoretical arrival time back by one emission interval: what an hour of waiting does."""
    cfg = config(
        fake_app.url,
        [route("r", "/r", [{"by": "ip", "rate": HOUR, "burst": 2}])],
        store_for("redis", redis_url),
    )
    clock = FakeClock(FIXED_NOW)  # only drives the local blocked-until cache
    client = aioredis.from_url(redis_url)
    async with run_gateway(cfg, clock=clock) as gw, httpx.AsyncClient(base_url=gw.url) as c:
        assert [(await c.get("/r")).status_code for _ in range(3)] == [200, 200, 429]
        (key,) = await client.keys("edge:rl:{rl:r}:*")
        assert key.decode().endswith(hash_value("ip:127.0.0.1"))
        for _ in range(3):
            tat = int(await client.get(key)) - 3_600_000_000  # one interval, in µs
            await client.set(key, str(tat), keepttl=True)
            clock.advance(3600)  # and let the local "blocked until" entry lapse
            assert (await c.get("/r")).status_code == 200
            r = await c.get("/r")
            assert r.status_code == 429
            assert r.headers["retry-after"] == "3600"
        assert fake_app.hits["/r"] == 5
    await client.aclose()


# --------------------------------------------------------------------------- keys


async def test_keys_are_independent(fake_app: FakeApp, backend: str, redis_url: str) -> None:
    cfg = config(
        fake_app.url,
        [
            route("by_ip", "/ip", [{"by": "ip", "rate": HOUR, "burst": 1}]),
            route(
                "by_webinar",
                "/api/webinars/{webinar_id}/chat",
                [{"by": "webinar", "rate": HOUR, "burst": 1}],
            ),
            route("by_route_a", "/a", [{"by": "route", "rate": HOUR, "burst": 1}]),
            route("by_route_b", "/b", [{"by": "route", "rate": HOUR, "burst": 1}]),
        ],
        store_for(backend, redis_url),
    )
    async with (
        run_gateway(cfg, clock=FakeClock(FIXED_NOW)) as gw,
        httpx.AsyncClient(base_url=gw.url) as c,
    ):

        async def codes(path: str, **headers: str) -> list[int]:
            return [(await c.get(path, headers=headers)).status_code for _ in range(2)]

        # 127.0.0.1 is a trusted proxy, so X-Forwarded-For names the client.
        assert await codes("/ip", **{"x-forwarded-for": "203.0.113.1"}) == [200, 429]
        assert await codes("/ip", **{"x-forwarded-for": "203.0.113.2"}) == [200, 429]
        assert await codes("/ip") == [200, 429]
        # One webinar's surge does not use up another's allowance, whoever sends it.
        assert await codes("/api/webinars/w1/chat") == [200, 429]
        assert await codes("/api/webinars/w2/chat") == [200, 429]
        assert await codes("/api/webinars/w3/chat", **{"x-forwarded-for": "203.0.113.9"}) == [
            200,
            429,
        ]
        # `by: route` is one allowance for everybody on that route, and only that route.
        assert await codes("/a") == [200, 429]
        assert await codes("/a", **{"x-forwarded-for": "198.51.100.7"}) == [429, 429]
        assert await codes("/b") == [200, 429]


async def test_user_key_falls_back_to_ip(fake_app: FakeApp, backend: str, redis_url: str) -> None:
    cfg = config(
        fake_app.url,
        [route("chat", "/chat", [{"by": "user", "rate": HOUR, "burst": 2}], auth="optional")],
        store_for(backend, redis_url),
    )
    async with (
        run_gateway(cfg, clock=FakeClock(FIXED_NOW)) as gw,
        httpx.AsyncClient(base_url=gw.url) as c,
    ):
        alice = bearer("alice")
        bob = bearer("bob")
        assert [(await c.get("/chat", headers=alice)).status_code for _ in range(3)] == [
            200,
            200,
            429,
        ]
        # Same IP, another user: its own allowance.
        r = await c.get("/chat", headers=bob)
        assert r.status_code == 200
        assert r.headers["ratelimit"] == '"user";r=1;t=3600'
        # Anonymous callers are limited by client IP, separately from the users on it.
        anon = [(await c.get("/chat")).status_code for _ in range(3)]
        assert anon == [200, 200, 429]
        other_ip = {"x-forwarded-for": "192.0.2.44"}
        assert (await c.get("/chat", headers=other_ip)).status_code == 200


async def test_header_rule_and_skipped_when_absent(
    fake_app: FakeApp, backend: str, redis_url: str
) -> None:
    cfg = config(
        fake_app.url,
        [route("api", "/api", [{"by": "header:X-Api-Key", "rate": HOUR, "burst": 1}])],
        store_for(backend, redis_url),
    )
    async with (
        run_gateway(cfg, clock=FakeClock(FIXED_NOW)) as gw,
        httpx.AsyncClient(base_url=gw.url) as c,
    ):
        k1 = {"x-api-key": "key-one"}
        r = await c.get("/api", headers=k1)
        assert r.status_code == 200
        assert r.headers["ratelimit-policy"] == '"header:x-api-key";q=1;w=3600'
        assert r.headers["ratelimit"] == '"header:x-api-key";r=0;t=3600'
        assert (await c.get("/api", headers=k1)).status_code == 429
        assert (await c.get("/api", headers={"x-api-key": "key-two"})).status_code == 200
        # No header: the rule does not apply, and no RateLimit field describes it.
        for _ in range(3):
            r = await c.get("/api")
            assert r.status_code == 200
            assert "ratelimit" not in r.headers
        if backend == "redis":
            # The raw header value never reaches the store.
            client = aioredis.from_url(redis_url)
            keys = [k.decode() for k in await client.keys("*")]
            await client.aclose()
            assert not any("key-one" in k or "key-two" in k for k in keys)
            assert len([k for k in keys if k.startswith("edge:rl:{rl:api}:")]) == 2


async def test_all_rules_in_one_decision(fake_app: FakeApp, backend: str, redis_url: str) -> None:
    """A request refused by one rule consumes nothing from the others."""
    cfg = config(
        fake_app.url,
        [
            route(
                "two",
                "/api/webinars/{webinar_id}/two",
                [
                    {"by": "ip", "rate": HOUR, "burst": 3},
                    {"by": "webinar", "rate": HOUR, "burst": 1},
                ],
            )
        ],
        store_for(backend, redis_url),
    )
    async with (
        run_gateway(cfg, clock=FakeClock(FIXED_NOW)) as gw,
        httpx.AsyncClient(base_url=gw.url) as c,
    ):
        r = await c.get("/api/webinars/w1/two")
        assert r.status_code == 200
        assert r.headers["ratelimit-policy"] == '"ip";q=3;w=10800, "webinar";q=1;w=3600'
        assert r.headers["ratelimit"] == '"ip";r=2;t=3600, "webinar";r=0;t=3600'
        r = await c.get("/api/webinars/w1/two")
        assert r.status_code == 429
        assert r.headers["ratelimit"] == '"ip";r=2;t=3600, "webinar";r=0;t=3600'
        # The refused request did not use up the IP allowance: two more webinars pass.
        assert (await c.get("/api/webinars/w2/two")).status_code == 200
        r = await c.get("/api/webinars/w3/two")
        assert r.status_code == 200
        assert r.headers["ratelimit"] == '"ip";r=0;t=10800, "webinar";r=0;t=3600'
        r = await c.get("/api/webinars/w4/two")
        assert r.status_code == 429
        assert r.headers["retry-after"] == "3600"


async def test_shared_limit_across_two_gateways(fake_app: FakeApp, redis_url: str) -> None:
    """Two gateway instances (each with its own RedisStore) share one allowance."""
    cfg = config(
        fake_app.url,
        [route("shared", "/shared", [{"by": "ip", "rate": HOUR, "burst": 4}])],
        store_for("redis", redis_url),
    )
    async with (
        run_gateway(cfg) as gw1,
        run_gateway(cfg) as gw2,
        httpx.AsyncClient() as c,
    ):
        assert gw1.app.rt.store is not gw2.app.rt.store
        codes = []
        for i in range(6):
            gw = gw1 if i % 2 == 0 else gw2
            codes.append((await c.get(gw.url + "/shared")).status_code)
        assert codes == [200, 200, 200, 200, 429, 429]
        assert fake_app.hits["/shared"] == 4


# --------------------------------------------------------------------------- short circuit


# Commands Lua runs inside gcra.lua: INFO commandstats counts them too, but they are not
# round trips between the gateway and Redis; INFO and HELLO are the counting client's own.
SCRIPT_INNER = {"cmdstat_time", "cmdstat_get", "cmdstat_set", "cmdstat_info", "cmdstat_hello"}


async def redis_round_trips(url: str) -> int:
    """Commands clients sent to the server so far (INFO commandstats minus the commands
    the script runs inside Redis and our own INFO calls)."""
    client = aioredis.from_url(url)
    stats = await client.info("commandstats")
    await client.aclose()
    return sum(int(v["calls"]) for k, v in stats.items() if k not in SCRIPT_INNER)


async def test_blocked_key_costs_no_round_trip_redis(fake_app: FakeApp, private_redis: str) -> None:
    cfg = config(
        fake_app.url,
        [route("hot", "/hot", [{"by": "ip", "rate": HOUR, "burst": 2}])],
        {"url": private_redis, "timeout": "500ms"},
    )
    clock = FakeClock(FIXED_NOW)
    async with run_gateway(cfg, clock=clock) as gw, httpx.AsyncClient(base_url=gw.url) as c:
        # Warm up with another client: the first EVALSHA of a process meets NOSCRIPT and
        # loads the script (a one-off), which is not what this test counts.
        warm = {"x-forwarded-for": "198.51.100.1"}
        assert (await c.get("/hot", headers=warm)).status_code == 200
        before = await redis_round_trips(private_redis)
        assert [(await c.get("/hot")).status_code for _ in range(3)] == [200, 200, 429]
        assert await redis_round_trips(private_redis) - before == 3  # one per request
        for _ in range(20):
            r = await c.get("/hot")
            assert r.status_code == 429
            assert r.headers["retry-after"] == "3600"
            assert r.headers["ratelimit"] == '"ip";r=0;t=3600'
        assert await redis_round_trips(private_redis) - before == 3  # hammering was free
        assert (
            counter(gw, "edge_ratelimit_decisions_total", route="hot", result="limited_cached")
            == 20
        )
        # Another client is still checked in Redis.
        r = await c.get("/hot", headers={"x-forwarded-for": "203.0.113.5"})
        assert r.status_code == 200
        assert await redis_round_trips(private_redis) - before == 4
        # Once T has passed, the store decides again (still refused: no time passed in
        # Redis, and the new refusal is cached again).
        clock.advance(3601)
        assert (await c.get("/hot")).status_code == 429
        assert await redis_round_trips(private_redis) - before == 5
        assert (await c.get("/hot")).status_code == 429
        assert await redis_round_trips(private_redis) - before == 5


async def test_blocked_key_short_circuit_memory(fake_app: FakeApp) -> None:
    cfg = config(fake_app.url, [route("hot", "/hot", [{"by": "ip", "rate": "1/s", "burst": 1}])])
    clock = FakeClock(FIXED_NOW)
    async with run_gateway(cfg, clock=clock) as gw, httpx.AsyncClient(base_url=gw.url) as c:
        store = gw.app.rt.store
        runs = 0
        original = store.run

        async def counting_run(*args: Any) -> Any:
            nonlocal runs
            runs += 1
            return await original(*args)

        store.run = counting_run  # type: ignore[method-assign]
        assert [(await c.get("/hot")).status_code for _ in range(5)] == [200, 429, 429, 429, 429]
        assert runs == 2
        clock.advance(0.4)
        r = await c.get("/hot")
        assert r.status_code == 429
        assert r.headers["retry-after"] == "1"  # 600 ms left, rounded up
        assert runs == 2
        clock.advance(0.7)
        assert (await c.get("/hot")).status_code == 200
        assert runs == 3


# --------------------------------------------------------------------------- store failure


def failing_config(upstream: str, url: str, mode: str, burst: int = 2) -> GatewayConfig:
    return config(
        upstream,
        [route("rl", "/rl", [{"by": "ip", "rate": HOUR, "burst": burst, "on_failure": mode}])],
        {"url": url, "timeout": "200ms", "failure_threshold": 2, "backoff": "30s"},
    )


async def kill_mid_test(
    fake_app: FakeApp,
    server: PrivateRedis,
    mode: str,
    after_kill: Callable[[httpx.AsyncClient, Any], Awaitable[None]],
) -> None:
    cfg = failing_config(fake_app.url, server.url, mode)
    async with (
        run_gateway(cfg, clock=FakeClock(FIXED_NOW)) as gw,
        httpx.AsyncClient(base_url=gw.url) as c,
    ):
        r = await c.get("/rl")
        assert r.status_code == 200
        assert r.headers["ratelimit"] == '"ip";r=1;t=3600'
        server.stop()
        await after_kill(c, gw)
        # Every request was answered well within store.timeout: the guard backs off
        # after `failure_threshold` failures instead of trying a dead Redis each time.
        health = gw.app.rt.store.health
        assert not health.ok
        assert health.backoff_until > 0


async def test_redis_killed_on_failure_open(
    fake_app: FakeApp, private_redis_server: PrivateRedis
) -> None:
    async def after_kill(c: httpx.AsyncClient, gw: Any) -> None:
        for _ in range(6):
            t0 = time.perf_counter()
            r = await c.get("/rl")
            assert time.perf_counter() - t0 < 0.5
            assert r.status_code == 200
            assert "ratelimit" not in r.headers
        assert counter(gw, "edge_store_fallbacks_total", policy="rate_limit", mode="open") == 6
        assert counter(gw, "edge_ratelimit_decisions_total", route="rl", result="store_open") == 6

    await kill_mid_test(fake_app, private_redis_server, "open", after_kill)
    assert fake_app.hits["/rl"] == 7


async def test_redis_killed_on_failure_closed(
    fake_app: FakeApp, private_redis_server: PrivateRedis
) -> None:
    async def after_kill(c: httpx.AsyncClient, gw: Any) -> None:
        for _ in range(4):
            r = await c.get("/rl")
            assert r.status_code == 503
            assert r.json()["error"] == "store_unavailable"
            assert r.headers["retry-after"] == "30"
        assert counter(gw, "edge_store_fallbacks_total", policy="rate_limit", mode="closed") == 4
        # /readyz reports the store as down (it stays ready: store.on_failure is open).
        async with httpx.AsyncClient() as admin:
            ready = await admin.get(gw.admin_url + "/readyz")
        assert ready.json()["checks"]["store"]["ok"] is False
        assert ready.json()["checks"]["store"]["backing_off"] is True

    await kill_mid_test(fake_app, private_redis_server, "closed", after_kill)
    assert fake_app.hits["/rl"] == 1


async def test_redis_killed_on_failure_local(
    fake_app: FakeApp, private_redis_server: PrivateRedis
) -> None:
    async def after_kill(c: httpx.AsyncClient, gw: Any) -> None:
        # The in-process limiter starts from a full burst of 2 (it never saw the first
        # request), then refuses with the same headers the store would give.
        r = await c.get("/rl")
        assert r.status_code == 200
        assert r.headers["ratelimit"] == '"ip";r=1;t=3600'
        assert (await c.get("/rl")).status_code == 200
        r = await c.get("/rl")
        assert r.status_code == 429
        assert r.headers["retry-after"] == "3600"
        assert counter(gw, "edge_store_fallbacks_total", policy="rate_limit", mode="local") == 3
        assert (
            counter(gw, "edge_ratelimit_decisions_total", route="rl", result="local_limited") == 1
        )

    await kill_mid_test(fake_app, private_redis_server, "local", after_kill)
    assert fake_app.hits["/rl"] == 3


async def test_store_default_on_failure_applies(
    fake_app: FakeApp, private_redis_server: PrivateRedis
) -> None:
    """A rule without on_failure follows store.on_failure (closed here)."""
    cfg = config(
        fake_app.url,
        [route("rl", "/rl", [{"by": "ip", "rate": HOUR, "burst": 5}])],
        {"url": private_redis_server.url, "on_failure": "closed", "timeout": "200ms"},
    )
    async with run_gateway(cfg) as gw, httpx.AsyncClient(base_url=gw.url) as c:
        assert (await c.get("/rl")).status_code == 200
        private_redis_server.stop()
        assert (await c.get("/rl")).status_code == 503


async def test_recovers_when_redis_comes_back(
    fake_app: FakeApp, private_redis_server: PrivateRedis
) -> None:
    cfg = config(
        fake_app.url,
        [route("rl", "/rl", [{"by": "ip", "rate": HOUR, "burst": 2, "on_failure": "open"}])],
        {
            "url": private_redis_server.url,
            "timeout": "200ms",
            "failure_threshold": 1,
            "backoff": "50ms",
        },
    )
    async with run_gateway(cfg) as gw, httpx.AsyncClient(base_url=gw.url) as c:
        assert (await c.get("/rl")).headers["ratelimit"] == '"ip";r=1;t=3600'
        private_redis_server.stop()
        assert "ratelimit" not in (await c.get("/rl")).headers
        private_redis_server.start()
        # A fresh Redis has forgotten the first request; once the 50 ms back-off is
        # over, limiting resumes from a full burst.
        deadline = time.monotonic() + 5
        while True:
            r = await c.get("/rl")
            if "ratelimit" in r.headers or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.02)
        assert r.headers["ratelimit"] == '"ip";r=1;t=3600'
        assert (await c.get("/rl")).status_code == 200
        assert (await c.get("/rl")).status_code == 429
        assert gw.app.rt.store.health.ok


# --------------------------------------------------------------------------- helpers


@pytest.fixture
async def gateway_app(fake_app: FakeApp) -> AsyncIterator[Gateway]:
    cfg = config(fake_app.url, [route("x", "/x", [{"by": "ip", "rate": "1/s"}])])
    async with run_gateway(cfg) as gw:
        yield gw.app


async def test_status_reports_limiter_state(gateway_app: Gateway) -> None:
    status = gateway_app.rt.services.status("ratelimit")
    assert status == {"blocked_keys": 0, "local_keys": 0}


@pytest.mark.parametrize(
    ("rate", "burst", "policy"),
    [
        ("5/s", 10, '"user";q=10;w=2'),
        ("2/s", 5, '"user";q=5;w=3'),  # 2.5 s rounded up: advertises 1.67/s, never more
        ("100/min", 1, '"user";q=1;w=1'),
        ("1/min", 1, '"user";q=1;w=60'),
        ("10/h", 3, '"user";q=3;w=1080'),
    ],
)
def test_policy_field_values(rate: str, burst: int, policy: str) -> None:
    from gateway.policies.ratelimit.config import RateLimitRule
    from gateway.policies.ratelimit.policy import compile_rules

    (rule,) = compile_rules("r", [RateLimitRule(by="user", rate=rate, burst=burst)], "open")
    assert rule.policy_item == policy


def seconds(reply: list[int]) -> list[int]:
    """[admitted, r, t_ms, retry_ms, ...] with the two times rounded up to seconds."""
    return [v if i == 0 or (i - 1) % 3 == 0 else -(-v // 1000) for i, v in enumerate(reply)]


async def test_lua_and_python_twin_agree(redis_url: str) -> None:
    """Same replies from gcra.lua on Redis and gcra_py on memory:// for one sequence of
    calls over three rules (slow rates, so Redis's own clock moving on cannot matter)."""
    from gateway.policies.ratelimit.policy import GCRA
    from gateway.store.memory import MemoryStore
    from gateway.store.redis import RedisStore

    redis_store = RedisStore(redis_url, "twin:", timeout=1)
    memory_store = MemoryStore("twin:", clock=FakeClock(FIXED_NOW))
    keys = ["rl:{t}:a", "rl:{t}:b", "rl:{t}:c"]
    args = [3_600_000_000, 3, 60_000_000, 2, 1_000_000_000, 5]
    try:
        for i in range(6):
            ks, a = (keys, args) if i % 2 == 0 else (keys[1:], args[2:])
            from_redis = await redis_store.run(GCRA, ks, a)
            from_memory = await memory_store.run(GCRA, ks, a)
            # Counts exactly; times to the second (Redis's clock moved on a few ms).
            assert seconds(from_redis) == seconds(from_memory), i
    finally:
        await redis_store.close()


# --------------------------------------------------------------------------- batching


async def test_concurrent_checks_share_pipelines_and_stay_exact(
    fake_app: FakeApp, private_redis: str
) -> None:
    """Concurrent requests' checks travel together (one pipelined write of EVALSHAs),
    yet each is still one atomic EVALSHA: a burst of 10 admits exactly 10 of 40."""
    cfg = config(
        fake_app.url,
        [route("burst", "/burst", [{"by": "route", "rate": HOUR, "burst": 10}])],
        {"url": private_redis, "timeout": "2s"},
    )
    async with run_gateway(cfg) as gw, httpx.AsyncClient(base_url=gw.url) as c:
        before = await redis_round_trips(private_redis)
        replies = await asyncio.gather(*[c.get("/burst") for _ in range(40)])
        codes = sorted(r.status_code for r in replies)
        assert codes == [200] * 10 + [429] * 30
        remaining = sorted(
            int(r.headers["ratelimit"].split(";r=")[1].split(";")[0])
            for r in replies
            if r.status_code == 200
        )
        assert remaining == list(range(10))  # each admitted request saw its own state
        status = gw.app.rt.services.status("ratelimit")
        # Refusals after the first are answered from the local cache; the EVALSHAs
        # that were sent went in fewer pipelines than requests.
        sent = await redis_round_trips(private_redis) - before - 1  # minus SCRIPT LOAD
        assert sent == status["redis_checks"] <= 40
        assert status["redis_batches"] < status["redis_checks"]


async def test_script_flushed_mid_run(fake_app: FakeApp, private_redis: str) -> None:
    cfg = config(
        fake_app.url,
        [route("rl", "/rl", [{"by": "ip", "rate": HOUR, "burst": 3}])],
        {"url": private_redis, "timeout": "2s"},
    )
    client = aioredis.from_url(private_redis)
    async with run_gateway(cfg) as gw, httpx.AsyncClient(base_url=gw.url) as c:
        assert (await c.get("/rl")).headers["ratelimit"] == '"ip";r=2;t=3600'
        await client.script_flush()  # as after a Redis restart or failover
        # NOSCRIPT: loaded again, and the check runs once (not twice).
        assert (await c.get("/rl")).headers["ratelimit"] == '"ip";r=1;t=7200'
        assert (await c.get("/rl")).headers["ratelimit"] == '"ip";r=0;t=10800'
        assert (await c.get("/rl")).status_code == 429
    await client.aclose()


async def test_hung_redis_costs_at_most_store_timeout(
    fake_app: FakeApp, private_redis: str
) -> None:
    """A Redis that accepts but does not answer (CLIENT PAUSE): each request waits at most
    store.timeout, and after failure_threshold timeouts none waits at all."""
    cfg = config(
        fake_app.url,
        [route("rl", "/rl", [{"by": "ip", "rate": HOUR, "burst": 100, "on_failure": "open"}])],
        # No probe during the back-off: on a busy machine the three requests after the
        # second timeout can span the default 0.25 s probe interval, and the probe they
        # would let through waits out store.timeout too (a third timeout, not a fast-fail).
        {
            "url": private_redis,
            "timeout": "100ms",
            "failure_threshold": 2,
            "backoff": "30s",
            "probe_interval": "30s",
        },
    )
    admin = aioredis.from_url(private_redis)
    async with run_gateway(cfg) as gw, httpx.AsyncClient(base_url=gw.url) as c:
        assert "ratelimit" in (await c.get("/rl")).headers
        # A long pause and a generous bound: a busy machine must not make a request look
        # as if it had waited for Redis; what it must not do is wait out the pause.
        await admin.execute_command("CLIENT", "PAUSE", "3000", "ALL")
        took = []
        for _ in range(5):
            t0 = time.perf_counter()
            r = await c.get("/rl")
            took.append(time.perf_counter() - t0)
            assert r.status_code == 200
            assert "ratelimit" not in r.headers
        assert max(took) < 2  # store.timeout plus the request, never the 3 s pause
        health = gw.app.rt.store.health
        # Backing off after failure_threshold timeouts: the last three requests did not
        # even try Redis (counted as fast-fails, not as timeouts).
        kinds = Counter(k.rsplit(":", 1)[1] for k, v in health.counters.items() for _ in range(v))
        assert kinds["timeout"] == 2
        assert kinds["backoff"] == 3
        assert health.backoff_until > 0
        await admin.execute_command("CLIENT", "UNPAUSE")
    await admin.aclose()


async def test_user_limit_with_verified_tokens(
    fake_app: FakeApp, backend: str, redis_url: str
) -> None:
    """End to end with the real auth policy: `by: user` keys on the verified `sub`."""
    from tests.fakes.jwks import FakeIssuer, auth_settings

    issuer = FakeIssuer()
    await issuer.start()
    cfg = make_config(
        fake_app.url,
        auth=auth_settings(issuer),
        store=store_for(backend, redis_url),
        routes=[
            {
                "name": "chat",
                "match": {"path": "/chat"},
                "upstream": "app",
                "auth": "optional",
                "rate_limit": [{"by": "user", "rate": HOUR, "burst": 1}],
            }
        ],
    )

    def bearer(sub: str) -> dict[str, str]:
        return {"authorization": "Bearer " + issuer.sign(issuer.claims(sub=sub))}

    try:
        async with run_gateway(cfg) as gw, httpx.AsyncClient(base_url=gw.url) as c:
            alice, bob = bearer("alice-uuid"), bearer("bob-uuid")
            assert (await c.get("/chat", headers=alice)).status_code == 200
            assert (await c.get("/chat", headers=alice)).status_code == 429
            # A new token of the same user is the same allowance.
            assert (await c.get("/chat", headers=bearer("alice-uuid"))).status_code == 429
            assert (await c.get("/chat", headers=bob)).status_code == 200
            assert [(await c.get("/chat")).status_code for _ in range(2)] == [200, 429]
    finally:
        await issuer.stop()
