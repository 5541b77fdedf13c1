"""A fake Supabase issuer (aiohttp.web on a real socket) for the auth tests and bench.

- `GET /auth/v1/.well-known/jwks.json`: the current public key set, with a configurable
  `Cache-Control`; counts fetches; can be made to fail (status, garbage, or a hang).
- `GET /auth/v1/user`: GoTrue's "who am I", answering 200 for tokens it considers live
  and 403 `session_not_found` for revoked ones; counts calls.
- Token minting: `sign(claims, kid=..., header=...)` signs with any key it holds
  (HS256 secret, ES256, RS256, EdDSA), and `forge(header, claims, signature)` builds any
  compact token for attack cases.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import socket
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from joserfc.jwk import ECKey, Key, OctKey, OKPKey, RSAKey
from joserfc.jws import JWSRegistry

ISSUER_PATH = "/auth/v1"
JWKS_PATH = "/auth/v1/.well-known/jwks.json"
USER_PATH = "/auth/v1/user"
SECRET = "super-secret-jwt-token-with-at-least-32-characters-long"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64json(obj: Any) -> str:
    return b64(json.dumps(obj, separators=(",", ":")).encode())


@dataclass
class SigningKey:
    kid: str
    alg: str
    key: Key

    def public_jwk(self) -> dict[str, Any]:
        d = dict(self.key.as_dict(private=False))
        d.update({"kid": self.kid, "alg": self.alg, "use": "sig", "key_ops": ["verify"]})
        return d


def generate(alg: str, kid: str) -> SigningKey:
    key: Key
    if alg == "ES256":
        key = ECKey.generate_key("P-256")
    elif alg == "RS256":
        key = RSAKey.generate_key(2048)
    elif alg == "EdDSA":
        key = OKPKey.generate_key("Ed25519")
    elif alg == "HS256":
        key = OctKey.import_key(SECRET.encode())
    else:
        raise ValueError(alg)
    return SigningKey(kid, alg, key)


def forge(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> str:
    return f"{b64json(header)}.{b64json(claims)}.{b64(signature)}"


def sign_with(
    key: Key, alg: str, claims: dict[str, Any], header: dict[str, Any] | None = None
) -> str:
    """Sign with the raw algorithm model, so tests can put anything in the header."""
    hdr = {"alg": alg, "typ": "JWT", **(header or {})}
    signing_input = f"{b64json(hdr)}.{b64json(claims)}".encode()
    model = JWSRegistry.algorithms["Ed25519" if alg == "EdDSA" else alg]
    return f"{signing_input.decode()}.{b64(model.sign(signing_input, key))}"


class FakeIssuer:
    def __init__(self, *, issuer_url: str = "", audience: str = "authenticated") -> None:
        self.keys: dict[str, SigningKey] = {}
        self.published: list[str] = []
        # Raw JWKS members published as-is (e.g. a wrongly published symmetric key).
        self.extra_jwks: list[dict[str, Any]] = []
        self.hs = generate("HS256", "legacy-hs")
        self.cache_control: str | None = "public, max-age=600"
        self.jwks_fetches = 0
        self.fail_status: int | None = None
        self.fail_garbage = False
        self.hang = False
        self.user_calls = 0
        self.user_status: int | None = None
        self.revoked: set[str] = set()  # sha256 hex of revoked tokens
        self.runner: web.AppRunner | None = None
        self.url = ""
        self.audience = audience
        self._issuer_url = issuer_url
        self._release = asyncio.Event()

    # ------------------------------------------------------------------ keys

    @property
    def issuer(self) -> str:
        return self._issuer_url or self.url + ISSUER_PATH

    @property
    def jwks_url(self) -> str:
        return self.url + JWKS_PATH

    @property
    def user_url(self) -> str:
        return self.url + USER_PATH

    def add_key(self, alg: str, kid: str, *, publish: bool = True) -> SigningKey:
        k = generate(alg, kid)
        self.keys[kid] = k
        if publish:
            self.published.append(kid)
        return k

    def unpublish(self, kid: str) -> None:
        self.published.remove(kid)

    def claims(self, **over: Any) -> dict[str, Any]:
        now = int(over.pop("now", time.time()))
        c: dict[str, Any] = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": "8d1c2f3e-0000-4000-8000-000000000001",
            "role": "authenticated",
            "session_id": "5e55a1d0-0000-4000-8000-00000000abcd",
            "aal": "aal1",
            "is_anonymous": False,
            "app_metadata": {"provider": "email"},
            "email": "viewer@example.com",
            "iat": now,
            "exp": now + 3600,
        }
        for k, v in over.items():
            if v is None:
                c.pop(k, None)
            else:
                c[k] = v
        return c

    def sign(
        self,
        claims: dict[str, Any] | None = None,
        *,
        kid: str | None = None,
        header: dict[str, Any] | None = None,
        include_kid: bool = True,
    ) -> str:
        """Sign with the key `kid` (default: the HS256 secret, no kid header)."""
        claims = claims if claims is not None else self.claims()
        if kid is None:
            return sign_with(self.hs.key, "HS256", claims, header)
        k = self.keys[kid]
        hdr = {"kid": kid} if include_kid else {}
        hdr.update(header or {})
        return sign_with(k.key, k.alg, claims, hdr)

    def revoke(self, token: str) -> None:
        self.revoked.add(hashlib.sha256(token.encode()).hexdigest())

    # ------------------------------------------------------------------ server

    def app(self) -> web.Application:
        a = web.Application()
        a.router.add_get(JWKS_PATH, self.jwks)
        a.router.add_get(USER_PATH, self.user)
        return a

    async def start(self) -> str:
        self.runner = web.AppRunner(self.app(), access_log=None)
        await self.runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        await web.SockSite(self.runner, sock).start()
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        return self.url

    async def stop(self) -> None:
        self._release.set()
        if self.runner:
            await self.runner.cleanup()

    async def jwks(self, request: web.Request) -> web.StreamResponse:
        self.jwks_fetches += 1
        if self.hang:
            await self._release.wait()
        if self.fail_status is not None:
            return web.json_response({"error": "down"}, status=self.fail_status)
        if self.fail_garbage:
            return web.Response(text="<html>oops</html>", content_type="text/html")
        body = {"keys": [self.keys[kid].public_jwk() for kid in self.published]}
        body["keys"].extend(self.extra_jwks)
        headers = {"Cache-Control": self.cache_control} if self.cache_control else {}
        return web.json_response(body, headers=headers)

    async def user(self, request: web.Request) -> web.Response:
        self.user_calls += 1
        if self.user_status is not None:
            return web.json_response({"code": "unexpected"}, status=self.user_status)
        auth = request.headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ").strip()
        if not token:
            return web.json_response({"code": "no_authorization"}, status=401)
        if hashlib.sha256(token.encode()).hexdigest() in self.revoked:
            return web.json_response(
                {"code": "session_not_found", "message": "Session from session_id claim"},
                status=403,
            )
        return web.json_response({"id": "user", "aud": self.audience})


def auth_routes() -> list[dict[str, Any]]:
    return [
        {"name": "req", "match": {"path": "/req/{p:path}"}, "upstream": "app", "auth": "required"},
        {"name": "opt", "match": {"path": "/opt/{p:path}"}, "upstream": "app", "auth": "optional"},
        {"name": "off", "match": {"path": "/off/{p:path}"}, "upstream": "app", "auth": "off"},
        {
            "name": "sensitive",
            "match": {"path": "/sensitive/{p:path}"},
            "upstream": "app",
            "auth": {"mode": "required", "revalidate": "60s"},
        },
        {"name": "default", "match": {"path": "/{path:path}"}, "upstream": "app", "auth": "off"},
    ]


def auth_settings(issuer: FakeIssuer, **over: Any) -> dict[str, Any]:
    s: dict[str, Any] = {
        "issuer": issuer.issuer,
        "audience": "authenticated",
        "hs256_secret": SECRET,
        "jwks_url": issuer.jwks_url,
        "user_url": issuer.user_url,
        "leeway": "30s",
        "jwks_min_refetch": "30s",
        "jwks_max_age": "600s",
        "jwks_timeout": "2s",
    }
    for k, v in over.items():
        if v is None:
            s.pop(k, None)
        else:
            s[k] = v
    return s
