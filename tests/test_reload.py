"""Hot reload: a good file is applied for new requests without dropping in-flight ones; a
bad file is refused and the old config keeps serving."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import httpx
import pytest
import yaml

from gateway.reload import Reloader
from tests.fakes.app import FakeApp
from tests.helpers import BASE, make_config, run_gateway


def write(path: Path, upstream: str, **server: object) -> None:
    data = {**BASE, "upstreams": {"app": {"url": upstream}}, "server": {**BASE["server"], **server}}
    path.write_text(yaml.safe_dump(data))


async def test_good_file_applied_in_flight_kept_bad_file_refused(
    fake_app: FakeApp, tmp_path: Path
) -> None:
    other = FakeApp()
    await other.start()
    path = tmp_path / "config.yaml"
    write(path, fake_app.url)
    try:
        async with run_gateway(make_config(fake_app.url)) as gw, httpx.AsyncClient(timeout=10) as c:
            reloader = Reloader(gw.app, path)
            old_rt = gw.app.rt
            inflight = asyncio.ensure_future(c.get(gw.url + "/slow?s=0.5"))
            while not fake_app.hits["/slow"]:
                await asyncio.sleep(0.01)
            write(path, other.url)
            assert await reloader.reload("test")
            # New requests use the new upstream at once...
            r = await c.get(gw.url + "/after")
            assert r.status_code == 200
            assert other.hits["/after"] == 1
            assert fake_app.hits["/after"] == 0
            # ...while the request that started before finishes on the old one.
            done = await inflight
            assert done.status_code == 200
            assert done.json() == {"slow": True}
            assert gw.app.rt is not old_rt

            path.write_text("routes: [\n  oops")
            assert not await reloader.reload("test")
            path.write_text(
                yaml.safe_dump(
                    {
                        **BASE,
                        "upstreams": {"app": {"url": other.url}},
                        "routes": [{"name": "x", "match": {"path": "/x"}, "upstream": "nosuch"}],
                    }
                )
            )
            assert not await reloader.reload("test")
            r = await c.get(gw.url + "/still")
            assert r.status_code == 200
            assert other.hits["/still"] == 1
            metrics = (await c.get(gw.admin_url + "/metrics")).text
            assert 'edge_config_reloads_total{result="ok"} 1.0' in metrics
            assert 'edge_config_reloads_total{result="error"} 2.0' in metrics
            # The admin port follows the running config.
            status = (await c.get(gw.admin_url + "/_edge/status")).json()
            assert status["upstreams"]["app"]["url"] == other.url
    finally:
        await other.stop()


async def test_restart_only_settings_are_reported(fake_app: FakeApp, tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    async with run_gateway(make_config(fake_app.url)) as gw:
        write(path, fake_app.url, listen="127.0.0.1:1234")
        restart = await gw.app.reload(
            Reloader(gw.app, path).app.config.model_copy(
                update={
                    "server": gw.app.config.server.model_copy(update={"listen": "127.0.0.1:1234"})
                }
            )
        )
    assert restart == ["server.listen"]


async def test_an_applied_reload_logs_its_route_warnings(
    fake_app: FakeApp, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "config.yaml"
    late = {"name": "late", "match": {"path": "/late"}, "upstream": "app", "auth": "off"}
    data = {**BASE, "upstreams": {"app": {"url": fake_app.url}}, "routes": [*BASE["routes"], late]}
    path.write_text(yaml.safe_dump(data))
    async with run_gateway(make_config(fake_app.url)) as gw:
        with caplog.at_level(logging.WARNING, logger="gateway.reload"):
            assert await Reloader(gw.app, path).reload("test")
    warned = [r for r in caplog.records if r.getMessage() == "config warning"]
    assert [getattr(r, "key", None) for r in warned] == ["routes[1].match.path"]
