"""Throwaway Redis topologies for the tests, on free loopback ports in a temp directory:

- `RedisClusterServers`: a 3-master Redis Cluster (redis-server --cluster-enabled yes, then
  `redis-cli --cluster create ... --cluster-replicas 0 --cluster-yes`), ready once every
  node reports cluster_state:ok.
- `SentinelServers`: one master, one replica and one sentinel watching them as `mymaster`,
  ready once the sentinel names the master and knows the replica (so a test can fail over).

Each one starts its own processes and `stop()` kills exactly those (by handle). Nothing
here touches the shared Redis on 6379.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from tests.conftest import free_port as conftest_free_port

HOST = "127.0.0.1"


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
        return True


def free_port(*, bus: bool = False) -> int:
    """tests/conftest.py's free port (never one handed out before in this process); with
    `bus`, port + 10000 (the cluster bus) is free too."""
    for _ in range(200):
        port = conftest_free_port()
        if not bus or (port + 10000 < 65536 and _bindable(port + 10000)):
            return port
    raise RuntimeError("no free port pair found")


def _exe(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name} is not installed (apt-get install redis-server)")
    return path


def _wait(cond: object, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if cond():  # type: ignore[operator]
                return
        except (redis.RedisError, OSError) as exc:
            last = exc
        time.sleep(0.02)
    raise RuntimeError(f"{what} not reached in {timeout}s (last error: {last})")


class _Servers:
    def __init__(self, prefix: str) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=prefix))
        self.procs: list[subprocess.Popen[bytes]] = []

    def _spawn(self, *args: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [_exe("redis-server"), *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=self.dir,
        )
        self.procs.append(proc)
        return proc

    def _server(self, port: int, *extra: str) -> subprocess.Popen[bytes]:
        return self._spawn(
            "--port",
            str(port),
            "--bind",
            HOST,
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.dir),
            *extra,
        )

    @staticmethod
    def client(port: int) -> redis.Redis:
        return redis.Redis(HOST, port, socket_timeout=2, socket_connect_timeout=2)

    def _wait_up(self, port: int) -> None:
        def up() -> bool:
            with self.client(port) as c:
                return bool(c.ping())

        _wait(up, f"redis-server on {port}")

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        self.procs.clear()
        shutil.rmtree(self.dir, ignore_errors=True)


class RedisClusterServers(_Servers):
    def __init__(self, masters: int = 3, *, replicas: int = 0, node_timeout_ms: int = 2000) -> None:
        super().__init__("edge-cluster-")
        self.node_timeout_ms = node_timeout_ms
        self.replicas = replicas
        self.down: set[int] = set()  # killed or frozen by a test: never asked again
        self.ports: list[int] = []
        for _ in range(masters * (1 + replicas)):
            port = free_port(bus=True)
            while port in self.ports:
                port = free_port(bus=True)
            self.ports.append(port)

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"{HOST}:{p}" for p in self.ports)

    def start(self) -> None:
        for port in self.ports:
            self._server(
                port,
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                f"nodes-{port}.conf",
                "--cluster-node-timeout",
                str(self.node_timeout_ms),
                # Replicas' first sync without the 5 s diskless-sync delay.
                "--repl-diskless-sync-delay",
                "0",
            )
        for port in self.ports:
            self._wait_up(port)
        subprocess.run(
            [
                _exe("redis-cli"),
                "--cluster",
                "create",
                *(f"{HOST}:{p}" for p in self.ports),
                "--cluster-replicas",
                str(self.replicas),
                "--cluster-yes",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=30,
        )

        def ok() -> bool:
            for port in self.ports:
                with self.client(port) as c:
                    info = c.execute_command("CLUSTER", "INFO")
                    text = info.decode() if isinstance(info, bytes) else str(info)
                    if "cluster_state:ok" not in text or "cluster_slots_ok:16384" not in text:
                        return False
            return True

        _wait(ok, "cluster_state:ok")
        if self.replicas:
            _wait(self._replicas_in_sync, "replicas in sync")

    def _role(self, port: int) -> str:
        with self.client(port) as c:
            return str(c.info("replication").get("role"))

    def _replicas_in_sync(self) -> bool:
        for port in self.ports:
            with self.client(port) as c:
                info = c.info("replication")
                if info.get("role") == "slave" and info.get("master_link_status") != "up":
                    return False
        return True

    def flush(self) -> None:
        for port in self.live:
            if self._role(port) != "master":
                continue  # replicas follow their master's FLUSHALL
            with self.client(port) as c:
                c.flushall()
                c.script_flush()

    def replica_of(self, master_port: int) -> int:
        """A replica of that master, asked from the replicas' side (their own INFO is
        authoritative; the master's view of its replicas arrives by gossip)."""
        for port in self.live:
            with self.client(port) as c:
                info = c.info("replication")
            if info.get("role") == "slave" and int(info.get("master_port", 0)) == master_port:
                return port
        raise LookupError(master_port)

    def promote(self, replica_port: int) -> None:
        """A manual failover (CLUSTER FAILOVER TAKEOVER on the replica): the replica
        takes over its master's slots and the old master becomes its replica."""
        for attempt in range(3):
            with self.client(replica_port) as c:
                # TAKEOVER: no handshake with the old master and no election (the
                # coordinated form is often abandoned on a busy machine after its 5 s
                # timeout, and an election takes seconds more); the caller has made sure
                # (WAIT) that the replica holds every write.
                c.execute_command("CLUSTER", "FAILOVER", "TAKEOVER")
            try:
                _wait(lambda: self._role(replica_port) == "master", "replica promoted", 5.0)
                break
            except RuntimeError:
                if attempt == 2:
                    raise
        with self.client(replica_port) as c:
            slots = [int(r[0]) for r in c.execute_command("CLUSTER", "SLOTS")]
        mine = next(s for s in slots if self.owner_of_slot(s, via=replica_port) == replica_port)

        def agreed() -> bool:
            return all(self.owner_of_slot(mine, via=p) == replica_port for p in self.live)

        # The new owner broadcasts once; a node whose bus link was being re-made at that
        # moment (a loaded machine) learns it from the regular pings, which reach every
        # node at least every node_timeout / 2 (30 s here). Seen once in CI: 15 s was not
        # enough.
        wait = max(15.0, self.node_timeout_ms / 2000 + 5.0)
        try:
            _wait(agreed, "every node sees the new owner", wait)
        except RuntimeError as exc:
            views = {p: self.owner_of_slot(mine, via=p) for p in self.live}
            raise RuntimeError(f"{exc}; slot {mine} owner as each node sees it: {views}") from None

    def owner_of_slot(self, slot: int, *, via: int) -> int:
        """Port of the master serving `slot` as node `via` sees it (-1: none right now)."""
        with self.client(via) as c:
            for start, end, primary, *_ in c.execute_command("CLUSTER", "SLOTS"):
                if int(start) <= slot <= int(end):
                    return int(primary[1])
        return -1

    @property
    def live(self) -> list[int]:
        return [p for p in self.ports if p not in self.down]

    def owner_of(self, key: str, *, via: int | None = None) -> int:
        """Port of the master serving `key`'s slot (as node `via` sees it)."""
        with self.client(self.live[0] if via is None else via) as c:
            slot = int(c.execute_command("CLUSTER", "KEYSLOT", key))
            for start, end, primary, *_ in c.execute_command("CLUSTER", "SLOTS"):
                if int(start) <= slot <= int(end):
                    return int(primary[1])
        raise LookupError(slot)

    def freeze(self, port: int) -> None:
        """SIGSTOP the node: it keeps its sockets (the kernel still accepts connections)
        but answers nothing, like a frozen VM. stop() kills it as usual."""
        self.procs[self.ports.index(port)].send_signal(signal.SIGSTOP)
        self.down.add(port)

    def kill(self, port: int) -> None:
        proc = self.procs[self.ports.index(port)]
        proc.kill()
        proc.wait()
        self.down.add(port)


class SentinelServers(_Servers):
    SERVICE = "mymaster"

    def __init__(self) -> None:
        super().__init__("edge-sentinel-")
        self.master_port = free_port()
        self.replica_port = free_port()
        self.sentinel_port = free_port()
        while len({self.master_port, self.replica_port, self.sentinel_port}) < 3:
            self.replica_port = free_port()
            self.sentinel_port = free_port()

    @property
    def url(self) -> str:
        return f"redis+sentinel://{HOST}:{self.sentinel_port}/{self.SERVICE}/0"

    def start(self) -> None:
        # No 5 s diskless-sync delay (the Redis 7 default) before the replica's first sync.
        self._server(self.master_port, "--repl-diskless-sync-delay", "0")
        self._server(self.replica_port, "--replicaof", HOST, str(self.master_port))
        self._wait_up(self.master_port)
        self._wait_up(self.replica_port)

        def linked() -> bool:
            with self.client(self.replica_port) as c:
                return bool(c.info("replication").get("master_link_status") == "up")

        _wait(linked, "replica in sync")
        conf = self.dir / "sentinel.conf"
        conf.write_text(
            f"port {self.sentinel_port}\n"
            f"bind {HOST}\n"
            f"dir {self.dir}\n"
            f"sentinel monitor {self.SERVICE} {HOST} {self.master_port} 1\n"
            f"sentinel down-after-milliseconds {self.SERVICE} 1000\n"
            f"sentinel failover-timeout {self.SERVICE} 5000\n"
        )
        self._spawn(str(conf), "--sentinel")
        self._wait_up(self.sentinel_port)

        def knows_replica() -> bool:
            with self.client(self.sentinel_port) as c:
                return bool(c.execute_command("SENTINEL", "REPLICAS", self.SERVICE))

        _wait(knows_replica, "sentinel knows the replica")

    def master(self) -> int:
        with self.client(self.sentinel_port) as c:
            _host, port = c.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.SERVICE)
            return int(port)

    def failover(self, *, freeze: bool = False) -> int:
        """Kill the master (a crash; with `freeze`, SIGSTOP it: a frozen VM that keeps its
        connections open and never answers), have the sentinel promote the replica
        (SENTINEL FAILOVER, instead of waiting out down-after-milliseconds), and wait
        until the replica is the writable master; returns its port."""
        old = self.master()
        with self.client(old) as c:
            # Every write so far reached the replica before the crash.
            c.execute_command("WAIT", 1, 2000)
        proc = self.procs[0]  # the master, started first
        if freeze:
            proc.send_signal(signal.SIGSTOP)
        else:
            proc.kill()
            proc.wait()

        def started() -> bool:
            with self.client(self.sentinel_port) as c:
                try:
                    c.execute_command("SENTINEL", "FAILOVER", self.SERVICE)
                except redis.ResponseError as exc:
                    # The sentinel has not yet had a fresh INFO from the replica.
                    if "NOGOODSLAVE" in str(exc):
                        return False
                    raise
                return True

        _wait(started, "sentinel accepting the failover")
        _wait(lambda: self.master() != old, "sentinel failover")
        new = self.master()

        def writable() -> bool:
            with self.client(new) as c:
                return bool(c.info("replication").get("role") == "master")

        _wait(writable, "new master writable")

        return new

    def flush(self) -> None:
        with self.client(self.master()) as c:
            c.flushall()


async def _bench(rounds: int = 2000, batch: int = 32) -> None:
    """Latency of one script call and of a batch of `batch` calls (`run_many`), on one
    server, on the cluster and via Sentinel. `python -m tests.redis_cluster`."""
    import statistics

    from gateway.policies.ratelimit.policy import GCRA
    from gateway.store import Store
    from gateway.store.redis import RedisStore

    single = _Servers("edge-bench-")
    port = free_port()
    single._server(port)
    single._wait_up(port)
    cluster = RedisClusterServers()
    sentinel = SentinelServers()
    try:
        cluster.start()
        sentinel.start()
        for name, url in (
            ("redis://", f"redis://{HOST}:{port}/0"),
            ("redis+cluster://", cluster.url),
            ("redis+sentinel://", sentinel.url),
        ):
            s = RedisStore(url, "b:", timeout=1)
            await s.start()
            one: list[float] = []
            many: list[float] = []
            for i in range(rounds):
                t0 = time.perf_counter()
                await s.run(GCRA, [f"rl:{Store.tag(str(i % 64))}:k"], [1, 1_000_000])
                one.append(time.perf_counter() - t0)
            calls = [([f"rl:{Store.tag(str(j))}:k"], [1, 1_000_000]) for j in range(batch)]
            for _ in range(rounds // 10):
                t0 = time.perf_counter()
                await s.run_many(GCRA, calls)
                many.append(time.perf_counter() - t0)
            await s.close()
            print(
                f"{name:18} run p50 {statistics.median(one) * 1e6:6.0f} us   "
                f"run_many({batch}) p50 {statistics.median(many) * 1e6:6.0f} us "
                f"({statistics.median(many) / batch * 1e6:4.0f} us/call)"
            )
    finally:
        single.stop()
        cluster.stop()
        sentinel.stop()


if __name__ == "__main__":
    import asyncio

    asyncio.run(_bench())
