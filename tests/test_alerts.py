"""Alerting end to end: gateway (run_gateway, real sockets) → fake upstreams, with the
memory store and the real Redis, and a fake Slack/Discord/generic receiver
(tests/fakes/webhooks.py). Time moves by an injected clock; the recorder's background
loop is parked (`flush_every: 1h`) and each test drives `AlertRecorder.tick()` itself,
exactly as the loop would."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import httpx
import pytest

from gateway.config import parse_config
from gateway.observability.alerts import (
    ALERTS,
    AlertRecorder,
    Message,
    Observation,
    _quantile,
    observe_rules,
)
from gateway.policies.breaker.policy import BREAKERS
from tests.conftest import free_port
from tests.fakes.app import FakeApp
from tests.fakes.clock import FakeClock
from tests.fakes.gotrue import FakeGoTrue
from tests.fakes.webhooks import WebhookReceiver
from tests.helpers import make_config, run_gateway

# A minute boundary + 1 s: every count of a test lands in one minute bucket.
T0 = 1_800_000_000.0 + 1
NO_RULES: dict[str, Any] = {
    "upstream_400_per_min": None,
    "upstream_409_per_min": None,
    "upstream_5xx_per_min": None,
    "auth_p95": None,
    "realtime_disconnects_per_min": None,
    "breaker_open": False,
}


@pytest.fixture
async def receiver() -> AsyncIterator[WebhookReceiver]:
    r = WebhookReceiver()
    await r.start()
    yield r
    await r.stop()


def alert_config(
    upstream: str,
    store_url: str,
    receiver: WebhookReceiver,
    rules: dict[str, Any],
    kinds: tuple[str, ...] = ("slack", "discord"),
    routes: list[dict[str, Any]] | None = None,
    upstreams: dict[str, Any] | None = None,
    **alerts: Any,
) -> Any:
    extra: dict[str, Any] = {}
    if upstreams:
        extra["upstreams"] = {"app": {"url": upstream}, **upstreams}
    return make_config(
        upstream,
        store={"url": store_url, "timeout": "1s"},
        routes=routes
        or [{"name": "api", "match": {"path": "/{path:path}"}, "upstream": "app", "auth": "off"}],
        alerts={
            "evaluate_every": "15s",
            "cooldown": "10m",
            "flush_every": "1h",
            "send_backoff": "10ms",
            "webhooks": [{"kind": k, "url": receiver.url_for(k)} for k in kinds],
            "rules": {**NO_RULES, **rules},
            **alerts,
        },
        **extra,
    )


def recorder(gw: Any) -> AlertRecorder:
    rec = gw.app.rt.services[ALERTS]
    assert isinstance(rec, AlertRecorder)
    return rec


async def hit(c: httpx.AsyncClient, url: str, n: int) -> list[int]:
    return [(await c.get(url)).status_code for _ in range(n)]


def metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        m = re.match(r"^(\w+)(?:\{(.*)\})? (\S+)$", line)
        if m and m.group(1) == name:
            got = ",".join(sorted((m.group(2) or "").split(","))) if m.group(2) else ""
            if got == want:
                return float(m.group(3))
    return 0.0


# --------------------------------------------------------------------------- firing


async def test_threshold_crossed_sends_one_slack_and_one_discord_post(
    fake_app: FakeApp, receiver: WebhookReceiver, store_url: str
) -> None:
    fake_app.status_override["/api/rooms/join"] = (409, {"code": "conflict"})
    cfg = alert_config(fake_app.url, store_url, receiver, {"upstream_409_per_min": 5})
    clock = FakeClock(T0)
    async with run_gateway(cfg, clock=clock) as gw, httpx.AsyncClient() as c:
        rec = recorder(gw)
        assert await hit(c, gw.url + "/api/ok", 3) == [200] * 3
        # At the threshold: not above it yet.
        assert await hit(c, gw.url + "/api/rooms/join", 5) == [409] * 5
        assert await rec.tick() is True
        await rec.drain()
        assert receiver.posts == []

        clock.advance(15)
        assert await hit(c, gw.url + "/api/rooms/join", 2) == [409] * 2
        assert await rec.tick() is True
        await rec.drain()
        # Same slot again, and the next slots within the cooldown: nothing more.
        assert await rec.tick() is False
        clock.advance(15)
        await hit(c, gw.url + "/api/rooms/join", 3)
        assert await rec.tick() is True
        await rec.drain()

        (slack,) = receiver.bodies("slack")
        (discord,) = receiver.bodies("discord")
        assert len(receiver.posts) == 2

        _assert_slack_firing(slack)
        _assert_discord_firing(discord, slack["text"])

        async with httpx.AsyncClient() as admin:
            text = (await admin.get(gw.admin_url + "/metrics")).text
        assert metric(text, "edge_alerts_sent_total", kind="slack", result="ok") == 1
        assert metric(text, "edge_alerts_sent_total", kind="discord", result="ok") == 1
        assert metric(text, "edge_alerts_firing", rule="upstream_409_per_min") == 1
        assert metric(text, "edge_alerts_firing", rule="upstream_400_per_min") == 0
        status = (await c.get(gw.admin_url + "/_edge/status")).json()
        assert "upstream_409_per_min" in str(status)


def _assert_slack_firing(slack: dict[str, Any]) -> None:
    """The Slack post of upstream_409_per_min firing at 7/min (Block Kit)."""
    assert slack["text"].startswith("FIRING upstream_409_per_min: 7/min > 5/min")
    header, section, context = slack["blocks"]
    assert header["type"] == "header"
    assert header["text"] == {"type": "plain_text", "text": "Firing: upstream_409_per_min"}
    assert section["type"] == "section"
    fields = [f["text"] for f in section["fields"]]
    assert fields == [
        "*Observed*\n7/min",
        "*Threshold*\n5/min",
        "*Window*\nlast 60 s",
        "*Top routes*\napi: 7",
    ]
    assert all(f["type"] == "mrkdwn" for f in section["fields"])
    assert context["type"] == "context"


def _assert_discord_firing(discord: dict[str, Any], slack_text: str) -> None:
    """The Discord post of the same alert: the same text, one embed."""
    assert discord["content"] == slack_text
    assert discord["allowed_mentions"] == {"parse": []}
    (embed,) = discord["embeds"]
    assert embed["title"] == "Firing: upstream_409_per_min"
    assert embed["color"] == 0xE01E5A
    assert {f["name"]: f["value"] for f in embed["fields"]} == {
        "Observed": "7/min",
        "Threshold": "5/min",
        "Window": "last 60 s",
        "Top routes": "api: 7",
    }
    assert embed["timestamp"].startswith("2027-01-15T08:")


async def test_unreachable_upstream_counts_as_upstream_5xx(
    fake_app: FakeApp, receiver: WebhookReceiver
) -> None:
    """An unreachable upstream counts as failing (a hard-down app must page); the
    gateway's own policy answers (401, 429, breaker 503) are not upstream answers."""
    dead = f"http://127.0.0.1:{free_port()}"
    routes = [
        {"name": "dead", "match": {"path": "/dead/{p:path}"}, "upstream": "gone", "auth": "off"},
        {"name": "api", "match": {"path": "/{path:path}"}, "upstream": "app", "auth": "off"},
    ]
    fake_app.status_override["/api/boom"] = (500, {"code": "boom"})
    cfg = alert_config(
        fake_app.url,
        "memory://",
        receiver,
        {"upstream_5xx_per_min": 3},
        kinds=("generic",),
        routes=routes,
        upstreams={"gone": {"url": dead}},
    )
    clock = FakeClock(T0)
    async with run_gateway(cfg, clock=clock) as gw, httpx.AsyncClient() as c:
        rec = recorder(gw)
        assert await hit(c, gw.url + "/dead/x", 2) == [502] * 2
        assert await hit(c, gw.url + "/api/boom", 2) == [500] * 2
        assert await rec.tick() is True
        await rec.drain()
        (body,) = receiver.bodies("generic")
        assert body["rule"] == "upstream_5xx_per_min"
        assert body["status"] == "firing"
        assert body["value"] == 4
        assert sorted(t["name"] for t in body["top"]) == ["api", "dead"]


# --------------------------------------------------------------------------- cooldown


async def test_cooldown_reminder_and_resolve_message(
    fake_app: FakeApp, receiver: WebhookReceiver, store_url: str
) -> None:
    fake_app.status_override["/api/bad"] = (400, {"code": "bad"})
    cfg = alert_config(fake_app.url, store_url, receiver, {"upstream_400_per_min": 3})
    clock = FakeClock(T0)
    async with run_gateway(cfg, clock=clock) as gw, httpx.AsyncClient() as c:
        rec = recorder(gw)

        async def turn(errors: int, advance: float) -> list[str]:
            clock.advance(advance)
            await hit(c, gw.url + "/api/bad", errors)
            await rec.tick()
            await rec.drain()
            texts = [b["text"] for b in receiver.bodies("slack")]
            receiver.posts.clear()
            return texts

        assert await turn(4, 0) == ["FIRING upstream_400_per_min: 4/min > 3/min (last 60 s)"]
        # Two minutes without errors: the rate fell back.
        assert await turn(0, 120) == [
            "RESOLVED upstream_400_per_min: 0/min (threshold 3/min, last 60 s)"
        ]
        # Breaching again within the cooldown of the first message: quiet.
        assert await turn(5, 15) == []
        assert await turn(5, 15) == []
        # Past the cooldown (10 min after the first message) and still breaching: fires.
        assert await turn(5, 600 - 150 + 1) == [
            "FIRING upstream_400_per_min: 5/min > 3/min (last 60 s)"
        ]
        # Breaching for another full cooldown: one reminder.
        for _ in range(39):
            assert await turn(5, 15) == []
        (reminder,) = await turn(5, 15)
        assert reminder.startswith("STILL FIRING upstream_400_per_min: ")


async def test_resolved_message_shape(
    fake_app: FakeApp, receiver: WebhookReceiver, store_url: str
) -> None:
    fake_app.status_override["/api/bad"] = (400, {"code": "bad"})
    cfg = alert_config(
        fake_app.url,
        store_url,
        receiver,
        {"upstream_400_per_min": 1},
        kinds=("slack", "discord", "generic"),
    )
    clock = FakeClock(T0)
    async with run_gateway(cfg, clock=clock) as gw, httpx.AsyncClient() as c:
        rec = recorder(gw)
        await hit(c, gw.url + "/api/bad", 2)
        await rec.tick()
        clock.advance(30)
        # Half a minute later the previous minute still counts (sliding window).
        await rec.tick()
        clock.advance(60)
        await rec.tick()
        await rec.drain()
        slack = receiver.bodies("slack")
        discord = receiver.bodies("discord")
        generic = receiver.bodies("generic")
        assert len(slack) == len(discord) == len(generic) == 2
        assert slack[1]["blocks"][0]["text"]["text"] == "Resolved: upstream_400_per_min"
        assert discord[1]["embeds"][0]["title"] == "Resolved: upstream_400_per_min"
        assert discord[1]["embeds"][0]["color"] == 0x2EB67D
        assert generic[1]["status"] == "resolved"
        assert generic[1]["rule"] == "upstream_400_per_min"
        # 31 s into the next minute, 29/60 of the 2 errors still weigh in: below 1.
        assert generic[1]["value"] == pytest.approx(2 * 29 / 60, abs=1e-3)
        assert generic[1]["threshold"] == 1
        assert generic[1]["window_s"] == 60
        assert generic[1]["since"] == generic[0]["at"]


# --------------------------------------------------------------------------- fleet


async def test_two_gateways_sharing_redis_send_one_alert(
    fake_app: FakeApp, receiver: WebhookReceiver, redis_url: str
) -> None:
    fake_app.status_override["/api/rooms/join"] = (409, {"code": "conflict"})
    cfg = alert_config(fake_app.url, redis_url, receiver, {"upstream_409_per_min": 5})
    clock = FakeClock(T0)
    async with (
        run_gateway(cfg, clock=clock) as gw1,
        run_gateway(cfg, clock=clock) as gw2,
        httpx.AsyncClient() as c,
    ):
        assert gw1.app.rt.store is not gw2.app.rt.store
        rec1, rec2 = recorder(gw1), recorder(gw2)
        # Neither replica alone crosses the threshold; the fleet does.
        assert await hit(c, gw1.url + "/api/rooms/join", 3) == [409] * 3
        assert await hit(c, gw2.url + "/api/rooms/join", 3) == [409] * 3
        await asyncio.gather(rec1.tick(evaluate=False), rec2.tick(evaluate=False))
        clock.advance(15)
        for _ in range(3):
            won = await asyncio.gather(rec1.tick(), rec2.tick())
            assert sorted(won) == [False, True]
            clock.advance(15)
        await asyncio.gather(rec1.drain(), rec2.drain())
        assert len(receiver.bodies("slack")) == 1
        assert len(receiver.bodies("discord")) == 1
        assert receiver.bodies("slack")[0]["text"].startswith("FIRING upstream_409_per_min: 6/min")
        # Both replicas show the fleet's state on their own /metrics.
        async with httpx.AsyncClient() as admin:
            for gw in (gw1, gw2):
                text = (await admin.get(gw.admin_url + "/metrics")).text
                assert metric(text, "edge_alerts_firing", rule="upstream_409_per_min") == 1


async def test_a_config_reload_keeps_the_fleet_state(
    fake_app: FakeApp, receiver: WebhookReceiver, store_url: str
) -> None:
    fake_app.status_override["/api/rooms/join"] = (409, {"code": "conflict"})
    cfg = alert_config(
        fake_app.url, store_url, receiver, {"upstream_409_per_min": 2}, kinds=("slack",)
    )
    clock = FakeClock(T0)
    async with run_gateway(cfg, clock=clock) as gw, httpx.AsyncClient() as c:
        old = recorder(gw)
        await hit(c, gw.url + "/api/rooms/join", 3)
        assert await old.tick() is True
        await old.drain()
        # A reload builds a new recorder on the new runtime; the old one lets go.
        data = cfg.model_dump()
        data["alerts"]["cooldown"] = "20m"
        await gw.app.reload(type(cfg).model_validate(data))
        new = recorder(gw)
        assert new is not old
        assert all(up.observer is new for up in gw.app.rt.upstreams.values())
        for _ in range(100):
            if old.client is None or old.client.is_closed:
                break
            await asyncio.sleep(0.01)
        clock.advance(120)
        assert await new.tick() is True
        await new.drain()
        assert [b["text"].split(":")[0] for b in receiver.bodies("slack")] == [
            "FIRING upstream_409_per_min",
            "RESOLVED upstream_409_per_min",
        ]


# --------------------------------------------------------------------------- failures


async def test_webhook_down_does_not_affect_traffic(
    fake_app: FakeApp, receiver: WebhookReceiver
) -> None:
    fake_app.status_override["/api/rooms/join"] = (409, {"code": "conflict"})
    cfg = alert_config(
        fake_app.url,
        "memory://",
        receiver,
        {"upstream_409_per_min": 2},
        send_attempts=3,
        send_backoff="200ms",
    )
    # Discord's endpoint is down (nothing listens); Slack answers 500 to everything.
    data = cfg.model_dump()
    data["alerts"]["webhooks"][1]["url"] = f"http://127.0.0.1:{free_port()}/discord"
    cfg = type(cfg).model_validate(data)
    receiver.fail_status = 500
    clock = FakeClock(T0)
    async with run_gateway(cfg, clock=clock) as gw, httpx.AsyncClient() as c:
        rec = recorder(gw)
        await hit(c, gw.url + "/api/rooms/join", 3)
        assert await rec.tick() is True
        # Deliveries are failing and backing off right now; requests do not notice.
        statuses = await asyncio.gather(*(c.get(gw.url + "/api/ok") for _ in range(50)))
        assert [r.status_code for r in statuses] == [200] * 50
        assert rec.status()["queued"] + len(receiver.posts) >= 1
        await asyncio.wait_for(rec.drain(), 10)
        assert len(receiver.posts) == 3  # Slack: every attempt reached it, all refused
        assert (await c.get(gw.url + "/api/ok")).status_code == 200
        async with httpx.AsyncClient() as admin:
            text = (await admin.get(gw.admin_url + "/metrics")).text
        for kind in ("slack", "discord"):
            assert metric(text, "edge_alerts_sent_total", kind=kind, result="retry") == 2
            assert metric(text, "edge_alerts_sent_total", kind=kind, result="failed") == 1
            assert metric(text, "edge_alerts_sent_total", kind=kind, result="ok") == 0


async def test_webhook_retry_recovers_and_a_4xx_is_final(
    fake_app: FakeApp, receiver: WebhookReceiver
) -> None:
    fake_app.status_override["/api/rooms/join"] = (409, {"code": "conflict"})
    cfg = alert_config(
        fake_app.url, "memory://", receiver, {"upstream_409_per_min": 1}, kinds=("slack",)
    )
    clock = FakeClock(T0)
    async with run_gateway(cfg, clock=clock) as gw, httpx.AsyncClient() as c:
        rec = recorder(gw)
        receiver.fail_next = 2
        await hit(c, gw.url + "/api/rooms/join", 2)
        await rec.tick()
        await rec.drain()
        assert [p.answered for p in receiver.posts] == [500, 500, 200]
        # A webhook that answers 404 (revoked URL) is not retried.
        receiver.posts.clear()
        receiver.fail_status = 404
        clock.advance(120)
        await rec.tick()  # resolved
        await rec.drain()
        assert [p.answered for p in receiver.posts] == [404]
        async with httpx.AsyncClient() as admin:
            text = (await admin.get(gw.admin_url + "/metrics")).text
        assert metric(text, "edge_alerts_sent_total", kind="slack", result="retry") == 2
        assert metric(text, "edge_alerts_sent_total", kind="slack", result="ok") == 1
        assert metric(text, "edge_alerts_sent_total", kind="slack", result="failed") == 1


async def test_store_down_keeps_counts_and_traffic_flows(
    fake_app: FakeApp, receiver: WebhookReceiver, private_redis_server: Any
) -> None:
    fake_app.status_override["/api/rooms/join"] = (409, {"code": "conflict"})
    cfg = alert_config(
        fake_app.url,
        private_redis_server.url,
        receiver,
        {"upstream_409_per_min": 2},
        kinds=("slack",),
    )
    clock = FakeClock(T0)
    async with run_gateway(cfg, clock=clock) as gw, httpx.AsyncClient() as c:
        rec = recorder(gw)
        private_redis_server.stop()
        assert await hit(c, gw.url + "/api/rooms/join", 3) == [409] * 3
        assert await rec.tick() is False  # store down: nothing evaluated, counts kept
        private_redis_server.start()
        clock.advance(15)
        deadline = asyncio.get_running_loop().time() + 10
        while not await rec.tick():
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.2)  # the store's back-off after failures is wall time
            clock.advance(15)
        await rec.drain()
        (slack,) = receiver.bodies("slack")
        assert slack["text"].startswith("FIRING upstream_409_per_min: 3/min")


# --------------------------------------------------------------------------- other rules


async def test_breaker_open_rule(
    fake_app: FakeApp, receiver: WebhookReceiver, store_url: str
) -> None:
    fake_app.status_override["/chat/messages"] = (500, {"code": "down"})
    routes = [
        {
            "name": "chat_poll",
            "match": {"path": "/chat/messages"},
            "upstream": "app",
            "auth": "off",
            "breaker": {"group": "chat", "failure_threshold": 2, "cooldown": "30s"},
        },
        {"name": "api", "match": {"path": "/{path:path}"}, "upstream": "app", "auth": "off"},
    ]
    cfg = alert_config(
        fake_app.url,
        store_url,
        receiver,
        {"breaker_open": True},
        routes=routes,
        kinds=("slack", "discord"),
    )
    clock = FakeClock(T0)
    mono = FakeClock(1000.0)
    async with run_gateway(cfg, clock=clock, monotonic=mono) as gw, httpx.AsyncClient() as c:
        rec = recorder(gw)
        assert await rec.tick() is True
        assert await hit(c, gw.url + "/chat/messages", 2) == [500, 500]
        assert (await c.get(gw.url + "/chat/messages")).status_code == 503  # shed: open
        assert gw.app.rt.services[BREAKERS].status()["chat"]["state"] == "open"
        clock.advance(15)
        assert await rec.tick() is True
        await rec.drain()
        (slack,) = receiver.bodies("slack")
        assert slack["text"] == "FIRING breaker_open: 1 open > none open (now)"
        assert slack["blocks"][1]["fields"][3]["text"] == "*Top groups*\nchat"
        (discord,) = receiver.bodies("discord")
        assert discord["embeds"][0]["fields"][3] == {
            "name": "Top groups",
            "value": "chat",
            "inline": False,
        }
        # The upstream recovers; after the cooldown a probe closes the breaker.
        del fake_app.status_override["/chat/messages"]
        mono.advance(40)
        assert (await c.get(gw.url + "/chat/messages")).status_code == 200
        assert gw.app.rt.services[BREAKERS].status()["chat"]["state"] == "closed"
        # This replica's "seen open" mark ages out of the store after 3 flush periods.
        clock.advance(3 * 3600 + 15)
        assert await rec.tick() is True
        await rec.drain()
        assert [b["text"] for b in receiver.bodies("slack")][1] == (
            "RESOLVED breaker_open: none open (threshold none open, now)"
        )


async def test_realtime_disconnects_not_initiated_by_the_client(
    fake_app: FakeApp, receiver: WebhookReceiver
) -> None:
    routes = [
        {
            "name": "realtime",
            "match": {"path": "/realtime/v1/websocket"},
            "upstream": "app",
            "auth": "off",
        },
        {"name": "api", "match": {"path": "/{path:path}"}, "upstream": "app", "auth": "off"},
    ]
    cfg = alert_config(
        fake_app.url,
        "memory://",
        receiver,
        {"realtime_disconnects_per_min": 2},
        routes=routes,
        kinds=("generic",),
    )
    clock = FakeClock(T0)
    async with run_gateway(cfg, clock=clock) as gw, aiohttp.ClientSession() as s:
        rec = recorder(gw)
        ws_url = gw.url.replace("http://", "ws://")
        # Clients leaving on their own: never an alert, however many.
        for _ in range(4):
            async with s.ws_connect(ws_url + "/realtime/v1/websocket") as ws:
                await ws.send_str("hi")
                assert (await ws.receive()).data == "echo:hi"
        # Another path (not Realtime) dropped by the upstream: not counted either.
        async with s.ws_connect(ws_url + "/ws") as ws:
            await ws.send_str("close:1011")
            assert (await ws.receive()).type == aiohttp.WSMsgType.CLOSE
        assert await rec.tick() is True
        await rec.drain()
        assert receiver.posts == []
        # Realtime dropping its clients: 3 > 2 per minute.
        for _ in range(3):
            async with s.ws_connect(ws_url + "/realtime/v1/websocket") as ws:
                await ws.send_str("close:1011")
                msg = await ws.receive()
                assert msg.type == aiohttp.WSMsgType.CLOSE
        for _ in range(50):
            if sum(rec._pending.get(int(T0 // 60), {}).values()) >= 3:
                break
            await asyncio.sleep(0.01)  # the gateway's side of the close finishes async
        clock.advance(15)
        assert await rec.tick() is True
        await rec.drain()
        (body,) = receiver.bodies("generic")
        assert body["rule"] == "realtime_disconnects_per_min"
        assert body["value"] == 3
        assert body["top"] == [{"name": "realtime", "count": 3}]


# A refresh route (coalesced), the rest of GoTrue proxied as is, and the app.
_AUTH_ROUTES: list[dict[str, Any]] = [
    {
        "name": "token_refresh",
        "match": {
            "methods": ["POST"],
            "path": "/auth/v1/token",
            "query": {"grant_type": "refresh_token"},
        },
        "upstream": "supabase",
        "auth": "off",
        "refresh": {"grace": "30s"},
    },
    {"name": "auth", "match": {"path": "/auth/v1/{p:path}"}, "upstream": "supabase", "auth": "off"},
    {"name": "api", "match": {"path": "/{path:path}"}, "upstream": "app", "auth": "off"},
]


async def _refresh_all(c: httpx.AsyncClient, url: str, tokens: list[str]) -> list[int]:
    """Refresh every token at once; the status of each answer."""
    answers = await asyncio.gather(
        *(
            c.post(
                url + "/auth/v1/token?grant_type=refresh_token",
                json={"refresh_token": t},
                timeout=30,
            )
            for t in tokens
        )
    )
    return [a.status_code for a in answers]


async def test_auth_p95_over_refresh_and_proxied_auth_calls(
    fake_app: FakeApp, receiver: WebhookReceiver
) -> None:
    gotrue = FakeGoTrue()
    await gotrue.start()
    try:
        cfg = alert_config(
            fake_app.url,
            "memory://",
            receiver,
            # Far above what a fast call can take on a busy machine (a loaded CI run saw a
            # no-latency call take 0.38 s), far below the slow phase's GoTrue.
            {"auth_p95": "1s"},
            routes=_AUTH_ROUTES,
            upstreams={"supabase": {"url": gotrue.url}},
            kinds=("generic",),
        )
        clock = FakeClock(T0)
        async with run_gateway(cfg, clock=clock) as gw, httpx.AsyncClient() as c:
            rec = recorder(gw)
            # Fast auth calls (password grant: no latency) and app calls (never auth).
            for i in range(10):
                answer = await c.post(
                    gw.url + "/auth/v1/token?grant_type=password", json={"email": f"u{i}@x.io"}
                )
                assert answer.status_code == 200
            await hit(c, gw.url + "/api/anything", 5)
            assert await rec.tick() is True
            await rec.drain()
            assert receiver.posts == []
            # GoTrue slows down: refreshes take 1.5 s (> 1 s for more than 5 % of calls).
            gotrue.latency = 1.5
            tokens = [gotrue.sign_in(f"v{i}@x.io")["refresh_token"] for i in range(4)]
            assert await _refresh_all(c, gw.url, tokens) == [200] * 4
            clock.advance(15)
            assert await rec.tick() is True
            await rec.drain()
            (body,) = receiver.bodies("generic")
            assert body["rule"] == "auth_p95"
            assert body["status"] == "firing"
            assert body["threshold"] == 1.0
            # At least the 1.5 s GoTrue took; no upper bound, since the measured time also
            # holds whatever a busy machine adds.
            assert body["value"] > 1.0
            assert body["top"] == [{"name": "token_refresh", "count": 4}]
            assert body["unit"] == "seconds"
    finally:
        await gotrue.stop()


# --------------------------------------------------------------------------- units


def test_window_weights_the_previous_minute() -> None:
    cfg = parse_config(
        "upstreams: {app: {url: 'http://x'}}\n"
        "routes: [{name: d, match: {path: '/{p:path}'}, upstream: app, auth: 'off'}]\n",
        env={},
    ).alerts
    prev = {"c|409|a": 80}
    cur = {"c|409|a": 10, "c|409|b": 30}
    # 45 s into the minute: a quarter of the previous minute is still in the window.
    obs = observe_rules(cfg, (1.0,), 60 * 100 + 45, cur, prev, [])
    o409 = next(o for o in obs if o.rule == "upstream_409_per_min")
    assert o409.value == 60
    assert o409.breached is True
    assert o409.top == [("a", 30.0), ("b", 30.0)]  # ties by name


def test_a_rule_turned_off_while_firing_is_forgotten_quietly() -> None:
    from gateway.runtime import Runtime

    cfg = make_config(
        "http://127.0.0.1:9",
        alerts={
            "webhooks": [{"kind": "slack", "url": "http://127.0.0.1:9/x"}],
            "rules": {**NO_RULES, "upstream_409_per_min": 5},
        },
    )
    rec = AlertRecorder(Runtime(cfg))
    state: dict[str, Any] = {"upstream_400_per_min": {"firing": True, "last_sent": T0}}
    obs = [Observation("upstream_409_per_min", 1.0, 5.0, False)]
    assert rec._transitions(state, obs, T0 + 60) == []
    assert state["upstream_400_per_min"]["firing"] is False


def test_tick_keys_share_one_cluster_slot() -> None:
    from redis.crc import key_slot

    keys = [f"edge:{k}".encode() for k in AlertRecorder.keys(123, 456)]
    assert len({key_slot(k) for k in keys}) == 1


def test_quantile_is_linear_inside_the_bucket() -> None:
    assert _quantile(0.95, (1.0, 2.0), [0, 100, 0]) == pytest.approx(1.95)
    assert _quantile(0.5, (1.0, 2.0), [50, 50, 0]) == pytest.approx(1.0)
    assert _quantile(0.95, (1.0, 2.0), [0, 0, 1]) == float("inf")
    assert _quantile(0.95, (1.0,), [0, 0]) == 0.0


def test_message_texts() -> None:
    o = Observation("auth_p95", float("inf"), 5.0, True, [("token_refresh", 9.0)], 20)
    m = Message("firing", o, T0, T0)
    assert m.summary == "FIRING auth_p95: > 30 s > 5.00 s (last 60 s)"


def test_empty_webhook_urls_turn_that_webhook_off() -> None:
    text = (
        "upstreams: {app: {url: 'http://x'}}\n"
        "routes: [{name: d, match: {path: '/{p:path}'}, upstream: app, auth: 'off'}]\n"
        "alerts:\n"
        "  webhooks:\n"
        "    - {kind: slack, url: '${SLACK_URL:-}'}\n"
        "    - {kind: discord, url: '${DISCORD_URL:-}'}\n"
    )
    cfg = parse_config(text, env={"DISCORD_URL": "https://discord.example/api/webhooks/1/x"})
    assert [(w.kind, w.url) for w in cfg.alerts.webhooks] == [
        ("discord", "https://discord.example/api/webhooks/1/x")
    ]
    assert parse_config(text, env={}).alerts.webhooks == []


def test_webhook_url_must_be_http() -> None:
    from gateway.config import ConfigError

    text = (
        "upstreams: {app: {url: 'http://x'}}\n"
        "routes: [{name: d, match: {path: '/{p:path}'}, upstream: app, auth: 'off'}]\n"
        "alerts: {webhooks: [{kind: slack, url: 'file:///etc/passwd'}]}\n"
    )
    with pytest.raises(ConfigError) as info:
        parse_config(text, env={})
    assert "alerts.webhooks[0].url" in str(info.value)


async def test_no_webhooks_no_recorder(fake_app: FakeApp) -> None:
    cfg = make_config(fake_app.url)
    async with run_gateway(cfg) as gw:
        assert ALERTS not in gw.app.rt.services
        assert all(up.observer is None for up in gw.app.rt.upstreams.values())
