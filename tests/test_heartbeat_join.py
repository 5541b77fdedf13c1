"""Access tracking as write-behind with bulk joins (`heartbeat: {mode: batch, join: batch}`),
through the real gateway on a real socket, on the memory store and on the real Redis, with
an injected clock: a signed-in viewer's first heartbeat never reaches the app and is
flushed as a join; viewers the flush target refuses get `refused_response` one flush
later; no tracked heartbeat or join is lost to a failed flush, a replica that goes away,
or a shutdown."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from gateway.config import ConfigError, GatewayConfig
from gateway.policies.heartbeat.policy import FLUSHERS, Flusher
from tests.fakes.app import FakeApp
from tests.fakes.clock import FakeClock
from tests.helpers import Running, run_gateway
from tests.test_heartbeat import PING, TRACK, W1, W2, config, counter, token, user

ACCESS_URL = "/rest/v1/rpc/edge_access_batch"


def join_cfg(upstream: str, store: str, **extra: Any) -> GatewayConfig:
    batch = {
        "mode": "batch",
        "join": "batch",
        "forward_interval": "900s",
        "flush_interval": "1h",  # the tests flush by hand
        "flush_upstream": "app",
        "flush_url": ACCESS_URL,
        **extra,
    }
    return config(
        upstream,
        store,
        heartbeat=batch,
        track={**batch, "key": ["user", "cookie:guest_id", "ip"]},
        store_extra={"key_prefix": "join-test:"},
    )


def flushers(gw: Running) -> dict[str, Flusher]:
    f: dict[str, Flusher] = gw.app.rt.services[FLUSHERS]
    return f


async def flush_all(gw: Running) -> None:
    for f in flushers(gw).values():
        await f.flush(force=True)


def sent(fake_app: FakeApp) -> list[tuple[str, dict[str, bool]]]:
    """Each flush request: (webinar, {user id: join flag})."""
    out = []
    for r in fake_app.requests:
        if r["path"] == ACCESS_URL:
            p = json.loads(r["body"])["payload"]
            out.append(
                (p["webinar_id"], {v["user_id"]: v.get("join", False) for v in p["viewers"]})
            )
    return out


async def heartbeat(
    c: httpx.AsyncClient, gw: Running, path: str, webinar: str, sub: str, clock: FakeClock
) -> httpx.Response:
    return await c.post(
        gw.url + path.format(w=webinar),
        headers={"Authorization": f"Bearer {token(sub, clock.now)}"},
        json={"event": "view"},
    )


async def test_first_heartbeats_are_flushed_as_joins(
    fake_app: FakeApp, store_url: str, clock: FakeClock
) -> None:
    async with run_gateway(join_cfg(fake_app.url, store_url), clock=clock) as gw:
        async with httpx.AsyncClient() as c:
            for i in range(3):
                for path in (TRACK, PING):
                    r = await heartbeat(c, gw, path, W1, user(i), clock)
                    assert (r.status_code, r.json()) == (200, {"success": True})
            # A guest has no user id to flush: its first track still goes to the app.
            r = await c.post(gw.url + TRACK.format(w=W1), headers={"Cookie": "guest_id=g1"})
            assert r.json()["raw_path"] == TRACK.format(w=W1)
            assert fake_app.hits[PING.format(w=W1)] == 0
            assert fake_app.hits[TRACK.format(w=W1)] == 1
            await flush_all(gw)
            assert sent(fake_app) == [(W1, {user(i): True for i in range(3)})] * 2
            # Their next heartbeats are plain entries, never forwarded.
            clock.advance(300)
            await heartbeat(c, gw, TRACK, W1, user(0), clock)
            await flush_all(gw)
            assert sent(fake_app)[-1] == (W1, {user(0): False})
            assert fake_app.hits[TRACK.format(w=W1)] == 1
            auth = {"Authorization": f"Bearer {token(user(9), clock.now)}"}
            presence = await c.get(f"{gw.url}/_edge/webinars/{W1}/presence", headers=auth)
            assert presence.json()["online"] == 4
        route = "access_track"
        assert counter(gw, "edge_heartbeats_total", route=route, outcome="joined") == 3
        assert counter(gw, "edge_heartbeats_total", route=route, outcome="forwarded") == 1
        assert flushers(gw)[route].last["joins"] == 0


async def test_refused_viewers_get_the_refused_response(
    fake_app: FakeApp, store_url: str, clock: FakeClock
) -> None:
    # The flush target (edge_access_batch) registers user 1 and refuses user 2.
    fake_app.status_override[ACCESS_URL] = (200, {"written": 1, "refused": [user(2)]})
    cfg = join_cfg(
        fake_app.url,
        store_url,
        negative_ttl="60s",
        refused_response={"status": 403, "body": {"error": "not_registered"}},
    )
    async with run_gateway(cfg, clock=clock) as gw, httpx.AsyncClient() as c:
        for i in (1, 2):
            assert (await heartbeat(c, gw, TRACK, W1, user(i), clock)).status_code == 200
        await flushers(gw)["access_track"].flush(force=True)
        assert flushers(gw)["access_track"].last["refused"] == 1
        # One flush later the error loop stops at the edge: nothing reaches the app.
        del fake_app.status_override[ACCESS_URL]
        for _ in range(3):
            r = await heartbeat(c, gw, TRACK, W1, user(2), clock)
            assert (r.status_code, r.json()) == (403, {"error": "not_registered"})
            assert r.headers["cache-control"] == "no-store"
        assert (await heartbeat(c, gw, TRACK, W1, user(1), clock)).status_code == 200
        assert fake_app.hits[TRACK.format(w=W1)] == 0
        # Out of presence, and out of the next flush.
        auth = {"Authorization": f"Bearer {token(user(9), clock.now)}"}
        presence = await c.get(f"{gw.url}/_edge/webinars/{W1}/presence", headers=auth)
        assert presence.json()["online"] == 1
        await flushers(gw)["access_track"].flush(force=True)
        assert sent(fake_app)[-1] == (W1, {user(1): False})
        # After negative_ttl the viewer may try again: a join, in the next flush.
        clock.advance(60)
        assert (await heartbeat(c, gw, TRACK, W1, user(2), clock)).status_code == 200
        await flushers(gw)["access_track"].flush(force=True)
        assert sent(fake_app)[-1] == (W1, {user(2): True})
        assert counter(gw, "edge_heartbeats_total", route="access_track", outcome="refused") == 1


async def test_failed_flush_keeps_every_entry_and_join(
    fake_app: FakeApp, store_url: str, clock: FakeClock
) -> None:
    async with run_gateway(join_cfg(fake_app.url, store_url), clock=clock) as gw:
        async with httpx.AsyncClient() as c:
            for i in range(3):
                await heartbeat(c, gw, TRACK, W1, user(i), clock)
            fake_app.status_override[ACCESS_URL] = (503, {"message": "db down"})
            report = await flushers(gw)["access_track"].flush(force=True)
            assert (report.failed, report.entries, report.joins) == (1, 0, 0)
            clock.advance(30)
            await heartbeat(c, gw, TRACK, W1, user(0), clock)
            await heartbeat(c, gw, TRACK, W2, user(5), clock)
            del fake_app.status_override[ACCESS_URL]
            report = await flushers(gw)["access_track"].flush(force=True)
            assert (report.failed, report.entries, report.joins) == (0, 4, 4)
            assert dict(sent(fake_app)[-2:]) == {
                W1: {user(i): True for i in range(3)},
                W2: {user(5): True},
            }
            assert (await flushers(gw)["access_track"].flush(force=True)).requests == 0


async def test_shutdown_flushes_the_joins(
    fake_app: FakeApp, store_url: str, clock: FakeClock
) -> None:
    async with run_gateway(join_cfg(fake_app.url, store_url), clock=clock) as gw:
        async with httpx.AsyncClient() as c:
            for i in range(2):
                await heartbeat(c, gw, TRACK, W1, user(i), clock)
        assert sent(fake_app) == []
    assert sent(fake_app) == [(W1, {user(0): True, user(1): True})]


async def test_another_replica_flushes_what_a_gone_one_recorded(
    fake_app: FakeApp,
    redis_url: str,
    clock: FakeClock,
) -> None:
    """Replica A records joins and goes away while the target is down (its final flush
    fails too); replica B, on the same Redis, sends them with their join flags."""
    fake_app.status_override[ACCESS_URL] = (500, {"message": "db down"})
    async with run_gateway(join_cfg(fake_app.url, redis_url), clock=clock) as a:
        async with httpx.AsyncClient() as c:
            for i in range(3):
                await heartbeat(c, a, TRACK, W1, user(i), clock)
    assert fake_app.hits[ACCESS_URL] >= 1
    del fake_app.status_override[ACCESS_URL]
    async with run_gateway(join_cfg(fake_app.url, redis_url), clock=clock) as b:
        report = await flushers(b)["access_track"].flush()
        assert (report.requests, report.entries, report.joins) == (1, 3, 3)
    assert sent(fake_app)[-1] == (W1, {user(i): True for i in range(3)})


@pytest.mark.parametrize(
    ("heartbeat_cfg", "words"),
    [
        ({"join": "batch"}, "join: batch needs mode: batch"),
        (
            {
                "mode": "batch",
                "join": "batch",
                "flush_upstream": "app",
                "flush_url": ACCESS_URL,
                "refused_response": {"status": 200},
            },
            "refused_response.status",
        ),
    ],
)
def test_config_errors_name_the_key(heartbeat_cfg: dict[str, Any], words: str) -> None:
    with pytest.raises(ConfigError) as err:
        config("http://127.0.0.1:9", "memory://", heartbeat=heartbeat_cfg)
    issues = {i.key: i.message for i in err.value.issues}
    assert words in issues["routes[0].heartbeat"], issues
