"""Locust version of the S1-S3 client behaviours, to run the scenarios against a real
EventLive staging (through the gateway or not). Needs only locust (`pip install locust`);
the gateway's own repo is not imported.

User classes (pick them on the command line):
- `ViewerUser`: on entry `access/track` and `presence/ping` together, then ping every
  2 min and track every 5 min (S1; S3 with two webinar ids). A share `EL_GUEST_SHARE`
  (default 0.2) are guests: track only, with an `el_guest` cookie.
- `ChatFallbackUser`: a viewer whose Realtime is down: also polls `chat/messages` every
  2 s, doubling the delay after a failed poll up to 60 s (the old backoff) (S2).
- `AdminUser`: an admin dashboard polling `stats/access` every 5 s (S3).

Environment:
- `EL_WEBINAR_IDS`: comma-separated webinar ids (users are spread round-robin);
- tokens: `EL_TOKENS_FILE` (one access token per line, used round-robin; admins take
  `EL_ADMIN_TOKENS_FILE`), or `SUPABASE_JWT_SECRET` (+ `EL_JWT_ISSUER`, default
  `<host>/auth/v1`) to mint HS256 tokens for random user ids;
- `EL_TIME_SCALE` (default 1): divide every interval (as `python -m bench --time-scale`);
- `EL_SHAPE=s3`: adds the S3 load shape (N viewers, then a surge of N/2 joining within
  30 s at 40 % of the run; `EL_SHAPE_USERS`, `EL_SHAPE_MINUTES`).

Examples (see docs/scenarios.md):
  S1: locust -f bench/locustfile.py --host https://staging.example -u 1000 -r 8.4 -t 62m ViewerUser
  S2: locust -f bench/locustfile.py --host ... -u 1000 -r 50 -t 20m ChatFallbackUser
  S3: EL_SHAPE=s3 EL_WEBINAR_IDS=a,b locust -f bench/locustfile.py --host ... ViewerUser AdminUser
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import json
import os
import random
import time
import uuid
from pathlib import Path

from locust import HttpUser, LoadTestShape, constant, task

SCALE = float(os.environ.get("EL_TIME_SCALE", "1"))
PING_S, TRACK_S, CHAT_S, CHAT_MAX_S, ADMIN_S = (x / SCALE for x in (120, 300, 2, 60, 5))
WEBINARS = [w for w in os.environ.get("EL_WEBINAR_IDS", "webinar-a").split(",") if w]
GUEST_SHARE = float(os.environ.get("EL_GUEST_SHARE", "0.2"))
SHAPE_USERS = int(os.environ.get("EL_SHAPE_USERS", "1000"))
_webinar_rr = itertools.cycle(WEBINARS)
_viewers_spawned = itertools.count()


def _viewer_webinar() -> str:
    """Round-robin; under the S3 shape, the surge (viewers beyond EL_SHAPE_USERS) all join
    the last webinar (counted per locust process)."""
    i = next(_viewers_spawned)
    if os.environ.get("EL_SHAPE") == "s3" and i >= SHAPE_USERS:
        return WEBINARS[-1]
    return WEBINARS[i % len(WEBINARS)]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _mint(secret: str, issuer: str, sub: str) -> str:
    now = int(time.time())
    claims = {
        "iss": issuer,
        "aud": "authenticated",
        "sub": sub,
        "role": "authenticated",
        "iat": now,
        "exp": now + 6 * 3600,
    }
    head = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = _b64(json.dumps(claims, separators=(",", ":")).encode())
    sig = hmac.new(secret.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{_b64(sig)}"


def _tokens(env_file: str) -> itertools.cycle[str] | None:
    path = os.environ.get(env_file)
    if not path:
        return None
    lines = [t.strip() for t in Path(path).read_text().splitlines() if t.strip()]
    return itertools.cycle(lines) if lines else None


_viewer_tokens = _tokens("EL_TOKENS_FILE")
_admin_tokens = _tokens("EL_ADMIN_TOKENS_FILE") or _viewer_tokens


def _token(host: str, pool: itertools.cycle[str] | None) -> str:
    if pool is not None:
        return next(pool)
    secret = os.environ.get("SUPABASE_JWT_SECRET")
    if not secret:
        raise RuntimeError("set EL_TOKENS_FILE or SUPABASE_JWT_SECRET")
    issuer = os.environ.get("EL_JWT_ISSUER", host.rstrip("/") + "/auth/v1")
    return _mint(secret, issuer, str(uuid.uuid4()))


class ViewerUser(HttpUser):
    """S1/S3 viewer: track + ping on entry, then ping every 2 min, track every 5 min."""

    wait_time = constant(min(1.0, CHAT_S / 4))
    guest_share = GUEST_SHARE

    def on_start(self) -> None:
        self.webinar = _viewer_webinar()
        self.guest = random.random() < self.guest_share
        self.headers: dict[str, str] = {}
        if self.guest:
            self.headers["Cookie"] = f"el_guest={uuid.uuid4()}"
        else:
            self.headers["Authorization"] = f"Bearer {_token(self.host or '', _viewer_tokens)}"
        now = time.monotonic()
        self.track()
        if not self.guest:
            self.ping()
        self.next_ping = now + PING_S
        self.next_track = now + TRACK_S

    def _api(self, rest: str) -> str:
        return f"/api/webinars/{self.webinar}/{rest}"

    def ping(self) -> None:
        self.client.post(self._api("presence/ping"), headers=self.headers, name="presence_ping")

    def track(self) -> None:
        self.client.post(
            self._api("access/track"),
            json={"event": "view"},
            headers=self.headers,
            name="access_track",
        )

    @task
    def tick(self) -> None:
        now = time.monotonic()
        if not self.guest and now >= self.next_ping:
            self.ping()
            self.next_ping += PING_S
        if now >= self.next_track:
            self.track()
            self.next_track += TRACK_S


class ChatFallbackUser(ViewerUser):
    """S2 viewer whose Realtime is down: also polls the chat every 2 s, old backoff."""

    guest_share = 0.0  # the chat needs a signed-in viewer

    def on_start(self) -> None:
        super().on_start()
        self.chat_delay = CHAT_S
        self.next_chat = time.monotonic()

    @task
    def tick(self) -> None:
        super().tick()
        now = time.monotonic()
        if now < self.next_chat:
            return
        with self.client.get(
            self._api("chat/messages"), headers=self.headers, name="chat_poll", catch_response=True
        ) as resp:
            ok = 200 <= resp.status_code < 300
            if not ok:
                resp.failure(f"status {resp.status_code}")
        self.chat_delay = CHAT_S if ok else min(self.chat_delay * 2, CHAT_MAX_S)
        self.next_chat = time.monotonic() + self.chat_delay


class AdminUser(HttpUser):
    """S3 admin dashboard: stats/access every 5 s, forever."""

    wait_time = constant(ADMIN_S)
    fixed_count = 5  # five dashboards, whatever the user count

    def on_start(self) -> None:
        self.webinar = next(_webinar_rr)
        self.headers = {"Authorization": f"Bearer {_token(self.host or '', _admin_tokens)}"}

    @task
    def stats(self) -> None:
        self.client.get(
            f"/api/webinars/{self.webinar}/stats/access", headers=self.headers, name="admin_stats"
        )


if os.environ.get("EL_SHAPE") == "s3":

    class S3Shape(LoadTestShape):
        """N viewers within 2 min, a surge of N/2 within 30 s at 40 % of the run."""

        users = SHAPE_USERS
        minutes = float(os.environ.get("EL_SHAPE_MINUTES", "30"))

        def tick(self) -> tuple[int, float] | None:
            t = self.get_run_time() * SCALE / 60  # scenario minutes
            if t >= self.minutes:
                return None
            base = self.users + 5  # + the admins (fixed_count)
            if t < self.minutes * 0.4:
                return base, base / (120 / SCALE)
            surge = self.users // 2
            return base + surge, surge / (30 / SCALE)
