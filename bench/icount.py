"""Instructions per request: a deterministic A/B for changes too small for wrk to see.

On this 2-core VM, requests/s and CPU per request move by ±10 % between runs of the same
code (bench/ab.py's rounds), so a change worth 1-5 % cannot be told from noise that way.
This script counts the user-space instructions one request costs instead, which does not
depend on what else the machine runs: the whole request path (the gateway's
`EdgeHttpProtocol` with uvicorn's parser callbacks and request cycle, and the Gateway
app with its route chain, store and access log) runs in one process, driven by
`--concurrency` in-memory connections that each send their next request as soon as the
previous response is complete (no sockets between the client and the gateway, so no
syscalls or kernel time in the count; the Redis store and the upstream are real).

It runs the drive twice under `valgrind --tool=cachegrind --cache-sim=no` (`--requests`
and three times as many) and reports (I2 - I1) / (2 x requests): start-up, imports and
the warm-up cancel out. Two runs of the same tree agree within about 0.5 % on passthrough;
the shed path's counts spread 1-3 % (its batches depend on timing), so compare means of
`--runs 2` or more. A drive that gets 4xx/5xx answers is refused (a broken build answers
fast and would count low).

Workloads:
  shed         bench/heartbeat.py's presence ping (verified HS256 token, 1,000 viewers,
               heartbeat absorbed), on `--store` (memory:// or a Redis URL); the
               viewers watch `--webinars` webinars (default 1)
  passthrough  bench/passthrough.py's catch-all with `--auth optional` (no token), to a
               static nginx upstream
  asgi         the shed workload's requests answered by bench/ceiling.py's do-nothing
               ASGI app (read the body, a fixed 200) under the same protocol: the
               server's own share

    apt-get install valgrind            # not a project dependency
    .venv/bin/python bench/icount.py shed --store redis://127.0.0.1:6379/12
    .venv/bin/python bench/icount.py passthrough --baseline /tmp/base   # another tree
    .venv/bin/python bench/icount.py shed --drive 2000                  # (internal) one drive
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

ROOT = Path(__file__).resolve().parent.parent
WARMUP = 3000  # requests before counting: every viewer forwarded once, caches filled


class _Transport:
    """What the protocol writes to: hands every write to its connection."""

    def __init__(self, conn: _Conn) -> None:
        self.conn = conn
        self.closing = False

    def write(self, data: bytes) -> None:
        self.conn.received(data)

    def writelines(self, chunks: Any) -> None:
        self.conn.received(b"".join(chunks))

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 8080)}.get(
            name, default
        )

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0


class _Drive:
    """`concurrency` keep-alive connections, each sending its next request (round-robin
    over `requests`) when the previous response is complete."""

    def __init__(self, proto_factory: Any, requests: list[bytes], concurrency: int) -> None:
        self.requests = requests
        self.loop = asyncio.get_running_loop()
        self.conns = [_Conn(self, proto_factory()) for _ in range(concurrency)]
        self.sent = self.done = self.target = 0
        # Error answers (4xx/5xx) counted: a broken build answers fast and counts low.
        self.errors = 0
        self.finished: asyncio.Future[None] = self.loop.create_future()

    async def run(self, n: int) -> None:
        self.sent, self.done, self.target = 0, 0, n
        self.finished = self.loop.create_future()
        for conn in self.conns:
            conn.send()
        await self.finished

    def next_request(self) -> bytes:
        req = self.requests[self.sent % len(self.requests)]
        self.sent += 1
        return req

    def complete(self, conn: _Conn) -> None:
        self.done += 1
        if self.sent < self.target:
            self.loop.call_soon(conn.send)
        elif self.done >= self.target and not self.finished.done():
            self.finished.set_result(None)


class _Conn:
    def __init__(self, drive: _Drive, proto: Any) -> None:
        self.drive = drive
        self.proto = proto
        self.buf = b""
        proto.connection_made(_Transport(self))

    def send(self) -> None:
        self.proto.data_received(self.drive.next_request())

    def received(self, data: bytes) -> None:
        # Responses here are small and Content-Length framed.
        self.buf += data
        head, sep, rest = self.buf.partition(b"\r\n\r\n")
        if not sep:
            return
        m = re.search(rb"(?im)^content-length:\s*(\d+)", head)
        length = int(m.group(1)) if m else 0
        if len(rest) >= length:
            self.buf = rest[length:]
            if head[9:10] in (b"4", b"5"):  # b"HTTP/1.1 4.."
                self.drive.errors += 1
            self.drive.complete(self)


def _requests(workload: str, webinars: int) -> list[bytes]:
    # asgi: the shed workload's pings, answered by a do-nothing app.
    if workload == "passthrough":
        return [b"GET /api/items/42 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: icount\r\n\r\n"]
    import heartbeat as hb

    out = []
    for i in range(hb.VIEWERS):
        token = hb.token(f"00000000-0000-4000-8000-{i:012d}")
        path = hb.ping_path(i, webinars)
        out.append(
            (
                f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
                f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
                "Content-Length: 2\r\n\r\n{}"
            ).encode()
        )
    return out


def _config(workload: str, store: str, upstream: str) -> dict[str, Any]:
    if workload == "passthrough":
        import passthrough

        cfg: dict[str, Any] = passthrough._config(upstream, True, "optional")
    else:
        import heartbeat as hb

        cfg = hb.hb_config(upstream, store)
        if not store.startswith("redis"):
            cfg["store"] = {"url": store}
        cfg["server"]["access_log"] = True
    return cfg


async def _drive(args: argparse.Namespace) -> None:
    from uvicorn.server import ServerState

    from gateway.app import create_app
    from gateway.config import parse_config
    from gateway.protocol import EdgeHttpProtocol
    from gateway.server import GC_YOUNG_THRESHOLD, _uvicorn_config

    logging.disable(logging.CRITICAL)
    cfg = parse_config(json.dumps(_config(args.workload, args.store, args.upstream)))
    if args.workload == "asgi":
        from ceiling import bare_app

        app: Any = bare_app
    else:
        app = create_app(cfg)
        stop = await _start(app)
    config = _uvicorn_config(app, "127.0.0.1", 8080, cfg, lifespan="off")
    config.load()
    state = ServerState()
    drive = _Drive(
        lambda: EdgeHttpProtocol(config, state, {}),
        _requests(args.workload, args.webinars),
        args.concurrency,
    )
    await drive.run(WARMUP)
    # As gateway/server.py does after start-up.
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    drive.errors = 0
    t0 = time.process_time()
    await drive.run(args.drive)
    cpu = time.process_time() - t0
    print(f"drive: {args.drive} requests, {1e6 * cpu / args.drive:.1f} us CPU each", flush=True)
    if args.workload != "asgi":
        await stop()
    if drive.errors and not args.allow_errors:
        raise SystemExit(f"{drive.errors} error answers: the count would not be of the workload")


async def _start(app: Any) -> Any:
    """Run the gateway's lifespan start-up; returns the call that shuts it down."""
    to_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    from_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    task = asyncio.ensure_future(app({"type": "lifespan"}, to_app.get, from_app.put))
    await to_app.put({"type": "lifespan.startup"})
    started = await from_app.get()
    if started["type"] != "lifespan.startup.complete":
        raise SystemExit(f"gateway did not start: {started}")

    async def stop() -> None:
        await to_app.put({"type": "lifespan.shutdown"})
        await from_app.get()
        await task

    return stop


def _instructions(tree: Path, args: argparse.Namespace, n: int) -> int:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [
        "valgrind",
        "--tool=cachegrind",
        "--cache-sim=no",
        "--cachegrind-out-file=/dev/null",
        args.python,
        str(Path(__file__).resolve()),
        args.workload,
        "--store",
        args.store,
        "--upstream",
        args.upstream,
        "--concurrency",
        str(args.concurrency),
        "--webinars",
        str(args.webinars),
        "--drive",
        str(n),
    ]
    if args.allow_errors:
        cmd.append("--allow-errors")
    out = subprocess.run(cmd, env=env, cwd=tree, capture_output=True, text=True, check=False)
    m = re.search(r"I\s+refs:\s+([\d,]+)", out.stderr)
    if out.returncode != 0 or m is None:
        raise SystemExit(f"drive failed in {tree}:\n{out.stdout}\n{out.stderr[-2000:]}")
    return int(m.group(1).replace(",", ""))


def _per_request(tree: Path, args: argparse.Namespace) -> float:
    n = args.requests
    low = _instructions(tree, args, n)
    high = _instructions(tree, args, 3 * n)
    return (high - low) / (2 * n)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("workload", choices=("shed", "passthrough", "asgi"))
    p.add_argument("--store", default="memory://", help="shed: memory:// or a Redis URL")
    p.add_argument("--baseline", type=Path, help="also count the gateway package of this tree")
    p.add_argument("--requests", type=int, default=2000, help="requests of the short drive")
    p.add_argument("--concurrency", type=int, default=50, help="client connections")
    p.add_argument("--webinars", type=int, default=1, help="shed: webinars the viewers watch")
    p.add_argument("--runs", type=int, default=1, help="counts per tree")
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--upstream", default="", help=argparse.SUPPRESS)
    p.add_argument("--drive", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--allow-errors", action="store_true", help="count drives with 4xx/5xx answers")
    args = p.parse_args(argv)
    if args.drive:
        import uvloop

        uvloop.run(_drive(args))
        return 0
    if shutil.which("valgrind") is None:
        print("needs valgrind (Debian: apt-get install valgrind)", file=sys.stderr)
        return 1
    from common import static_upstream

    trees = [("this tree", ROOT)]
    if args.baseline is not None:
        trees.append(("baseline", args.baseline.resolve()))
    with static_upstream() as up:
        args.upstream = up.url
        counts: dict[str, list[float]] = {name: [] for name, _ in trees}
        for _ in range(args.runs):
            for name, tree in trees:
                counts[name].append(_per_request(tree, args))
    label = args.workload + (f" ({args.store})" if args.workload == "shed" else "")
    print(f"instructions per request, {label}:")
    for name, values in counts.items():
        print(f"  {name:10} " + "  ".join(f"{v:,.0f}" for v in values))
    if args.baseline is not None:
        mine, base = counts["this tree"], counts["baseline"]
        delta = sum(mine) / len(mine) / (sum(base) / len(base)) - 1
        print(f"  this tree against baseline: {delta:+.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
