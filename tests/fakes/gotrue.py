"""A fake GoTrue (Supabase Auth) token endpoint on a real socket (aiohttp.web), faithful to
the refresh semantics of supabase/auth `internal/tokens/service.go` for legacy refresh
tokens, which is what makes racing refreshes log people out:

- `POST /auth/v1/token?grant_type=refresh_token` rotates: the presented token is revoked
  and a child is issued;
- a revoked token that is the parent of the session's active token gets the active token
  back (no time limit) — GoTrue's "client did not save the answer" allowance;
- any other revoked token is accepted within `reuse_interval` seconds of its revocation
  (a new child is issued); after that the whole family is revoked and the answer is
  `400 {"code":"refresh_token_already_used","message":"Invalid Refresh Token: Already Used"}`;
- a token of a revoked family: 400 `refresh_token_already_used`; unknown token: 400
  `refresh_token_not_found`; no token: 400 `{"error":"invalid_request",...}`.

Also: `grant_type=password` (any password signs in `email`), `GET /auth/v1/user`,
`POST /auth/v1/logout`, HS256 access tokens, configurable latency, injected errors
(`inject`), and counters (`calls`, `outcomes`) for tests and the bench.

Run standalone: `python -m tests.fakes.gotrue --port 9999 [--reuse-interval 0] [--latency 0.05]`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import hmac
import json
import secrets
import socket
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

Clock = Callable[[], float]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def sign_hs256(claims: dict[str, Any], secret: str) -> str:
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = _b64(json.dumps(claims, separators=(",", ":")).encode())
    signing_input = f"{header}.{payload}".encode()
    sig = hmac.new(secret.encode(), signing_input, hashlib.sha256).digest()
    return f"{header}.{payload}.{_b64(sig)}"


def verify_hs256(token: str, secret: str) -> dict[str, Any] | None:
    try:
        header, payload, sig = token.split(".")
        expected = hmac.new(secret.encode(), f"{header}.{payload}".encode(), hashlib.sha256)
        if not hmac.compare_digest(_b64(expected.digest()), sig):
            return None
        claims: dict[str, Any] = json.loads(base64.urlsafe_b64decode(payload + "=="))
        return claims
    except ValueError:
        return None


@dataclass
class TokenRow:
    token: str
    session_id: str
    parent: str | None
    revoked: bool = False
    updated_at: float = 0.0


@dataclass
class Session:
    id: str
    user: dict[str, Any]
    active: str
    revoked: bool = False
    refreshes: int = 0


@dataclass
class FakeGoTrue:
    reuse_interval: float = 0.0
    latency: float = 0.0
    expires_in: int = 3600
    jwt_secret: str = "fake-gotrue-jwt-secret-at-least-32-bytes"
    clock: Clock = time.time
    # Refresh call number (1-based) -> (status, json body) answered instead.
    inject: dict[int, tuple[int, dict[str, Any]]] = field(default_factory=dict)
    # Refresh call number -> event the call waits for before it is answered (to hold a
    # call in flight in a test; the answer is decided after the wait).
    holds: dict[int, asyncio.Event] = field(default_factory=dict)
    calls: int = 0
    # Headers and raw body of each refresh call, as received.
    seen_headers: list[dict[str, str]] = field(default_factory=list)
    seen_bodies: list[bytes] = field(default_factory=list)
    # Like Supabase's Kong in front of GoTrue: refresh calls without this `apikey` are
    # answered 401 before GoTrue sees them (None: no check).
    require_apikey: str | None = None
    outcomes: Counter[str] = field(default_factory=Counter)
    tokens: dict[str, TokenRow] = field(default_factory=dict)
    sessions: dict[str, Session] = field(default_factory=dict)
    url: str = ""
    port: int = 0
    _runner: web.AppRunner | None = None

    # ------------------------------------------------------------------ state

    def _new_token(self, session_id: str, parent: str | None) -> str:
        # Legacy GoTrue tokens are 12 characters of [a-z0-9]; these are longer so that a
        # plaintext search of a store dump cannot hit one by accident.
        token = secrets.token_hex(16)
        self.tokens[token] = TokenRow(token, session_id, parent, updated_at=self.clock())
        return token

    def sign_in(self, email: str = "viewer@example.com") -> dict[str, Any]:
        """Create a session (what a password login does) and return its token answer."""
        user_id = str(uuid.uuid5(uuid.NAMESPACE_URL, email))
        user = {
            "id": user_id,
            "aud": "authenticated",
            "role": "authenticated",
            "email": email,
            "app_metadata": {"provider": "email"},
            "user_metadata": {},
            "created_at": "2026-01-01T00:00:00Z",
        }
        sid = str(uuid.uuid4())
        token = self._new_token(sid, None)
        self.sessions[sid] = Session(sid, user, token)
        return self._answer(self.sessions[sid], token)

    def _answer(self, session: Session, refresh_token: str) -> dict[str, Any]:
        now = int(self.clock())
        user = session.user
        claims = {
            "aud": "authenticated",
            "exp": now + self.expires_in,
            "iat": now,
            "sub": user["id"],
            "email": user["email"],
            "phone": "",
            "app_metadata": user["app_metadata"],
            "user_metadata": user["user_metadata"],
            "role": "authenticated",
            "aal": "aal1",
            "session_id": session.id,
            "is_anonymous": False,
            # Makes every access token distinct even within one second.
            "ref": secrets.token_hex(4),
        }
        return {
            "access_token": sign_hs256(claims, self.jwt_secret),
            "token_type": "bearer",
            "expires_in": self.expires_in,
            "expires_at": now + self.expires_in,
            "refresh_token": refresh_token,
            "user": user,
        }

    def refresh(self, token: str) -> tuple[int, dict[str, Any]]:
        """GoTrue's RefreshTokenGrant for legacy tokens, atomically (as under its row lock)."""
        row = self.tokens.get(token)
        if row is None:
            return 400, _err(
                "refresh_token_not_found", "Invalid Refresh Token: Refresh Token Not Found"
            )
        session = self.sessions[row.session_id]
        if session.revoked:
            return 400, _err("refresh_token_already_used", "Invalid Refresh Token: Already Used")
        now = self.clock()
        if row.revoked:
            active = self.tokens[session.active]
            if active.parent == token:
                # The client lost the answer to its last refresh: hand back the active one.
                self.outcomes["parent_of_active"] += 1
                return 200, self._answer(session, active.token)
            if now > row.updated_at + self.reuse_interval:
                session.revoked = True
                for t in self.tokens.values():
                    if t.session_id == session.id:
                        t.revoked = True
                self.outcomes["family_revoked"] += 1
                return 400, _err(
                    "refresh_token_already_used", "Invalid Refresh Token: Already Used"
                )
            self.outcomes["reuse_interval"] += 1
        else:
            self.outcomes["rotated"] += 1
        row.revoked = True
        row.updated_at = now
        child = self._new_token(session.id, token)
        session.active = child
        session.refreshes += 1
        return 200, self._answer(session, child)

    # ------------------------------------------------------------------ HTTP

    def app(self) -> web.Application:
        a = web.Application()
        a.router.add_post("/auth/v1/token", self.token)
        a.router.add_get("/auth/v1/user", self.user)
        a.router.add_post("/auth/v1/logout", self.logout)
        return a

    async def token(self, request: web.Request) -> web.Response:
        grant = request.query.get("grant_type")
        if self.require_apikey is not None and request.headers.get("apikey") != (
            self.require_apikey
        ):
            return _json(401, {"message": "No API key found in request"})
        raw = await request.read()
        try:
            body = go_json_object(raw)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return _json(400, _err("bad_json", "Could not parse request body as JSON"))
        if grant == "password":
            email = body.get("email")
            if not isinstance(email, str) or not email:
                return _json(400, _err("validation_failed", "email required"))
            return _json(200, self.sign_in(email))
        if grant != "refresh_token":
            return _json(400, _err("unsupported_grant_type", "unsupported_grant_type"))
        self.calls += 1
        n = self.calls
        self.seen_headers.append({k.lower(): v for k, v in request.headers.items()})
        self.seen_bodies.append(raw)
        if self.latency:
            await asyncio.sleep(self.latency)
        if n in self.holds:
            await self.holds[n].wait()
        if n in self.inject:
            status, payload = self.inject.pop(n)
            self.outcomes[f"injected_{status}"] += 1
            return _json(status, payload)
        token = body.get("refresh_token")
        if not isinstance(token, str) or not token:
            return _json(
                400, {"error": "invalid_request", "error_description": "refresh_token required"}
            )
        status, payload = self.refresh(token)
        if status != 200:
            self.outcomes[payload["code"]] += 1
        resp = _json(status, payload)
        if status == 200:
            resp.headers["sb-auth-user-id"] = payload["user"]["id"]
        return resp

    async def user(self, request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization", "")
        claims = verify_hs256(auth.removeprefix("Bearer "), self.jwt_secret)
        if claims is None or claims.get("exp", 0) < self.clock():
            return _json(403, _err("bad_jwt", "invalid JWT"))
        session = self.sessions.get(str(claims.get("session_id")))
        if session is None or session.revoked:
            return _json(403, _err("session_not_found", "Session from session_id claim not found"))
        return _json(200, session.user)

    async def logout(self, request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization", "")
        claims = verify_hs256(auth.removeprefix("Bearer "), self.jwt_secret)
        if claims is not None and (s := self.sessions.get(str(claims.get("session_id")))):
            s.revoked = True
        return web.Response(status=204)

    async def start(self, port: int = 0) -> str:
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        await web.SockSite(self._runner, sock).start()
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def stats(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "outcomes": dict(self.outcomes),
            "sessions_revoked": sum(1 for s in self.sessions.values() if s.revoked),
        }


def _go_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Go's encoding/json matches a struct field by case-folded name and keeps the last
    # match: model that for the one field GoTrue reads from a refresh body.
    out = dict(pairs)
    for k, v in pairs:
        if k.casefold() == "refresh_token":
            out["refresh_token"] = v
    return out


def go_json_object(raw: bytes) -> Any:
    """A JSON body as GoTrue (Go's decoder) reads it."""
    return json.loads(raw, object_pairs_hook=_go_members)


def _err(code: str, message: str) -> dict[str, Any]:
    return {"code": code, "message": message}


def _json(status: int, payload: dict[str, Any]) -> web.Response:
    resp = web.json_response(payload, status=status)
    # GoTrue names the error shape it used; supabase-js reads `code` only when it sees it.
    resp.headers["X-Supabase-Api-Version"] = "2024-01-01"
    if status >= 400 and "code" in payload:
        resp.headers["x-sb-error-code"] = str(payload["code"])
    return resp


async def _main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--port", type=int, default=9999)
    p.add_argument("--reuse-interval", type=float, default=0.0)
    p.add_argument("--latency", type=float, default=0.0)
    args = p.parse_args()
    fake = FakeGoTrue(reuse_interval=args.reuse_interval, latency=args.latency)
    print(await fake.start(args.port), flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await fake.stop()


if __name__ == "__main__":
    asyncio.run(_main())
