"""JWKS cache behaviour through the real gateway: startup load, Cache-Control, rotation
without restart, an issuer that is down (at startup or later), and floods of unknown kids.
Time moves on an injected clock; no test waits for a TTL."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httpx
import pytest

from gateway.policies.auth.policy import VERIFIER
from tests.fakes.app import FakeApp
from tests.fakes.clock import FakeClock
from tests.fakes.jwks import (
    FakeIssuer,
    auth_routes,
    auth_settings,
    generate,
    sign_with,
)
from tests.helpers import Running, make_config, run_gateway


def sample(gw: Any, name: str, labels: dict[str, str]) -> float:
    return float(gw.app.rt.metrics.registry.get_sample_value(name, labels) or 0)


async def settle(gw: Any) -> None:
    """Wait for a background JWKS fetch the last request may have started."""
    jwks = gw.app.rt.services[VERIFIER].jwks
    task = jwks._inflight
    if task is not None:
        await asyncio.wait_for(asyncio.shield(task), 5)


class Caller:
    """Fresh tokens per call (distinct `sub`s), so the verified-token cache does not hide
    what the key set does."""

    def __init__(self, gw: Any, issuer: FakeIssuer, clock: FakeClock, c: httpx.AsyncClient):
        self.gw, self.issuer, self.clock, self.c = gw, issuer, clock, c
        self.n = 0

    def token(self, kid: str | None = "es-1") -> str:
        self.n += 1
        claims = self.issuer.claims(now=self.clock.now, sub=f"user-{self.n}")
        return self.issuer.sign(claims, kid=kid)

    async def get(self, token: str, path: str = "/req/x") -> httpx.Response:
        return await self.c.get(
            f"{self.gw.url}{path}", headers={"Authorization": f"Bearer {token}"}
        )


async def test_loaded_once_at_startup_then_served_from_cache(
    issuer: FakeIssuer, fake_app: FakeApp
) -> None:
    clock = FakeClock()
    cfg = make_config(fake_app.url, auth=auth_settings(issuer), routes=auth_routes())
    async with run_gateway(cfg, clock=clock) as gw, httpx.AsyncClient() as c:
        assert issuer.jwks_fetches == 1
        call = Caller(gw, issuer, clock, c)
        for _ in range(20):
            assert (await call.get(call.token())).status_code == 200
        assert issuer.jwks_fetches == 1
        assert sample(gw, "edge_jwks_fetches_total", {"outcome": "ok"}) == 1


async def test_cache_control_max_age_is_honoured(issuer: FakeIssuer, fake_app: FakeApp) -> None:
    issuer.cache_control = "public, max-age=120"
    clock = FakeClock()
    cfg = make_config(fake_app.url, auth=auth_settings(issuer), routes=auth_routes())
    async with run_gateway(cfg, clock=clock) as gw, httpx.AsyncClient() as c:
        call = Caller(gw, issuer, clock, c)
        clock.advance(119)
        assert (await call.get(call.token())).status_code == 200
        await settle(gw)
        assert issuer.jwks_fetches == 1
        clock.advance(2)
        # Served with the keys in hand while the refresh runs in the background.
        assert (await call.get(call.token())).status_code == 200
        await settle(gw)
        assert issuer.jwks_fetches == 2


async def test_max_age_is_capped_by_jwks_max_age(issuer: FakeIssuer, fake_app: FakeApp) -> None:
    issuer.cache_control = "public, max-age=86400"
    clock = FakeClock()
    cfg = make_config(
        fake_app.url, auth=auth_settings(issuer, jwks_max_age="300s"), routes=auth_routes()
    )
    async with run_gateway(cfg, clock=clock) as gw, httpx.AsyncClient() as c:
        call = Caller(gw, issuer, clock, c)
        clock.advance(301)
        assert (await call.get(call.token())).status_code == 200
        await settle(gw)
        assert issuer.jwks_fetches == 2


@pytest.mark.parametrize("cache_control", ["no-store", "max-age=0", None])
async def test_short_or_missing_max_age(
    issuer: FakeIssuer, fake_app: FakeApp, cache_control: str | None
) -> None:
    """no-store / max-age=0 still keep the set for jwks_min_refetch (never a fetch per
    request); no Cache-Control at all means jwks_max_age."""
    issuer.cache_control = cache_control
    clock = FakeClock()
    cfg = make_config(fake_app.url, auth=auth_settings(issuer), routes=auth_routes())
    async with run_gateway(cfg, clock=clock) as gw, httpx.AsyncClient() as c:
        call = Caller(gw, issuer, clock, c)
        for _ in range(5):
            assert (await call.get(call.token())).status_code == 200
        await settle(gw)
        assert issuer.jwks_fetches == 1
        clock.advance(31)
        assert (await call.get(call.token())).status_code == 200
        await settle(gw)
        assert issuer.jwks_fetches == (1 if cache_control is None else 2)


async def test_rotation_is_accepted_without_restart_and_revoked_key_stops(
    issuer: FakeIssuer, fake_app: FakeApp
) -> None:
    clock = FakeClock()
    cfg = make_config(fake_app.url, auth=auth_settings(issuer), routes=auth_routes())
    async with run_gateway(cfg, clock=clock) as gw, httpx.AsyncClient() as c:
        call = Caller(gw, issuer, clock, c)
        old = call.token("es-1")
        assert (await call.get(old)).status_code == 200
        # Supabase "rotate": a new signing key is published; the old one stays trusted.
        # (The startup fetch counts against jwks_min_refetch, hence the 30 s.)
        issuer.add_key("ES256", "es-2")
        clock.advance(30)
        new = call.token("es-2")
        assert (await call.get(new)).status_code == 200
        assert issuer.jwks_fetches == 2  # one refetch for the unknown kid
        assert (await call.get(old)).status_code == 200
        # Later the old key is revoked; after the next refresh its tokens stop working,
        # including ones already in the verified-token cache.
        issuer.unpublish("es-1")
        clock.advance(601)
        await call.get(new)
        await settle(gw)
        r = await call.get(old)
        assert r.status_code == 401
        assert r.json()["error"] == "invalid_token"
        assert (await call.get(new)).status_code == 200


async def test_issuer_down_later_keeps_last_good_keys(
    issuer: FakeIssuer, fake_app: FakeApp
) -> None:
    clock = FakeClock()
    cfg = make_config(fake_app.url, auth=auth_settings(issuer), routes=auth_routes())
    async with run_gateway(cfg, clock=clock) as gw, httpx.AsyncClient() as c:
        call = Caller(gw, issuer, clock, c)
        issuer.fail_status = 503
        clock.advance(601)
        assert (await call.get(call.token())).status_code == 200
        await settle(gw)
        assert issuer.jwks_fetches == 2
        assert sample(gw, "edge_jwks_fetches_total", {"outcome": "error"}) == 1
        assert (await call.get(call.token())).status_code == 200
        # Retries are spaced by jwks_min_refetch, not made per request.
        assert issuer.jwks_fetches == 2
        status = (await c.get(f"{gw.admin_url}/_edge/status")).json()
        assert status["auth"]["jwks"]["last_error"] == "HTTP 503"
        assert status["auth"]["jwks"]["kids"] == ["es-1"]
        # A garbage answer is no better: keys kept, outcome "invalid".
        issuer.fail_status = None
        issuer.fail_garbage = True
        clock.advance(31)
        assert (await call.get(call.token())).status_code == 200
        await settle(gw)
        assert sample(gw, "edge_jwks_fetches_total", {"outcome": "invalid"}) == 1
        assert (await call.get(call.token())).status_code == 200


async def test_issuer_down_at_startup_is_not_fatal(issuer: FakeIssuer, fake_app: FakeApp) -> None:
    issuer.fail_status = 500
    clock = FakeClock()
    cfg = make_config(fake_app.url, auth=auth_settings(issuer), routes=auth_routes())
    async with run_gateway(cfg, clock=clock) as gw, httpx.AsyncClient() as c:
        call = Caller(gw, issuer, clock, c)
        # The legacy shared secret needs no JWKS.
        assert (await call.get(call.token(kid=None))).status_code == 200
        assert (await call.get(call.token())).status_code == 401
        issuer.fail_status = None
        # Within jwks_min_refetch of the failed attempt: no new fetch yet.
        assert (await call.get(call.token())).status_code == 401
        assert issuer.jwks_fetches == 1
        clock.advance(31)
        assert (await call.get(call.token())).status_code == 200
        assert issuer.jwks_fetches == 2


async def test_issuer_timeout_is_counted(issuer: FakeIssuer, fake_app: FakeApp) -> None:
    issuer.hang = True
    clock = FakeClock()
    cfg = make_config(
        fake_app.url, auth=auth_settings(issuer, jwks_timeout="200ms"), routes=auth_routes()
    )
    async with run_gateway(cfg, clock=clock) as gw:
        assert sample(gw, "edge_jwks_fetches_total", {"outcome": "timeout"}) == 1
        assert gw.app.rt.services[VERIFIER].status()["jwks"]["last_error"] == "timeout"


async def test_flood_of_unknown_kids_refetches_at_most_once_per_interval(
    issuer: FakeIssuer, fake_app: FakeApp
) -> None:
    clock = FakeClock()
    cfg = make_config(fake_app.url, auth=auth_settings(issuer), routes=auth_routes())
    attacker = generate("ES256", "x")

    def bogus(i: int) -> str:
        return sign_with(attacker.key, "ES256", issuer.claims(now=clock.now), {"kid": f"k{i}"})

    async with run_gateway(cfg, clock=clock) as gw, httpx.AsyncClient() as c:
        call = Caller(gw, issuer, clock, c)
        clock.advance(30)  # past jwks_min_refetch since the startup fetch
        rs = await asyncio.gather(*(call.get(bogus(i)) for i in range(60)))
        assert {r.status_code for r in rs} == {401}
        assert issuer.jwks_fetches == 2  # startup + one refetch for the whole flood
        rs = await asyncio.gather(*(call.get(bogus(i)) for i in range(60, 90)))
        assert issuer.jwks_fetches == 2
        assert sample(gw, "edge_auth_verifications_total", {"result": "unknown_kid"}) == 90
        clock.advance(30)
        rs = await asyncio.gather(*(call.get(bogus(i)) for i in range(90, 120)))
        assert issuer.jwks_fetches == 3
        # Real users keep working throughout.
        assert (await call.get(call.token())).status_code == 200


async def readyz(gw: Any, c: httpx.AsyncClient) -> httpx.Response:
    return await c.get(f"{gw.admin_url}/readyz")


async def test_not_ready_while_the_jwks_is_the_only_key_source_and_none_is_loaded(
    issuer: FakeIssuer, fake_app: FakeApp, caplog: pytest.LogCaptureFixture
) -> None:
    issuer.fail_status = 503
    clock = FakeClock()
    cfg = make_config(
        fake_app.url, auth=auth_settings(issuer, hs256_secret=None), routes=auth_routes()
    )
    with caplog.at_level(logging.WARNING, logger="gateway.auth"):
        async with run_gateway(cfg, clock=clock) as gw, httpx.AsyncClient() as c:
            r = await readyz(gw, c)
            assert r.status_code == 503
            assert r.json()["checks"]["auth_keys"] == {
                "ok": False,
                "reason": f"no verification key loaded: the JWKS fetch from {issuer.jwks_url} "
                "failed (HTTP 503), and auth.hs256_secret is empty",
            }
            # The issuer recovers: the probe itself retries, once per jwks_min_refetch, so
            # the pod becomes ready without taking traffic first.
            issuer.fail_status = None
            assert (await readyz(gw, c)).status_code == 503
            assert issuer.jwks_fetches == 1
            clock.advance(31)
            await readyz(gw, c)
            await settle(gw)
            assert issuer.jwks_fetches == 2
            r = await readyz(gw, c)
            assert r.status_code == 200
            assert r.json()["checks"]["auth_keys"] == {"ok": True}
            # Later failures keep the loaded keys, and the process stays ready.
            issuer.fail_status = 500
            await gw.app.rt.services[VERIFIER].jwks.refresh()
            assert (await readyz(gw, c)).status_code == 200
    # The log says which key set is in force.
    messages = [r.getMessage() for r in caplog.records if r.name == "gateway.auth"]
    assert messages == [
        "JWKS fetch failed; no key set loaded yet",
        "JWKS fetch failed; keeping the last good key set",
    ]


async def test_an_empty_key_set_is_not_ready(issuer: FakeIssuer, fake_app: FakeApp) -> None:
    issuer.unpublish("es-1")
    cfg = make_config(
        fake_app.url, auth=auth_settings(issuer, hs256_secret=None), routes=auth_routes()
    )
    async with run_gateway(cfg, clock=FakeClock()) as gw, httpx.AsyncClient() as c:
        r = await readyz(gw, c)
    assert r.status_code == 503
    assert r.json()["checks"]["auth_keys"]["reason"] == (
        f"no verification key loaded: the JWKS at {issuer.jwks_url} lists no usable key, "
        "and auth.hs256_secret is empty"
    )


async def test_a_shared_secret_keeps_the_process_ready_while_the_jwks_is_down(
    issuer: FakeIssuer, fake_app: FakeApp
) -> None:
    issuer.fail_status = 500
    cfg = make_config(fake_app.url, auth=auth_settings(issuer), routes=auth_routes())
    async with run_gateway(cfg, clock=FakeClock()) as gw, httpx.AsyncClient() as c:
        r = await readyz(gw, c)
    assert r.status_code == 200
    assert r.json()["checks"]["auth_keys"] == {"ok": True}


async def test_no_key_check_without_a_route_that_verifies_tokens(gw: Running) -> None:
    async with httpx.AsyncClient() as c:
        r = await readyz(gw, c)
    assert r.status_code == 200
    assert "auth_keys" not in r.json()["checks"]
