"""The gateway as a real process: startup on the shipped config with no app behind it,
SIGTERM drain, and several workers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import free_port
from tests.fakes.app import FakeApp

ROOT = Path(__file__).resolve().parent.parent
# SO_REUSEPORT spreads connections only on Linux, and the listener checks read /proc.
LINUX = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")


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
        # Its own process group, so a test can signal the group as `kill -TERM -PGID` does.
        start_new_session=True,
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
        # The whole group: a test may have killed the supervisor and left its workers.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        # To the pipes' end, not just the exit: workers that outlived their supervisor
        # hold the pipes, and the transport must close before the test's loop does.
        await asyncio.wait_for(proc.communicate(), 30)


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
    # Every line is JSON without ANSI colour codes, and the gateway's own startup line
    # (once) replaces uvicorn's per-listener ones.
    lines = [json.loads(line) for line in err.splitlines()]
    assert "\x1b" not in err and not any("color_message" in line for line in lines)
    assert not any(line["msg"].startswith("Started server process") for line in lines)
    started = [line for line in lines if line["msg"] == "gateway started"]
    assert len(started) == 1
    assert started[0].keys() >= {
        "version",
        "config",
        "config_digest",
        "listen",
        "admin_listen",
        "workers",
        "store",
        "routes",
    }
    assert started[0]["routes"] == len(config["routes"])
    assert started[0]["store"] == "memory" and started[0]["workers"] == 1


async def test_startup_logs_route_warnings(fake_app: FakeApp, tmp_path: Path) -> None:
    config = _simple(fake_app.url)
    config["routes"].append(  # type: ignore[attr-defined]
        {"name": "late", "match": {"path": "/late"}, "upstream": "app", "auth": "off"}
    )
    async with gateway_process(config, tmp_path) as (proc, _, _):
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
        err = (await proc.stderr.read()).decode()  # type: ignore[union-attr]
    warnings = [json.loads(line) for line in err.splitlines() if '"config warning"' in line]
    assert [(w["level"], w["key"]) for w in warnings] == [("warning", "routes[1].match.path")]
    assert "never matches" in warnings[0]["detail"]


def _run_to_exit(config: dict[str, object], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """`python -m gateway` on `config` until it exits by itself (a startup refusal)."""
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return subprocess.run(
        [sys.executable, "-m", "gateway", "--config", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("busy", ["listen", "admin_listen"])
def test_a_port_in_use_is_one_line_and_exit_1(busy: str, tmp_path: Path) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    config = _simple("http://127.0.0.1:9")
    config["server"] = {  # type: ignore[index]
        "listen": f"127.0.0.1:{free_port()}",
        "admin_listen": f"127.0.0.1:{free_port()}",
        busy: f"127.0.0.1:{port}",
    }
    with taken:
        proc = _run_to_exit(config, tmp_path)
    assert proc.returncode == 1
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    line = json.loads(lines[0])
    assert line["msg"] == "cannot listen"
    assert line["key"] == f"server.{busy}"
    assert line["address"] == f"127.0.0.1:{port}"


def _simple(upstream: str, **server: object) -> dict[str, object]:
    return {
        "server": {"access_log": False, "drain_timeout": "10s", **server},
        "upstreams": {"app": {"url": upstream}},
        "routes": [
            {"name": "default", "match": {"path": "/{p:path}"}, "upstream": "app", "auth": "off"}
        ],
    }


@LINUX
def test_a_port_another_reuse_port_group_holds_is_refused(tmp_path: Path) -> None:
    # Another process of the same user listening with SO_REUSEPORT: without the plain
    # probe bind, the workers' SO_REUSEPORT listeners would silently share its port.
    taken = socket.socket()
    taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    config = _simple("http://127.0.0.1:9", workers=2)
    config["store"] = {"url": "redis://127.0.0.1:6379/15"}
    config["server"].update(  # type: ignore[attr-defined]
        {"listen": f"127.0.0.1:{port}", "admin_listen": f"127.0.0.1:{free_port()}"}
    )
    with taken:
        proc = _run_to_exit(config, tmp_path)
    assert proc.returncode == 1
    (line,) = [json.loads(ln) for ln in proc.stderr.splitlines()]
    assert (line["msg"], line["key"]) == ("cannot listen", "server.listen")


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


_OK_200 = 'edge_requests_total{method="GET",route="default",status="200"}'
_OK_40 = _OK_200 + " 40.0"


async def test_two_workers_share_the_port(
    fake_app: FakeApp, redis_url: str, tmp_path: Path
) -> None:
    config = _simple(fake_app.url, workers=2, access_log=True)
    config["store"] = {"url": redis_url}
    async with gateway_process(config, tmp_path) as (proc, base, admin), httpx.AsyncClient() as c:
        # The supervisor's /readyz waits for every worker to serve (a worker still
        # starting on a busy machine would leave the other to accept everything).
        await _wait_ready(c, proc, admin)

        # 40 concurrent requests, each on its own connection: both workers accept.
        async def one(path: str) -> int:
            async with httpx.AsyncClient(timeout=20) as client:
                return (await client.get(base + path)).status_code

        codes = await asyncio.gather(*(one("/slow?s=0.2") for _ in range(40)))
        assert codes == [200] * 40
        # Each worker moves its counts into the shared files every FLUSH_INTERVAL.
        total: list[str] = []
        deadline = time.monotonic() + 30
        while total != [_OK_40] and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            metrics = (await c.get(admin + "/metrics")).text
            total = [ln for ln in metrics.splitlines() if ln.startswith(_OK_200)]
        assert (await c.get(admin + "/readyz")).status_code == 200
        # SIGTERM while both workers hold requests: every worker drains its own.
        inflight = [asyncio.ensure_future(one("/slow?s=1")) for _ in range(10)]
        while fake_app.hits["/slow"] < 50:
            await asyncio.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.gather(*inflight) == [200] * 10
        assert await asyncio.wait_for(proc.wait(), 30) == 0
        err = (await proc.stderr.read()).decode()  # type: ignore[union-attr]
    # The supervisor's /metrics adds up both workers (Prometheus multiprocess mode).
    assert total == [_OK_40]
    pids = {
        json.loads(line)["pid"]
        for line in err.splitlines()
        if line.startswith("{") and '"gateway.access"' in line
    }
    assert len(pids) == 2


def _listeners(port: int) -> dict[str, set[int]]:
    """The LISTEN sockets on 127.0.0.1:`port` (by inode) and the processes holding each,
    read from /proc as `ss -ltnp` does."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        if f[1] == f"0100007F:{port:04X}" and f[3] == "0A":
            inodes.add(f[9])
    held: dict[str, set[int]] = {i: set() for i in inodes}
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            fds = list(fd_dir.iterdir())
        except OSError:  # the process ended
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:  # the fd closed since the listing
                continue
            if target.startswith("socket:[") and target[8:-1] in held:
                held[target[8:-1]].add(int(fd_dir.parent.name))
    return held


async def _eventually(cond: Callable[[], bool], what: str, seconds: float = 30.0) -> None:
    """Poll a state another process reaches (a listener closed, an exit), within
    `seconds`; AssertionError(`what`) after."""
    deadline = time.monotonic() + seconds
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(what)
        await asyncio.sleep(0.01)


async def _wait_ready(c: httpx.AsyncClient, proc: asyncio.subprocess.Process, admin: str) -> None:
    for _ in range(600):
        if (await c.get(admin + "/readyz")).status_code == 200:
            return
        assert proc.returncode is None
        await asyncio.sleep(0.05)
    raise AssertionError("the workers did not all start serving")


@LINUX
@pytest.mark.parametrize("reuse_port", [True, False])
async def test_each_worker_listens_on_its_own_socket(
    reuse_port: bool, fake_app: FakeApp, redis_url: str, tmp_path: Path
) -> None:
    config = _simple(fake_app.url, workers=2, reuse_port=reuse_port)
    config["store"] = {"url": redis_url}
    async with gateway_process(config, tmp_path) as (proc, base, admin), httpx.AsyncClient() as c:
        await _wait_ready(c, proc, admin)
        port = int(base.rsplit(":", 1)[1])
        held = _listeners(port)
    if not reuse_port:  # one socket, shared by both workers (and the supervisor)
        assert len(held) == 1
        return
    # One listener per worker, held by that worker alone: not by the supervisor, so a
    # dead worker's queue dies with it.
    assert len(held) == 2
    owners = [pids for pids in held.values()]
    assert all(len(p) == 1 for p in owners)
    assert owners[0] != owners[1]
    assert proc.pid not in owners[0] | owners[1]


@LINUX
async def test_a_dead_worker_leaves_no_queue_that_nobody_accepts(
    fake_app: FakeApp, redis_url: str, tmp_path: Path
) -> None:
    config = _simple(fake_app.url, workers=2)
    config["store"] = {"url": redis_url}
    async with gateway_process(config, tmp_path) as (proc, base, admin), httpx.AsyncClient() as c:
        await _wait_ready(c, proc, admin)
        port = int(base.rsplit(":", 1)[1])
        (victim,) = next(iter(_listeners(port).values()))
        os.kill(victim, signal.SIGKILL)
        await _eventually(
            lambda: len(_listeners(port)) == 1, "the dead worker's listener stayed", 10
        )
        # Every new connection lands on the survivor: none waits in a dead queue.
        for _ in range(20):
            async with httpx.AsyncClient(timeout=10) as fresh:
                assert (await fresh.get(base + "/ok")).status_code == 200
        assert (await c.get(admin + "/readyz")).status_code == 503


@LINUX
async def test_workers_drain_when_the_supervisor_is_killed(
    fake_app: FakeApp, redis_url: str, tmp_path: Path
) -> None:
    config = _simple(fake_app.url, workers=2)
    config["store"] = {"url": redis_url}
    async with gateway_process(config, tmp_path) as (proc, base, admin), httpx.AsyncClient() as c:
        await _wait_ready(c, proc, admin)
        port = int(base.rsplit(":", 1)[1])
        proc.kill()  # the supervisor alone, as the OOM killer would
        # (Not proc.wait(): asyncio waits for the pipes too, which the workers hold.)
        await _eventually(lambda: proc.returncode is not None, "the supervisor did not die")
        # The orphaned workers notice within a sweep tick and drain: the port closes.
        await _eventually(lambda: not _listeners(port), "orphaned workers kept listening")
        # And they exit: their stderr (the supervisor's pipe, inherited) reaches EOF.
        # Read to the end here, or the transport would outlive the test's loop.
        err = await asyncio.wait_for(proc.stderr.read(), 30)  # type: ignore[union-attr]
    assert b"supervisor gone: draining" in err


async def test_sigterm_to_the_whole_group_drains_like_sigterm_to_the_supervisor(
    fake_app: FakeApp, redis_url: str, tmp_path: Path
) -> None:
    """`kill -TERM -PGID` (a shell wrapper, `tini -g`): each worker gets SIGTERM twice,
    directly and from the supervisor. No worker is forced out with requests in flight,
    and the admin port answers 503 until the end."""
    config = _simple(fake_app.url, workers=2)
    config["store"] = {"url": redis_url}
    async with gateway_process(config, tmp_path) as (proc, base, admin), httpx.AsyncClient() as c:

        async def one(path: str) -> int:
            async with httpx.AsyncClient(timeout=20) as client:
                return (await client.get(base + path)).status_code

        inflight = [asyncio.ensure_future(one("/slow?s=1.5")) for _ in range(10)]
        while fake_app.hits["/slow"] < 10:
            await asyncio.sleep(0.01)
        os.killpg(proc.pid, signal.SIGTERM)
        readiness: list[int] = []
        while not all(t.done() for t in inflight):
            try:
                readiness.append((await c.get(admin + "/readyz")).status_code)
            except httpx.TransportError:
                readiness.append(0)  # the admin port is gone
            await asyncio.sleep(0.05)
        assert await asyncio.gather(*inflight) == [200] * 10
        code = await asyncio.wait_for(proc.wait(), 30)
        err = (await proc.stderr.read()).decode()  # type: ignore[union-attr]
        assert code == 0, err[-3000:]
    assert readiness and set(readiness) == {503}
