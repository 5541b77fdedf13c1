from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis

from tests.fakes.app import FakeApp
from tests.fakes.clock import FakeClock
from tests.fakes.jwks import FakeIssuer
from tests.fakes.stats_app import StatsApp
from tests.helpers import Running, make_config, run_gateway

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/15")


@pytest.fixture
async def fake_app() -> AsyncIterator[FakeApp]:
    app = FakeApp()
    await app.start()
    yield app
    app.slow_release.set()
    await app.stop()


@pytest.fixture
def clock() -> FakeClock:
    """A wall clock at the current whole second that moves only when the test advances
    it (tests/fakes/clock.py); pass it as the runtime's `clock`."""
    return FakeClock()


@pytest.fixture
async def issuer() -> AsyncIterator[FakeIssuer]:
    """A fake Supabase issuer publishing one ES256 key, `es-1`."""
    iss = FakeIssuer()
    await iss.start()
    iss.add_key("ES256", "es-1")
    yield iss
    await iss.stop()


@pytest.fixture
async def stats() -> AsyncIterator[StatsApp]:
    """The fake stats app of the cache tests; alice, bob, carol, dave and erin are admins."""
    app = StatsApp()
    await app.start()
    app.admins = {"alice", "bob", "carol", "dave", "erin"}
    yield app
    if app.gate is not None:
        app.gate.set()
    await app.stop()


@pytest.fixture
async def gw(fake_app: FakeApp) -> AsyncIterator[Running]:
    """The gateway on the default config (tests/helpers.py BASE: one catch-all route to
    fake_app, memory store), running until the test ends."""
    async with run_gateway(make_config(fake_app.url)) as running:
        yield running


@pytest.fixture
async def redis_url() -> AsyncIterator[str]:
    """The real Redis, database 15, flushed. Under CI=true an unreachable Redis fails the
    test instead of skipping it."""
    client = aioredis.from_url(REDIS_URL)
    try:
        await client.ping()
    except Exception as exc:
        await client.aclose()
        if os.environ.get("CI") == "true":
            pytest.fail(f"Redis at {REDIS_URL} is required under CI=true: {exc}")
        pytest.skip(f"Redis at {REDIS_URL} not reachable: {exc}")
    await client.flushdb()
    yield REDIS_URL
    await client.flushdb()
    await client.aclose()


@pytest.fixture(params=["memory", "redis"])
def store_url(request: pytest.FixtureRequest) -> str:
    """The store a test runs on, once on each backend: the memory store, then the real
    Redis (flushed; see redis_url)."""
    if request.param == "memory":
        return "memory://"
    url: str = request.getfixturevalue("redis_url")
    return url


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A loopback port nobody listens on now, never one this process was given before:
    two bind-to-0 calls in a row can return the same port once the first socket is
    closed, and `listen` and `admin_listen` must then differ (seen in a bench run)."""
    for _ in range(200):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise RuntimeError("no free loopback port not handed out before")


class PrivateRedis:
    """A redis-server of the test's own on a free port, so a test may pause or kill it
    without touching the shared 6379 instance."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.dir = tempfile.mkdtemp(prefix="edge-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.fail("redis-server is not installed")
        self.proc = subprocess.Popen(
            [
                exe,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.01)
        pytest.fail("private redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def freeze(self) -> None:
        """SIGSTOP: a hung server (a frozen VM): connections are accepted by the kernel
        and never answered."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)


@pytest.fixture
def private_redis_server() -> Iterator[PrivateRedis]:
    server = PrivateRedis()
    server.start()
    yield server
    server.stop()
    shutil.rmtree(server.dir, ignore_errors=True)


@pytest.fixture
def private_redis(private_redis_server: PrivateRedis) -> str:
    return private_redis_server.url


def node_binary() -> str:
    """The `node` executable. Missing: under CI=true the test fails (.ci/run installs
    Node); elsewhere it is skipped with the reason."""
    exe = shutil.which("node")
    if exe is None:
        if os.environ.get("CI") == "true":
            pytest.fail("node is required under CI=true (.ci/run installs nodejs)")
        pytest.skip("node is not installed: the Node upstream tests need it (apt install nodejs)")
    return exe


class NodeUpstream:
    """tests/fakes/node_upstream.js in its own process: a real Node `http` server."""

    def __init__(self, keep_alive_ms: int) -> None:
        script = os.path.join(os.path.dirname(__file__), "fakes", "node_upstream.js")
        self.proc = subprocess.Popen(
            [node_binary(), script, str(keep_alive_ms)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode().strip()
        if not line.isdigit():
            self.stop()
            raise RuntimeError(f"node upstream did not start: {line!r}")
        self.port = int(line)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def node_upstream() -> Iterator[NodeUpstream]:
    """Node with a 2 s keep-alive (it advertises `timeout=2` and closes ~3 s idle)."""
    up = NodeUpstream(2000)
    yield up
    up.stop()
