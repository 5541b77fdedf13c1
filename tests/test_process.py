"""The gateway as a real process: startup on the shipped config with no app behind it,
SIGTERM drain, and several workers."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import yaml

from tests.conftest import free_port
from tests.fakes.app import FakeApp

ROOT = Path(__file__).resolve().parent.parent


@asynccontextmanager
async def gateway_process(
    config: dict[str, object], tmp_path: Path
) -> AsyncIterator[tuple[asyncio.subprocess.Process, str, str]]:
    port, admin = free_port(), free_port()
    server = dict(config.get("server", {}))  # type: ignore[call-overload]
    server.update({"listen": f"127.0.0.1:{port}", "admin_listen": f"127.0.0.1:{admin}"})
    config = {**config, "server": server}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        "--config",
        str(path),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        # The supervisor makes its own multiprocess dir; never inherit one.
        env={k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"},
    )
    base, admin_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin}"
    async with httpx.AsyncClient() as c:
        for _ in range(300):
            try:
                if (await c.get(admin_url + "/healthz")).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.returncode is not None:
                raise AssertionError((await proc.stderr.read()).decode())  # type: ignore[union-attr]
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("gateway did not start")
    try:
        yield proc, base, admin_url
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_shipped_config_without_app_answers_502_json(tmp_path: Path) -> None:
    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    dead = f"http://127.0.0.1:{free_port()}"
    config["upstreams"]["app"]["url"] = dead
    config["upstreams"]["supabase"]["url"] = dead
    config["auth"]["jwks_url"] = dead + "/auth/v1/.well-known/jwks.json"
    async with gateway_process(config, tmp_path) as (proc, base, _), httpx.AsyncClient() as c:
        r = await c.get(base + "/")
        assert r.status_code == 502
        assert r.json()["error"] == "upstream_unavailable"
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
        err = (await proc.stderr.read()).decode()  # type: ignore[union-attr]
    assert "Traceback" not in err


def _simple(upstream: str, **server: object) -> dict[str, object]:
    return {
        "server": {"access_log": False, "drain_timeout": "10s", **server},
        "upstreams": {"app": {"url": upstream}},
        "routes": [
            {"name": "default", "match": {"path": "/{p:path}"}, "upstream": "app", "auth": "off"}
        ],
    }


async def test_sigterm_drains_in_flight_requests(fake_app: FakeApp, tmp_path: Path) -> None:
    async with (
        gateway_process(_simple(fake_app.url), tmp_path) as (proc, base, admin),
        httpx.AsyncClient(timeout=20) as c,
    ):
        inflight = asyncio.ensure_future(c.get(base + "/slow?s=1.5"))
        while not fake_app.hits["/slow"]:  # the request has reached the upstream
            await asyncio.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        # Readiness flips at once while the admin port stays up during the drain.
        r = await c.get(admin + "/readyz")
        assert r.status_code == 503
        assert r.json()["checks"]["draining"] is True
        done = await inflight
        assert done.status_code == 200
        assert done.json() == {"slow": True}
        assert await asyncio.wait_for(proc.wait(), 30) == 0


async def test_two_workers_share_the_port(
    fake_app: FakeApp, redis_url: str, tmp_path: Path
) -> None:
    config = _simple(fake_app.url, workers=2, access_log=True)
    config["store"] = {"url": redis_url}
    async with gateway_process(config, tmp_path) as (proc, base, admin), httpx.AsyncClient() as c:
        # 40 concurrent requests, each on its own connection: both workers accept.
        async def one(path: str) -> int:
            async with httpx.AsyncClient(timeout=20) as client:
                return (await client.get(base + path)).status_code

        codes = await asyncio.gather(*(one("/slow?s=0.2") for _ in range(40)))
        assert codes == [200] * 40
        metrics = (await c.get(admin + "/metrics")).text
        assert (await c.get(admin + "/readyz")).status_code == 200
        # SIGTERM while both workers hold requests: every worker drains its own.
        inflight = [asyncio.ensure_future(one("/slow?s=1")) for _ in range(10)]
        while fake_app.hits["/slow"] < 50:
            await asyncio.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.gather(*inflight) == [200] * 10
        assert await asyncio.wait_for(proc.wait(), 30) == 0
        err = (await proc.stderr.read()).decode()  # type: ignore[union-attr]
    total = [
        ln
        for ln in metrics.splitlines()
        if ln.startswith('edge_requests_total{method="GET",route="default",status="200"}')
    ]
    # The supervisor's /metrics adds up both workers (Prometheus multiprocess mode).
    assert total == ['edge_requests_total{method="GET",route="default",status="200"} 40.0']
    pids = {
        json.loads(line)["pid"]
        for line in err.splitlines()
        if line.startswith("{") and '"gateway.access"' in line
    }
    assert len(pids) == 2
