"""Client behaviours of the load scenarios (asyncio + aiohttp), in the real client's rhythm
compressed by the time scale, and the recorder of what each client saw.

Owns:
- `Clock`: scenario time (seconds since start times the time scale) and sleeping until a
  scenario time;
- `Viewer` / `Admin`: who a simulated browser is (token, guest cookie, webinar, join time);
- the behaviours, as today's EventLive client does them:
  - viewer: on entry `access/track` and (signed in) `presence/ping` fired together, then
    ping every 2 min and track every 5 min (setInterval);
  - chat fallback (once Realtime is down): poll `chat/messages` every 2 s; after any
    failed poll the delay doubles up to 60 s, a success resets it (the old backoff: no
    stop on 4xx, no reaction to Retry-After);
  - chatters post a message every minute;
  - admin dashboard: `stats/access` every 5 s, forever;
- `Recorder`: one `Sample` (scenario time, route, webinar, status, latency) per request,
  and per signed-in viewer the wall time of its first and last accepted heartbeat (the
  runner compares the last with the database's last-seen: no heartbeat lost).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp

PING_INTERVAL = 120.0
TRACK_INTERVAL = 300.0
CHAT_POLL_INTERVAL = 2.0
CHAT_MAX_BACKOFF = 60.0
CHAT_POST_INTERVAL = 60.0
ADMIN_POLL_INTERVAL = 5.0
FAILED = 0  # status recorded when no HTTP answer came (timeout, connection error)


@dataclass
class Sample:
    t: float  # scenario seconds since start, when the request was sent
    route: str
    webinar: str
    status: int
    ms: float  # wall-clock latency


@dataclass
class Viewer:
    webinar: str
    join_at: float  # scenario seconds
    uid: str | None = None  # None: guest
    token: str | None = None
    guest_id: str | None = None
    registered: bool = False
    chatter: bool = False


@dataclass
class Admin:
    uid: str
    token: str
    webinar: str


class Clock:
    """Scenario time: wall time since start multiplied by `scale`."""

    def __init__(self, scale: float, t0: float | None = None) -> None:
        self.scale = scale
        # time.monotonic() is one clock for every process of the machine: client
        # processes given the same t0 share the scenario time.
        self.t0 = time.monotonic() if t0 is None else t0

    def now(self) -> float:
        return (time.monotonic() - self.t0) * self.scale

    async def sleep_until(self, t: float) -> None:
        delay = (t - self.now()) / self.scale
        if delay > 0:
            await asyncio.sleep(delay)


@dataclass
class Recorder:
    samples: list[Sample] = field(default_factory=list)
    # user id -> epoch seconds when its first / last 2xx ping or track was sent.
    hb_first: dict[str, float] = field(default_factory=dict)
    hb_last: dict[str, float] = field(default_factory=dict)


@dataclass
class Env:
    """What every client shares during one run (one side)."""

    base_url: str
    http: aiohttp.ClientSession
    clock: Clock
    end: float  # scenario seconds
    rec: Recorder
    realtime_down: asyncio.Event = field(default_factory=asyncio.Event)

    async def call(
        self,
        method: str,
        path: str,
        route: str,
        webinar: str,
        token: str | None = None,
        guest_id: str | None = None,
        json_body: object | None = None,
        uid: str | None = None,
    ) -> int:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if guest_id:
            headers["Cookie"] = f"el_guest={guest_id}"
        t = self.clock.now()
        sent = time.time()
        start = time.perf_counter()
        status = FAILED
        try:
            async with self.http.request(
                method, self.base_url + path, headers=headers, json=json_body
            ) as resp:
                await resp.read()
                status = resp.status
        except (TimeoutError, aiohttp.ClientError, OSError):
            status = FAILED
        self.rec.samples.append(
            Sample(t, route, webinar, status, (time.perf_counter() - start) * 1000)
        )
        if uid is not None and 200 <= status < 300:
            self.rec.hb_first.setdefault(uid, sent)
            self.rec.hb_last[uid] = max(sent, self.rec.hb_last.get(uid, 0.0))
        return status


def _api(webinar: str, rest: str) -> str:
    return f"/api/webinars/{webinar}/{rest}"


async def _every(
    env: Env, first: float, interval: float, action: Callable[[], Awaitable[None]]
) -> None:
    """setInterval: run `action` at first + k·interval until the scenario ends."""
    nxt = first
    while True:
        # Never sleep past the end: the run stops on time, not at the next tick.
        await env.clock.sleep_until(min(nxt, env.end))
        if env.clock.now() >= env.end:
            return
        await action()
        nxt += interval


async def viewer(env: Env, v: Viewer) -> None:
    await env.clock.sleep_until(min(v.join_at, env.end))
    if env.clock.now() >= env.end:
        return

    async def ping() -> None:
        await env.call(
            "POST", _api(v.webinar, "presence/ping"), "presence_ping", v.webinar, v.token, uid=v.uid
        )

    async def track() -> None:
        await env.call(
            "POST",
            _api(v.webinar, "access/track"),
            "access_track",
            v.webinar,
            v.token,
            v.guest_id,
            {"event": "view"},
            uid=v.uid,
        )

    # The page fires both on mount; a new viewer's two auto-registrations race.
    if v.token:
        await asyncio.gather(track(), ping())
    else:
        await track()
    t = v.join_at
    loops = [_every(env, t + TRACK_INTERVAL, TRACK_INTERVAL, track)]
    if v.token:
        loops.append(_every(env, t + PING_INTERVAL, PING_INTERVAL, ping))
        loops.append(chat_fallback(env, v))
        if v.chatter:

            async def post() -> None:
                await env.call(
                    "POST",
                    _api(v.webinar, "chat/messages"),
                    "chat_post",
                    v.webinar,
                    v.token,
                    json_body={"body": "hello from the bench"},
                )

            loops.append(_every(env, t + CHAT_POST_INTERVAL / 2, CHAT_POST_INTERVAL, post))
    await asyncio.gather(*loops)


async def chat_fallback(env: Env, v: Viewer) -> None:
    """Once Realtime is down: poll every 2 s, doubling the delay after a failure (≤ 60 s)."""
    remaining = env.end - env.clock.now()
    if remaining <= 0:
        return
    try:
        await asyncio.wait_for(env.realtime_down.wait(), remaining / env.clock.scale)
    except TimeoutError:
        return
    delay = CHAT_POLL_INTERVAL
    while env.clock.now() < env.end:
        status = await env.call(
            "GET", _api(v.webinar, "chat/messages"), "chat_poll", v.webinar, v.token
        )
        delay = CHAT_POLL_INTERVAL if 200 <= status < 300 else min(delay * 2, CHAT_MAX_BACKOFF)
        await env.clock.sleep_until(min(env.clock.now() + delay, env.end))


async def admin(env: Env, a: Admin, start: float = 0.0) -> None:
    async def poll() -> None:
        await env.call("GET", _api(a.webinar, "stats/access"), "admin_stats", a.webinar, a.token)

    await _every(env, start, ADMIN_POLL_INTERVAL, poll)
