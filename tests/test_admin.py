"""Admin listener: health, readiness (store, draining), metrics, status; none of it on
the public port."""

from __future__ import annotations

import httpx

from tests.conftest import free_port
from tests.fakes.app import FakeApp
from tests.helpers import Running, make_config, run_gateway


async def test_health_ready_status_metrics(gw: Running) -> None:
    async with httpx.AsyncClient() as c:
        assert (await c.get(gw.admin_url + "/healthz")).json() == {"status": "ok"}
        r = await c.get(gw.admin_url + "/readyz")
        assert r.status_code == 200
        assert r.json()["checks"]["store"]["ok"] is True
        await c.get(gw.url + "/hello")
        status = (await c.get(gw.admin_url + "/_edge/status")).json()
        assert status["version"]
        assert len(status["config_digest"]) == 16
        assert status["routes"][0]["name"] == "default"
        metrics = (await c.get(gw.admin_url + "/metrics")).text
        assert 'edge_requests_total{method="GET",route="default",status="200"} 1.0' in metrics
        assert 'edge_upstream_requests_total{status="200",upstream="app"} 1.0' in metrics
        assert 'edge_request_duration_seconds_count{route="default"} 1.0' in metrics
        assert "edge_requests_in_flight 0.0" in metrics


async def test_admin_paths_are_not_served_on_public_port(fake_app: FakeApp, gw: Running) -> None:
    async with httpx.AsyncClient() as c:
        for path in ("/metrics", "/healthz", "/readyz", "/_edge/status"):
            r = await c.get(gw.url + path)
            # Either proxied to the app (the fake echoes it) or refused: never the admin body.
            assert "edge_requests_total" not in r.text
            assert "config_digest" not in r.text
    assert fake_app.hits["/metrics"] == 1


async def test_not_ready_while_store_down_or_draining(fake_app: FakeApp) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    # store.readiness_check: true — the operator opted in: not ready without the store.
    store = {"url": dead, "timeout": "100ms", "on_failure": "closed", "readiness_check": True}
    cfg = make_config(fake_app.url, store=store)
    async with run_gateway(cfg) as gw, httpx.AsyncClient() as c:
        r = await c.get(gw.admin_url + "/readyz")
        assert r.status_code == 503
        assert r.json()["checks"]["store"]["ok"] is False
        assert "edge_store_up 0.0" in (await c.get(gw.admin_url + "/metrics")).text
    # Every mode without the opt-in, closed included: the store is shared, so its outage
    # must not take every replica out of rotation at once; the detail says why.
    for mode in ("closed", "open", "local"):
        store = {"url": dead, "timeout": "100ms", "on_failure": mode}
        cfg = make_config(fake_app.url, store=store)
        async with run_gateway(cfg) as gw, httpx.AsyncClient() as c:
            r = await c.get(gw.admin_url + "/readyz")
            assert r.status_code == 200
            assert r.json()["checks"]["store"]["ok"] is False
            assert (await c.get(gw.url + "/x")).status_code == 200

    async with run_gateway(make_config(fake_app.url)) as gw, httpx.AsyncClient() as c:
        gw.app.rt.draining = True
        r = await c.get(gw.admin_url + "/readyz")
        assert r.status_code == 503
        assert r.json()["checks"]["draining"] is True


async def test_ready_with_real_redis(fake_app: FakeApp, redis_url: str) -> None:
    cfg = make_config(fake_app.url, store={"url": redis_url})
    async with run_gateway(cfg) as gw, httpx.AsyncClient() as c:
        r = await c.get(gw.admin_url + "/readyz")
        assert r.status_code == 200
        assert r.json()["checks"]["store"]["backend"] == "redis"
