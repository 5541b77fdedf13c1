"""Attack suite for local JWT verification: every accepted and every refused case, through
the real gateway on a real socket, asserting what the client and the upstream see."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from joserfc.jwk import OctKey
from joserfc.jws import JWSRegistry

from gateway.policies.auth.policy import VERIFIER
from tests.fakes.app import FakeApp
from tests.fakes.clock import FakeClock
from tests.fakes.jwks import (
    FakeIssuer,
    auth_routes,
    auth_settings,
    b64,
    b64json,
    forge,
    generate,
    sign_with,
)
from tests.helpers import make_config, run_gateway


@pytest.fixture
async def issuer() -> AsyncIterator[FakeIssuer]:
    iss = FakeIssuer()
    await iss.start()
    iss.add_key("ES256", "es-1")
    iss.add_key("RS256", "rs-1")
    iss.add_key("EdDSA", "ed-1")
    yield iss
    await iss.stop()


def metric(gw: Any, result: str) -> float:
    v = gw.app.rt.metrics.registry.get_sample_value(
        "edge_auth_verifications_total", {"result": result}
    )
    return float(v or 0)


def upstream_headers(fake_app: FakeApp) -> dict[str, str]:
    return {k.lower(): v for k, v in fake_app.requests[-1]["headers"]}


# --------------------------------------------------------------------------- accepted


@pytest.mark.parametrize(
    "kid", [None, "es-1", "rs-1", "ed-1"], ids=["HS256", "ES256", "RS256", "EdDSA"]
)
async def test_accepted_algorithms_pass_identity_upstream(
    issuer: FakeIssuer, fake_app: FakeApp, kid: str | None
) -> None:
    clock = FakeClock()
    token = issuer.sign(issuer.claims(now=clock.now), kid=kid)
    cfg = make_config(fake_app.url, auth=auth_settings(issuer), routes=auth_routes())
    async with run_gateway(cfg, clock=clock) as gw, httpx.AsyncClient() as c:
        r = await c.get(f"{gw.url}/req/x", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200
        h = upstream_headers(fake_app)
        assert h["x-edge-user-id"] == "8d1c2f3e-0000-4000-8000-000000000001"
        assert h["x-edge-user-role"] == "authenticated"
        assert h["x-edge-session-id"] == "5e55a1d0-0000-4000-8000-00000000abcd"
        # The app can still call Supabase as the user.
        assert h["authorization"] == f"Bearer {token}"
        assert metric(gw, "ok") == 1


async def test_eddsa_key_accepts_ed25519_header_name(issuer: FakeIssuer, fake_app: FakeApp) -> None:
    """RFC 9864 renames EdDSA-with-Ed25519 to `Ed25519`; same key, same check."""
    clock = FakeClock()
    k = issuer.keys["ed-1"]
    token = sign_with(k.key, "Ed25519", issuer.claims(now=clock.now), {"kid": "ed-1"})
    cfg = make_config(fake_app.url, auth=auth_settings(issuer), routes=auth_routes())
    async with run_gateway(cfg, clock=clock) as gw, httpx.AsyncClient() as c:
        r = await c.get(f"{gw.url}/req/x", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200


@pytest.mark.parametrize(
    "over",
    [
        {"aud": ["other", "authenticated"]},
        {"exp_offset": -20},  # expired 20 s ago, within the 30 s leeway
        {"nbf_offset": 20},  # valid from 20 s in the future, within leeway
        {"nbf_offset": -60},
        {"iat_offset": 20},  # issued 20 s "in the future": clock skew within leeway
        {"iat_offset": None},  # no iat at all (GoTrue always sets one; others may not)
    ],
    ids=["aud-list", "exp-within-leeway", "nbf-within-leeway", "nbf-past", "iat-skew", "no-iat"],
)
async def test_accepted_claims(issuer: FakeIssuer, fake_app: FakeApp, over: dict[str, Any]) -> None:
    clock = FakeClock()
    claims = issuer.claims(now=clock.now)
    if "exp_offset" in over:
        claims["exp"] = int(clock.now) + over.pop("exp_offset")
    if "nbf_offset" in over:
        claims["nbf"] = int(clock.now) + over.pop("nbf_offset")
    if "iat_offset" in over:
        offset = over.pop("iat_offset")
        if offset is None:
            del claims["iat"]
        else:
            claims["iat"] = int(clock.now) + offset
    claims.update(over)
    token = issuer.sign(claims, kid="es-1")
    cfg = make_config(fake_app.url, auth=auth_settings(issuer), routes=auth_routes())
    async with run_gateway(cfg, clock=clock) as gw, httpx.AsyncClient() as c:
        r = await c.get(f"{gw.url}/req/x", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200, r.text


# --------------------------------------------------------------------------- refused

Maker = Callable[[FakeIssuer, float], str]


def _claims(issuer_: FakeIssuer, now: float, **over: Any) -> dict[str, Any]:
    return issuer_.claims(now=now, **over)


def _raw_hs256(secret: bytes, header: dict[str, Any], claims: dict[str, Any]) -> str:
    # joserfc itself refuses a PEM as an HMAC secret; an attacker's tool does not.
    signing_input = f"{b64json(header)}.{b64json(claims)}"
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


def _hs_with_public_key(iss: FakeIssuer, now: float) -> str:
    """The classic confusion: HS256 'signed' with the RSA public key as the secret,
    naming the RSA key's kid so a naive verifier picks that key."""
    pub = iss.keys["rs-1"].key.as_pem(private=False)
    return _raw_hs256(pub, {"alg": "HS256", "typ": "JWT", "kid": "rs-1"}, _claims(iss, now))


def _hs_with_public_key_no_kid(iss: FakeIssuer, now: float) -> str:
    pub = iss.keys["es-1"].key.as_pem(private=False)
    return _raw_hs256(pub, {"alg": "HS256", "typ": "JWT"}, _claims(iss, now))


def _with_header(extra: dict[str, Any]) -> Maker:
    def make(iss: FakeIssuer, now: float) -> str:
        # Validly signed by a trusted key: the header alone must get it refused.
        return iss.sign(_claims(iss, now), kid="es-1", header=extra)

    return make


def _embedded_jwk(iss: FakeIssuer, now: float) -> str:
    attacker = generate("ES256", "evil")
    return sign_with(attacker.key, "ES256", _claims(iss, now), {"jwk": attacker.public_jwk()})


def _tampered_payload(iss: FakeIssuer, now: float) -> str:
    token = iss.sign(_claims(iss, now), kid="es-1")
    h, _, s = token.split(".")
    evil = b64json(
        _claims(iss, now, sub="00000000-0000-0000-0000-000000000000", role="service_role")
    )
    return f"{h}.{evil}.{s}"


def _wrong_secret(iss: FakeIssuer, now: float) -> str:
    key = OctKey.import_key(b"not-the-secret-not-the-secret-not-the-secret")
    return sign_with(key, "HS256", _claims(iss, now))


def _unpublished_kid(iss: FakeIssuer, now: float) -> str:
    attacker = generate("ES256", "es-1-evil")
    return sign_with(attacker.key, "ES256", _claims(iss, now), {"kid": "es-1-evil"})


def _attacker_key_known_kid(iss: FakeIssuer, now: float) -> str:
    attacker = generate("ES256", "es-1")
    return sign_with(attacker.key, "ES256", _claims(iss, now), {"kid": "es-1"})


def _alg_mismatch(iss: FakeIssuer, now: float) -> str:
    """ES256 header pointing at the RS256 key."""
    attacker = generate("ES256", "x")
    return sign_with(attacker.key, "ES256", _claims(iss, now), {"kid": "rs-1"})


def _raw_signed(iss: FakeIssuer, header: bytes, payload: bytes) -> str:
    """Validly signed by es-1 over JSON text as written (dicts cannot repeat a key)."""
    k = iss.keys["es-1"]
    signing_input = f"{b64(header)}.{b64(payload)}".encode()
    sig = JWSRegistry.algorithms["ES256"].sign(signing_input, k.key)
    return f"{signing_input.decode()}.{b64(sig)}"


def _duplicate_claim(iss: FakeIssuer, now: float) -> str:
    """A parser keeping the first `sub` and one keeping the last would disagree on who
    this is."""
    body = json.dumps(_claims(iss, now))[:-1]
    payload = f'{body}, "sub": "00000000-0000-0000-0000-000000000000"}}'.encode()
    return _raw_signed(iss, b'{"alg":"ES256","typ":"JWT","kid":"es-1"}', payload)


def _duplicate_header_member(iss: FakeIssuer, now: float) -> str:
    header = b'{"alg":"ES256","typ":"JWT","kid":"es-1","kid":"rs-1"}'
    return _raw_signed(iss, header, json.dumps(_claims(iss, now)).encode())


def _rs384(iss: FakeIssuer, now: float) -> str:
    k = iss.keys["rs-1"]
    return sign_with(k.key, "RS384", _claims(iss, now), {"kid": "rs-1"})


REFUSED: list[tuple[str, Maker, str]] = [
    ("alg-none", lambda i, n: forge({"alg": "none", "typ": "JWT"}, _claims(i, n)), "bad_alg"),
    ("alg-None", lambda i, n: forge({"alg": "None"}, _claims(i, n)), "bad_alg"),
    (
        "alg-none-with-kid",
        lambda i, n: forge({"alg": "none", "kid": "es-1"}, _claims(i, n)),
        "bad_alg",
    ),
    ("hs256-with-rsa-public-key", _hs_with_public_key, "bad_alg"),
    ("hs256-with-ec-public-key-no-kid", _hs_with_public_key_no_kid, "bad_signature"),
    ("jku-header", _with_header({"jku": "https://evil.example/jwks.json"}), "bad_header"),
    ("x5u-header", _with_header({"x5u": "https://evil.example/cert.pem"}), "bad_header"),
    ("x5c-header", _with_header({"x5c": ["MIIB"]}), "bad_header"),
    ("embedded-jwk", _embedded_jwk, "bad_header"),
    ("crit-header", _with_header({"crit": ["exp"]}), "bad_header"),
    ("tampered-payload", _tampered_payload, "bad_signature"),
    ("wrong-hs256-secret", _wrong_secret, "bad_signature"),
    ("attacker-key-known-kid", _attacker_key_known_kid, "bad_signature"),
    ("unknown-kid", _unpublished_kid, "unknown_kid"),
    ("alg-mismatch-es-on-rsa-key", _alg_mismatch, "bad_alg"),
    ("rs384-not-accepted", _rs384, "bad_alg"),
    (
        "expired-beyond-leeway",
        lambda i, n: i.sign(_claims(i, n, exp=int(n) - 31), kid="es-1"),
        "expired",
    ),
    (
        "nbf-in-future",
        lambda i, n: i.sign(_claims(i, n, nbf=int(n) + 120), kid="es-1"),
        "not_yet_valid",
    ),
    (
        "iat-a-year-in-future",
        lambda i, n: i.sign(
            _claims(i, n, iat=int(n) + 365 * 86400, exp=int(n) + 366 * 86400), kid="es-1"
        ),
        "not_yet_valid",
    ),
    (
        "iat-beyond-leeway",
        lambda i, n: i.sign(_claims(i, n, iat=int(n) + 31), kid="es-1"),
        "not_yet_valid",
    ),
    ("string-iat", lambda i, n: i.sign(_claims(i, n, iat="now"), kid="es-1"), "bad_claims"),
    ("duplicate-claim", _duplicate_claim, "malformed"),
    ("duplicate-header-member", _duplicate_header_member, "malformed"),
    ("missing-exp", lambda i, n: i.sign(_claims(i, n, exp=None), kid="es-1"), "bad_claims"),
    ("string-exp", lambda i, n: i.sign(_claims(i, n, exp="never"), kid="es-1"), "bad_claims"),
    (
        "wrong-iss",
        lambda i, n: i.sign(_claims(i, n, iss="https://evil.supabase.co/auth/v1"), kid="es-1"),
        "bad_claims",
    ),
    ("wrong-aud", lambda i, n: i.sign(_claims(i, n, aud="anon"), kid="es-1"), "bad_claims"),
    (
        "aud-list-without-ours",
        lambda i, n: i.sign(_claims(i, n, aud=["a", "b"]), kid="es-1"),
        "bad_claims",
    ),
    ("missing-aud", lambda i, n: i.sign(_claims(i, n, aud=None), kid="es-1"), "bad_claims"),
    ("missing-sub", lambda i, n: i.sign(_claims(i, n, sub=None), kid="es-1"), "ok"),
    (
        "sub-with-newline",
        lambda i, n: i.sign(_claims(i, n, sub="u1\r\nX-Edge-User-Role: service_role"), kid="es-1"),
        "bad_claims",
    ),
    ("not-a-jwt", lambda i, n: "definitely-not-a-jwt", "malformed"),
    ("jwe-shaped", lambda i, n: "a.b.c.d.e", "malformed"),
    ("header-not-json", lambda i, n: f"{b64(b'{nope')}.{b64json({})}.AAAA", "malformed"),
    (
        "signature-not-base64",
        lambda i, n: i.sign(_claims(i, n), kid="es-1").rsplit(".", 1)[0] + ".!!!!",
        "malformed",
    ),
    ("oversized", lambda i, n: "a" * 20000 + ".b.c", "malformed"),
]


@pytest.mark.parametrize(
    ("make", "result"), [(m, r) for _, m, r in REFUSED], ids=[n for n, _, _ in REFUSED]
)
async def test_refused_on_required_route(
    issuer: FakeIssuer, fake_app: FakeApp, make: Maker, result: str
) -> None:
    clock = FakeClock()
    token = make(issuer, clock.now)
    cfg = make_config(fake_app.url, auth=auth_settings(issuer), routes=auth_routes())
    async with run_gateway(cfg, clock=clock) as gw, httpx.AsyncClient() as c:
        r = await c.get(f"{gw.url}/req/secret", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 401
        assert r.json()["error"] == "invalid_token"
        assert r.headers["www-authenticate"].startswith('Bearer error="invalid_token"')
        assert fake_app.hits["/req/secret"] == 0
        # `missing-sub` verifies (it is a valid token), it just names no user.
        assert metric(gw, result) >= 1
        if result != "ok":
            assert metric(gw, "ok") == 0
        # The token itself never shows up in the metrics.
        exposition = gw.app.rt.metrics.exposition().decode()
        assert token[:40] not in exposition


async def test_refused_token_on_optional_route_passes_as_anonymous(
    issuer: FakeIssuer, fake_app: FakeApp
) -> None:
    clock = FakeClock()
    expired = issuer.sign(issuer.claims(now=clock.now - 7200), kid="es-1")
    cfg = make_config(fake_app.url, auth=auth_settings(issuer), routes=auth_routes())
    async with run_gateway(cfg, clock=clock) as gw, httpx.AsyncClient() as c:
        r = await c.get(f"{gw.url}/opt/page", headers={"Authorization": f"Bearer {expired}"})
        assert r.status_code == 200
        h = upstream_headers(fake_app)
        assert "x-edge-user-id" not in h
        assert metric(gw, "expired") == 1


async def test_hs256_refused_when_only_jwks_configured(
    issuer: FakeIssuer, fake_app: FakeApp
) -> None:
    """With no shared secret configured, no HS256 token is accepted, whatever it claims."""
    clock = FakeClock()
    token = issuer.sign(issuer.claims(now=clock.now))
    cfg = make_config(
        fake_app.url, auth=auth_settings(issuer, hs256_secret=""), routes=auth_routes()
    )
    async with run_gateway(cfg, clock=clock) as gw, httpx.AsyncClient() as c:
        r = await c.get(f"{gw.url}/req/x", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 401
        assert metric(gw, "bad_alg") == 1


async def test_symmetric_key_in_jwks_is_never_used(issuer: FakeIssuer, fake_app: FakeApp) -> None:
    """A JWKS that (wrongly) publishes an `oct` key must not make HS256 tokens signed with
    it acceptable: anyone can read the JWKS."""
    clock = FakeClock()
    leaked = {"kty": "oct", "kid": "oct-1", "alg": "HS256", "k": b64(b"published-secret" * 3)}
    issuer.extra_jwks.append(leaked)
    token = sign_with(
        OctKey.import_key(b"published-secret" * 3),
        "HS256",
        issuer.claims(now=clock.now),
        {"kid": "oct-1"},
    )
    cfg = make_config(fake_app.url, auth=auth_settings(issuer), routes=auth_routes())
    async with run_gateway(cfg, clock=clock) as gw, httpx.AsyncClient() as c:
        r = await c.get(f"{gw.url}/req/x", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 401
        status = gw.app.rt.services[VERIFIER].status()
        assert "oct-1" not in status["jwks"]["kids"]


def test_forged_tokens_are_well_formed_base64() -> None:
    """Guard for the suite itself: the forged segments decode (so refusals come from the
    verifier's rules, not from broken test tokens)."""
    tok = forge({"alg": "none"}, {"sub": "x"})
    h = tok.split(".")[0]
    assert json.loads(base64.urlsafe_b64decode(h + "=" * (-len(h) % 4))) == {"alg": "none"}


# --------------------------------------------------------------------------- who decides

OTHER_USER = "00000000-0000-4000-8000-00000000beef"


def _cookie(token: str) -> str:
    session = json.dumps({"access_token": token, "refresh_token": "r", "expires_at": 2**31})
    return f"sb-abcdefghijklmnop-auth-token=base64-{b64(session.encode())}"


# (case, Authorization header lines, cookie holds a valid session, route, expected
#  status, the X-Edge-User-Id the app may see: None = none, "cookie" / "bearer" = whose)
Headers = Callable[[FakeIssuer, float], list[str]]
WHO_DECIDES: list[tuple[str, Headers, str, int, str | None]] = [
    ("invalid-bearer-beside-a-valid-cookie", lambda i, n: ["Bearer x.y.z"], "req", 401, None),
    (
        "expired-bearer-of-another-user-beside-a-valid-cookie",
        lambda i, n: [
            "Bearer " + i.sign(_claims(i, n - 7200, sub=OTHER_USER), kid="es-1"),
        ],
        "req",
        401,
        None,
    ),
    (
        "invalid-bearer-on-an-optional-route-is-anonymous",
        lambda i, n: ["Bearer x.y.z"],
        "opt",
        200,
        None,
    ),
    ("basic-credentials-beside-a-valid-cookie", lambda i, n: ["Basic dTpw"], "req", 401, None),
    ("empty-bearer-beside-a-valid-cookie", lambda i, n: ["Bearer"], "req", 401, None),
    (
        "two-authorization-headers",
        lambda i, n: [
            "Bearer " + i.sign(_claims(i, n, sub=OTHER_USER), kid="es-1"),
            "Bearer x.y.z",
        ],
        "req",
        401,
        None,
    ),
    (
        "unsigned-bearer-naming-no-user-beside-a-valid-cookie",
        lambda i, n: ["Bearer " + forge({"alg": "HS256"}, {"role": "anon", "exp": int(n) + 99})],
        "req",
        401,
        None,
    ),
    (
        # supabase-js's anon key: validly signed, names no user: the cookie decides.
        "anon-key-bearer-beside-a-valid-cookie",
        lambda i, n: [
            "Bearer "
            + i.sign({"iss": "supabase", "role": "anon", "iat": int(n), "exp": int(n) + 10**8})
        ],
        "req",
        200,
        "cookie",
    ),
    (
        "valid-bearer-of-another-user-beside-a-valid-cookie",
        lambda i, n: ["Bearer " + i.sign(_claims(i, n, sub=OTHER_USER), kid="es-1")],
        "req",
        200,
        "bearer",
    ),
]


@pytest.mark.parametrize(
    ("authorization", "route", "status", "who"),
    [case[1:] for case in WHO_DECIDES],
    ids=[case[0] for case in WHO_DECIDES],
)
async def test_an_authorization_header_decides_alone(
    issuer: FakeIssuer,
    fake_app: FakeApp,
    authorization: Headers,
    route: str,
    status: int,
    who: str | None,
) -> None:
    clock = FakeClock()
    cookie_user = issuer.sign(issuer.claims(now=clock.now), kid="es-1")
    headers = [("Authorization", v) for v in authorization(issuer, clock.now)]
    headers.append(("Cookie", _cookie(cookie_user)))
    cfg = make_config(fake_app.url, auth=auth_settings(issuer), routes=auth_routes())
    async with run_gateway(cfg, clock=clock) as gw, httpx.AsyncClient() as c:
        r = await c.get(f"{gw.url}/{route}/x", headers=headers)
        assert r.status_code == status, r.text
    if status == 401:
        assert r.json()["error"] == "invalid_token"
        assert fake_app.requests == []
        return
    seen = upstream_headers(fake_app).get("x-edge-user-id")
    expected = {None: None, "cookie": issuer.claims()["sub"], "bearer": OTHER_USER}[who]
    assert seen == expected
