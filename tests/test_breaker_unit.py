"""Breaker pieces that a socket test cannot reach precisely: outcomes of requests that
were in flight across a transition, Retry-After parsing, and the negative-cache key."""

from __future__ import annotations

import email.utils
from typing import Any

from gateway.http import Identity, RequestContext
from gateway.observability.metrics import Metrics
from gateway.policies.breaker.config import BreakerConfig
from gateway.policies.breaker.policy import Breaker, BreakerPolicy, parse_retry_after
from gateway.runtime import Runtime
from tests.fakes.clock import FakeClock
from tests.helpers import make_config


def breaker(clock: FakeClock, **kw: Any) -> Breaker:
    cfg = BreakerConfig.model_validate({"group": "g", "failure_threshold": 2, **kw})
    return Breaker("g", cfg, clock, Metrics())


def st(b: Breaker) -> str:
    return b.state


def test_outcomes_from_before_a_transition_are_ignored() -> None:
    clock = FakeClock(500.0)
    b = breaker(clock)
    slow = b.admit()
    assert slow is not None
    for _ in range(2):
        t = b.admit()
        assert t is not None
        b.record(t, 500, None)
    assert st(b) == "open"
    # The slow request admitted while closed succeeds now: it must not close the breaker.
    b.record(slow, 200, None)
    assert st(b) == "open"
    clock.advance(30)
    probe = b.admit()
    assert probe is not None and probe.probe
    assert b.admit() is None  # one probe only
    # A late failure from the closed era does not fail the probe either.
    b.record(slow, 500, None)
    assert st(b) == "half_open"
    b.record(probe, 204, None)
    assert st(b) == "closed"


def test_an_abandoned_probe_frees_its_slot() -> None:
    clock = FakeClock(500.0)
    b = breaker(clock, failure_threshold=1)
    t = b.admit()
    assert t is not None
    b.record(t, 504, None)
    clock.advance(30)
    probe = b.admit()
    assert probe is not None
    assert b.admit() is None
    b.abandon(probe)  # client went away before the upstream answered
    again = b.admit()
    assert again is not None and again.probe


def test_a_late_upstream_retry_after_extends_an_open_breaker() -> None:
    clock = FakeClock(500.0)
    b = breaker(clock, failure_threshold=1, cooldown="10s")
    slow = b.admit()
    t = b.admit()
    assert slow is not None and t is not None
    b.record(t, 500, None)
    assert b.retry_after() == 10
    b.record(slow, 429, 120.0)
    assert b.retry_after() == 120
    b.record(slow, 503, 5.0)  # never shortens it
    assert b.retry_after() == 120
    # Extending is not a new transition.
    assert b.opened_total == 1
    assert b.snapshot()["reason"] == "upstream_429_retry_after"


def test_parse_retry_after() -> None:
    now = 1_800_000_000.0
    assert parse_retry_after(b"120", now) == 120
    assert parse_retry_after(b" 7 ", now) == 7
    assert parse_retry_after(b"0", now) is None
    assert parse_retry_after(b"-5", now) is None
    assert parse_retry_after(b"soon", now) is None
    assert parse_retry_after(None, now) is None
    date = email.utils.formatdate(now + 90, usegmt=True).encode()
    assert parse_retry_after(date, now) == 90
    past = email.utils.formatdate(now - 90, usegmt=True).encode()
    assert parse_retry_after(past, now) is None


def _ctx(rt: Runtime, policy: BreakerPolicy, **kw: Any) -> RequestContext:
    scope = {
        "type": "http",
        "method": kw.get("method", "GET"),
        "path": "/api/chat/r1",
        "raw_path": b"/api/chat/r1",
        "query_string": b"since=1",
        "headers": kw.get("headers", []),
    }
    ctx = RequestContext(scope, None, {}, "rid", kw.get("ip", "10.0.0.1"))  # type: ignore[arg-type]
    ctx.identity = kw.get("identity")
    return ctx


def test_negative_cache_key_is_per_caller_and_hashed() -> None:
    cfg = make_config(
        "http://127.0.0.1:9",
        routes=[
            {
                "name": "chat",
                "match": {"path": "/api/chat/{room}"},
                "upstream": "app",
                "auth": "off",
                "breaker": {"group": "chat", "negative_ttl": "30s"},
            }
        ],
    )
    rt = Runtime(cfg)

    async def nothing(*_: Any) -> None:
        return None

    policy = BreakerPolicy(nothing, cfg.routes[0], rt)

    def ident(sub: str) -> Identity:
        return Identity(sub=sub, role="authenticated", session_id=None, claims={}, exp=0)

    def key(**kw: Any) -> bytes | None:
        return policy._negative_key(_ctx(rt, policy, **kw))

    alice = key(identity=ident("alice"), ip="10.0.0.1")
    # A verified user is one caller whatever their IP.
    assert key(identity=ident("alice"), ip="10.9.9.9") == alice
    assert key(identity=ident("bob"), ip="10.0.0.1") != alice
    # Anonymous: by IP, and by the credentials the upstream may read.
    anon = key(ip="10.0.0.1")
    assert anon != alice
    assert key(ip="10.0.0.2") != anon
    assert key(ip="10.0.0.1", headers=[(b"cookie", b"sb=abc")]) != anon
    # Requests with bodies are never negatively cached.
    assert key(method="POST", identity=ident("alice")) is None
    # The key is a digest: no user id, cookie or token in memory as a key.
    assert alice is not None and len(alice) == 16 and b"alice" not in alice


def test_a_retired_breaker_does_not_overwrite_its_successors_gauge() -> None:
    """After a config reload the metrics carry over but breakers start fresh; requests
    still finishing on the old breaker must not move the new one's gauge."""
    clock = FakeClock(500.0)
    metrics = Metrics()
    cfg = BreakerConfig.model_validate({"group": "g", "failure_threshold": 1})
    old = Breaker("g", cfg, clock, metrics)
    in_flight = old.admit()
    assert in_flight is not None
    new = Breaker("g", cfg, clock, metrics)
    old.record(in_flight, 500, None)
    assert st(old) == "open"
    assert metrics.registry.get_sample_value("edge_breaker_state", {"group": "g"}) == 0
    t = new.admit()
    assert t is not None
    new.record(t, 500, None)
    assert metrics.registry.get_sample_value("edge_breaker_state", {"group": "g"}) == 2
