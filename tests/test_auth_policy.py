"""AuthPolicy end to end through the real gateway: route modes, where the token comes from
(Bearer, both SSR cookie forms, chunked cookies), the identity headers the app receives
(and spoofed ones it never receives), the identity signature, revalidation against
GoTrue, WebSocket upgrades, and `require_identity` for edge endpoints."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
from typing import Any
from urllib.parse import quote

import aiohttp
import httpx
import pytest

from gateway.policies.auth.policy import VERIFIER, get_verifier, require_identity
from gateway.runtime import Runtime
from gateway.tap import capture_send
from tests.fakes.app import FakeApp
from tests.fakes.clock import FakeClock
from tests.fakes.jwks import FakeIssuer, auth_routes, auth_settings
from tests.helpers import make_config, run_gateway

USER = "8d1c2f3e-0000-4000-8000-000000000001"
REF = "abcdefghijklmnop"
COOKIE = f"sb-{REF}-auth-token"


def sample(gw: Any, name: str, labels: dict[str, str]) -> float:
    return float(gw.app.rt.metrics.registry.get_sample_value(name, labels) or 0)


def seen(fake_app: FakeApp) -> list[tuple[str, str]]:
    return [(k.lower(), v) for k, v in fake_app.requests[-1]["headers"]]


def seen_one(fake_app: FakeApp, name: str) -> str | None:
    values = [v for k, v in seen(fake_app) if k == name]
    assert len(values) <= 1, values
    return values[0] if values else None


def session_json(token: str, **extra: Any) -> str:
    return json.dumps(
        {
            "access_token": token,
            "token_type": "bearer",
            "expires_in": 3600,
            "expires_at": 2_000_000_000,
            "refresh_token": "v2refreshtokenvalue",
            "user": {"id": USER, "email": "viewer@example.com", **extra},
        }
    )


def base64_cookie(token: str, **extra: Any) -> str:
    raw = base64.urlsafe_b64encode(session_json(token, **extra).encode()).rstrip(b"=")
    return "base64-" + raw.decode()


def gateway_config(fake_app: FakeApp, issuer: FakeIssuer, **auth: Any) -> Any:
    routes = [
        {
            "name": "realtime",
            "match": {"path": "/realtime/v1/websocket"},
            "upstream": "app",
            "auth": "required",
        },
        *auth_routes(),
    ]
    return make_config(fake_app.url, auth=auth_settings(issuer, **auth), routes=routes)


# --------------------------------------------------------------------------- modes


async def test_required_route_without_token_is_401_json(
    issuer: FakeIssuer, fake_app: FakeApp
) -> None:
    async with run_gateway(gateway_config(fake_app, issuer)) as gw, httpx.AsyncClient() as c:
        r = await c.get(f"{gw.url}/req/x")
        assert r.status_code == 401
        assert r.json() == {"error": "invalid_token", "message": "an access token is required"}
        assert r.headers["www-authenticate"].startswith('Bearer error="invalid_token"')
        assert r.headers["cache-control"] == "no-store"
        assert "x-request-id" in r.headers
        assert fake_app.hits["/req/x"] == 0
        assert sample(gw, "edge_auth_verifications_total", {"result": "missing"}) == 1
        # Basic credentials are not a bearer token.
        r = await c.get(f"{gw.url}/req/x", headers={"Authorization": "Basic dXNlcjpwYXNz"})
        assert r.status_code == 401


async def test_optional_route_passes_anonymous_and_identified(
    issuer: FakeIssuer, fake_app: FakeApp
) -> None:
    clock = FakeClock()
    token = issuer.sign(issuer.claims(now=clock.now), kid="es-1")
    cfg = gateway_config(fake_app, issuer)
    async with run_gateway(cfg, clock=clock) as gw, httpx.AsyncClient() as c:
        r = await c.get(f"{gw.url}/opt/page")
        assert r.status_code == 200
        assert seen_one(fake_app, "x-edge-user-id") is None
        r = await c.get(f"{gw.url}/opt/page", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200
        assert seen_one(fake_app, "x-edge-user-id") == USER
        # A page with an expired session cookie must still load.
        clock.advance(3600 + 31)
        r = await c.get(
            f"{gw.url}/opt/page", headers={"Cookie": f"{COOKIE}={base64_cookie(token)}"}
        )
        assert r.status_code == 200
        assert seen_one(fake_app, "x-edge-user-id") is None
        r = await c.get(f"{gw.url}/req/x", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 401
        assert r.json()["message"] == "the access token has expired"


async def test_off_route_ignores_tokens(issuer: FakeIssuer, fake_app: FakeApp) -> None:
    clock = FakeClock()
    token = issuer.sign(issuer.claims(now=clock.now), kid="es-1")
    cfg = gateway_config(fake_app, issuer)
    async with run_gateway(cfg, clock=clock) as gw, httpx.AsyncClient() as c:
        r = await c.get(f"{gw.url}/off/x", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200
        assert seen_one(fake_app, "x-edge-user-id") is None
        assert seen_one(fake_app, "authorization") == f"Bearer {token}"
        assert sample(gw, "edge_auth_verifications_total", {"result": "ok"}) == 0


async def test_spoofed_identity_headers_never_reach_the_app(
    issuer: FakeIssuer, fake_app: FakeApp
) -> None:
    clock = FakeClock()
    token = issuer.sign(issuer.claims(now=clock.now), kid="es-1")
    spoof = {
        "X-Edge-User-Id": "00000000-0000-0000-0000-000000000000",
        "X-Edge-User-Role": "service_role",
        "X-Edge-Session-Id": "forged",
        "X-Edge-Identity-Signature": "t=1,v1=00",
    }
    cfg = gateway_config(fake_app, issuer, identity_hmac_secret="app-shared-secret")
    async with run_gateway(cfg, clock=clock) as gw, httpx.AsyncClient() as c:
        for path in ("/opt/a", "/off/a"):
            r = await c.get(f"{gw.url}{path}", headers=spoof)
            assert r.status_code == 200
            assert seen_one(fake_app, "x-edge-user-id") is None
            assert seen_one(fake_app, "x-edge-user-role") is None
            assert seen_one(fake_app, "x-edge-session-id") is None
            assert seen_one(fake_app, "x-edge-identity-signature") != "t=1,v1=00"
        r = await c.get(f"{gw.url}/req/a", headers={**spoof, "Authorization": f"Bearer {token}"})
        assert r.status_code == 200
        assert seen_one(fake_app, "x-edge-user-id") == USER
        assert seen_one(fake_app, "x-edge-user-role") == "authenticated"
        assert seen_one(fake_app, "x-edge-session-id") == "5e55a1d0-0000-4000-8000-00000000abcd"


# --------------------------------------------------------------------------- token sources


@pytest.mark.parametrize("form", ["base64", "raw-json", "raw-json-unencoded", "legacy-array"])
async def test_session_cookie_forms(issuer: FakeIssuer, fake_app: FakeApp, form: str) -> None:
    clock = FakeClock()
    token = issuer.sign(issuer.claims(now=clock.now), kid="es-1")
    if form == "base64":
        value = base64_cookie(token)
    elif form == "raw-json":
        value = quote(session_json(token), safe="")
    elif form == "raw-json-unencoded":
        value = json.dumps({"access_token": token, "refresh_token": "r"}, separators=(",", ":"))
    else:
        value = quote(json.dumps([token, "refresh", None, None, None]), safe="")
    cfg = gateway_config(fake_app, issuer)
    async with run_gateway(cfg, clock=clock) as gw, httpx.AsyncClient() as c:
        cookie = f"theme=dark; {COOKIE}={value}; {COOKIE}-code-verifier=abc"
        r = await c.get(f"{gw.url}/req/x", headers={"Cookie": cookie})
        assert r.status_code == 200, r.text
        assert seen_one(fake_app, "x-edge-user-id") == USER
        # The cookie goes upstream untouched; the app's own Supabase client reads it.
        assert COOKIE in (seen_one(fake_app, "cookie") or "")


async def test_chunked_session_cookie_is_reassembled(issuer: FakeIssuer, fake_app: FakeApp) -> None:
    clock = FakeClock()
    token = issuer.sign(issuer.claims(now=clock.now), kid="es-1")
    # Large user_metadata makes @supabase/ssr split the cookie (3180-byte chunks).
    value = base64_cookie(token, user_metadata={"bio": "x" * 5000})
    chunks = [value[i : i + 3180] for i in range(0, len(value), 3180)]
    assert len(chunks) == 3
    cookie = "; ".join(f"{COOKIE}.{i}={chunk}" for i, chunk in enumerate(chunks))
    cfg = gateway_config(fake_app, issuer)
    async with run_gateway(cfg, clock=clock) as gw, httpx.AsyncClient() as c:
        r = await c.get(f"{gw.url}/req/x", headers={"Cookie": cookie})
        assert r.status_code == 200, r.text
        assert seen_one(fake_app, "x-edge-user-id") == USER
        # A missing middle chunk is a broken session, not someone else's.
        broken = f"{COOKIE}.0={chunks[0]}; {COOKIE}.2={chunks[2]}"
        r = await c.get(f"{gw.url}/req/x", headers={"Cookie": broken})
        assert r.status_code == 401


async def test_cookie_name_setting_restricts_the_cookie(
    issuer: FakeIssuer, fake_app: FakeApp
) -> None:
    clock = FakeClock()
    token = issuer.sign(issuer.claims(now=clock.now), kid="es-1")
    cfg = gateway_config(fake_app, issuer, cookie_name="sb-otherproject-auth-token")
    async with run_gateway(cfg, clock=clock) as gw, httpx.AsyncClient() as c:
        r = await c.get(f"{gw.url}/req/x", headers={"Cookie": f"{COOKIE}={base64_cookie(token)}"})
        assert r.status_code == 401
        r = await c.get(
            f"{gw.url}/req/x",
            headers={"Cookie": f"sb-otherproject-auth-token={base64_cookie(token)}"},
        )
        assert r.status_code == 200


async def test_anon_key_bearer_falls_back_to_session_cookie(
    issuer: FakeIssuer, fake_app: FakeApp
) -> None:
    """supabase-js sends the project's anon key as Bearer when it has no session in
    memory; the user's session is in the cookie."""
    clock = FakeClock()
    anon_key = issuer.sign(
        {"iss": "supabase", "ref": REF, "role": "anon", "iat": 1, "exp": int(clock.now) + 10**8}
    )
    token = issuer.sign(issuer.claims(now=clock.now), kid="es-1")
    cfg = gateway_config(fake_app, issuer)
    async with run_gateway(cfg, clock=clock) as gw, httpx.AsyncClient() as c:
        r = await c.get(
            f"{gw.url}/req/x",
            headers={
                "Authorization": f"Bearer {anon_key}",
                "Cookie": f"{COOKIE}={base64_cookie(token)}",
            },
        )
        assert r.status_code == 200
        assert seen_one(fake_app, "x-edge-user-id") == USER
        r = await c.get(f"{gw.url}/req/x", headers={"Authorization": f"Bearer {anon_key}"})
        assert r.status_code == 401


async def test_token_cache_hit_skips_verification(issuer: FakeIssuer, fake_app: FakeApp) -> None:
    clock = FakeClock()
    token = issuer.sign(issuer.claims(now=clock.now), kid="es-1")
    cfg = gateway_config(fake_app, issuer)
    async with run_gateway(cfg, clock=clock) as gw, httpx.AsyncClient() as c:
        for _ in range(5):
            r = await c.get(f"{gw.url}/req/x", headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == 200
        assert sample(gw, "edge_auth_token_cache_total", {"outcome": "miss"}) == 1
        assert sample(gw, "edge_auth_token_cache_total", {"outcome": "hit"}) == 4
        # Cached only until exp (+ leeway).
        clock.advance(3600 + 31)
        r = await c.get(f"{gw.url}/req/x", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 401


async def test_token_cache_is_bounded(issuer: FakeIssuer, fake_app: FakeApp) -> None:
    clock = FakeClock()
    cfg = gateway_config(fake_app, issuer, token_cache_size=3)
    async with run_gateway(cfg, clock=clock) as gw, httpx.AsyncClient() as c:
        for i in range(10):
            token = issuer.sign(issuer.claims(now=clock.now, sub=f"u{i}"), kid="es-1")
            r = await c.get(f"{gw.url}/req/x", headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == 200
        assert gw.app.rt.services[VERIFIER].status()["token_cache"] == 3


# --------------------------------------------------------------------------- signature


def check_signature(headers: list[tuple[str, str]], secret: str, now: float) -> bool:
    """What the app does (docs/auth.md shows the same in TypeScript)."""
    h = dict(headers)
    sig = h.get("x-edge-identity-signature", "")
    parts = dict(p.split("=", 1) for p in sig.split(",") if "=" in p)
    t = parts.get("t", "")
    if not t.isdigit() or abs(now - int(t)) > 60:
        return False
    msg = "\n".join(
        [
            t,
            h.get("x-edge-user-id", ""),
            h.get("x-edge-user-role", ""),
            h.get("x-edge-session-id", ""),
        ]
    )
    want = hmac.new(secret.encode(), msg.encode(), hashlib.sha256).hexdigest()
    return hmac.compare_digest(want, parts.get("v1", ""))


async def test_identity_signature(issuer: FakeIssuer, fake_app: FakeApp) -> None:
    clock = FakeClock()
    token = issuer.sign(issuer.claims(now=clock.now), kid="es-1")
    cfg = gateway_config(fake_app, issuer, identity_hmac_secret="app-shared-secret")
    async with run_gateway(cfg, clock=clock) as gw, httpx.AsyncClient() as c:
        r = await c.get(f"{gw.url}/req/x", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200
        headers = seen(fake_app)
        assert check_signature(headers, "app-shared-secret", clock.now)
        assert not check_signature(headers, "wrong-secret", clock.now)
        assert not check_signature(headers, "app-shared-secret", clock.now + 120)
        # Changing any identity value breaks the signature.
        forged = [(k, "someone-else" if k == "x-edge-user-id" else v) for k, v in headers]
        assert not check_signature(forged, "app-shared-secret", clock.now)
        # Anonymous requests are signed too, so "no user" is also vouched for.
        r = await c.get(f"{gw.url}/opt/x")
        assert r.status_code == 200
        assert check_signature(seen(fake_app), "app-shared-secret", clock.now)
        forged = [*seen(fake_app), ("x-edge-user-id", USER)]
        assert not check_signature(forged, "app-shared-secret", clock.now)


async def test_no_signature_without_secret(issuer: FakeIssuer, fake_app: FakeApp) -> None:
    async with run_gateway(gateway_config(fake_app, issuer)) as gw, httpx.AsyncClient() as c:
        await c.get(f"{gw.url}/opt/x")
        assert seen_one(fake_app, "x-edge-identity-signature") is None


# --------------------------------------------------------------------------- revalidate


async def test_revalidate_asks_gotrue_once_per_interval(
    issuer: FakeIssuer, fake_app: FakeApp
) -> None:
    clock = FakeClock()
    token = issuer.sign(issuer.claims(now=clock.now), kid="es-1")
    auth = {"Authorization": f"Bearer {token}"}
    cfg = gateway_config(fake_app, issuer)
    async with run_gateway(cfg, clock=clock) as gw, httpx.AsyncClient() as c:
        rs = await asyncio.gather(
            *(c.get(f"{gw.url}/sensitive/x", headers=auth) for _ in range(20))
        )
        assert {r.status_code for r in rs} == {200}
        assert issuer.user_calls == 1  # concurrent requests share one call
        # Routes without revalidate never ask.
        assert (await c.get(f"{gw.url}/req/x", headers=auth)).status_code == 200
        assert issuer.user_calls == 1
        # The user logs out: still accepted until the interval passes...
        issuer.revoke(token)
        clock.advance(59)
        assert (await c.get(f"{gw.url}/sensitive/x", headers=auth)).status_code == 200
        assert issuer.user_calls == 1
        # ...then refused, and the refusal is cached too.
        clock.advance(2)
        r = await c.get(f"{gw.url}/sensitive/x", headers=auth)
        assert r.status_code == 401
        assert r.json()["message"] == "the session has ended"
        assert (await c.get(f"{gw.url}/sensitive/x", headers=auth)).status_code == 401
        assert issuer.user_calls == 2
        assert sample(gw, "edge_auth_revalidations_total", {"outcome": "ok"}) == 1
        assert sample(gw, "edge_auth_revalidations_total", {"outcome": "revoked"}) == 1


async def test_revalidate_fails_open_when_gotrue_errors(
    issuer: FakeIssuer, fake_app: FakeApp
) -> None:
    clock = FakeClock()
    token = issuer.sign(issuer.claims(now=clock.now), kid="es-1")
    issuer.user_status = 503
    cfg = gateway_config(fake_app, issuer)
    async with run_gateway(cfg, clock=clock) as gw, httpx.AsyncClient() as c:
        auth = {"Authorization": f"Bearer {token}"}
        assert (await c.get(f"{gw.url}/sensitive/x", headers=auth)).status_code == 200
        assert (await c.get(f"{gw.url}/sensitive/x", headers=auth)).status_code == 200
        assert issuer.user_calls == 1
        assert sample(gw, "edge_auth_revalidations_total", {"outcome": "error"}) == 1


# --------------------------------------------------------------------------- websocket


async def test_websocket_upgrade_is_verified(issuer: FakeIssuer, fake_app: FakeApp) -> None:
    clock = FakeClock()
    token = issuer.sign(issuer.claims(now=clock.now), kid="es-1")
    cfg = gateway_config(fake_app, issuer)
    url = "/realtime/v1/websocket?apikey=k&vsn=1.0.0"
    async with run_gateway(cfg, clock=clock) as gw, aiohttp.ClientSession() as s:
        ws_base = gw.url.replace("http://", "ws://")
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await s.ws_connect(ws_base + url)
        assert info.value.status in (401, 403)
        async with s.ws_connect(ws_base + url, headers={"Authorization": f"Bearer {token}"}) as ws:
            await ws.send_str("hi")
            assert (await ws.receive(timeout=5)).data == "echo:hi"


# --------------------------------------------------------------------------- require_identity


async def test_require_identity_for_edge_endpoints(issuer: FakeIssuer, fake_app: FakeApp) -> None:
    clock = FakeClock()
    token = issuer.sign(issuer.claims(now=clock.now), kid="es-1")
    rt = Runtime(gateway_config(fake_app, issuer), clock=clock)
    verifier = get_verifier(rt)
    assert get_verifier(rt) is verifier
    await verifier.start()
    try:
        scope = {"type": "http", "headers": [(b"authorization", f"Bearer {token}".encode())]}
        send, resp = capture_send()
        identity = await require_identity(rt, scope, send)
        assert identity is not None
        assert identity.sub == USER
        assert identity.role == "authenticated"
        # No policy of this config reads a claim: none is kept (memory, issue 15).
        assert identity.claims == {}
        assert resp.status == 0  # nothing sent
        send, resp = capture_send()
        assert await require_identity(rt, {"type": "http", "headers": []}, send) is None
        assert resp.status == 401
        assert json.loads(resp.body)["error"] == "invalid_token"
        assert resp.header(b"www-authenticate") is not None
    finally:
        await verifier.close()


async def test_cached_token_keeps_only_what_policies_read(
    issuer: FakeIssuer, fake_app: FakeApp
) -> None:
    """A cache entry is one small bytes object: the identity, exp, kid, and only the
    claims a policy reads (here cache `vary_claims: [app_metadata.provider]` and
    `authorize.claim: aal`); a hit gives the same identity as the verification did."""
    clock = FakeClock()
    routes = [
        {
            "name": "stats",
            "match": {"path": "/stats"},
            "upstream": "app",
            "auth": "required",
            "cache": {
                "ttl": "10s",
                "vary_claims": ["app_metadata.provider"],
                "authorize": {"claim": "aal", "in": ["aal1"]},
            },
        },
        *auth_routes(),
    ]
    cfg = make_config(fake_app.url, auth=auth_settings(issuer), routes=routes)
    rt = Runtime(cfg, clock=clock)
    verifier = get_verifier(rt)
    await verifier.start()
    try:
        token = issuer.sign(issuer.claims(now=clock.now, email="x" * 200), kid="es-1")
        first = await verifier.verify(token)
        again = await verifier.verify(token)
        assert sample_cache(verifier) == 1
        assert first.identity is not None and again.identity is not None
        assert again.identity == first.identity
        assert again.identity.claims == {"aal": "aal1", "app_metadata": {"provider": "email"}}
        assert (again.headers, again.kid, again.exp) == (first.headers, first.kid, first.exp)
        (raw,) = verifier.cache.data.values()
        assert isinstance(raw, bytes)
        assert len(raw) < 200  # the 200-character email is not in it
    finally:
        await verifier.close()


def sample_cache(verifier: Any) -> int:
    return len(verifier.cache)
