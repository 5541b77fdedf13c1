"""The server's ceiling on the shed path: what a do-nothing ASGI app costs under uvicorn.

Issue 20 asks for the shed path at >= 0.35 x nginx `proxy_pass`. Before tuning the
gateway towards that figure, this measures how much of it the ASGI server alone leaves:
an app that reads the request body and answers a fixed ~30-byte JSON 200, with no routing,
no auth and no store, served

- `uvicorn`: by uvicorn itself (httptools, uvloop, access log off), and
- `edge-protocol`: by the gateway's own uvicorn setup (gateway/server.py's config:
  `EdgeHttpProtocol` with its head limits and write corking), and
- `granian` (with `--granian`, when it is installed: `.venv/bin/pip install granian`, not
  a project dependency): the Rust server's ASGI interface, one worker, uvloop, its
  default runtime, logging off,

against nginx `proxy_pass` to a static upstream, with the same wrk script as
bench/heartbeat.py (POST pings with a bearer token, 1,000 viewers). Rounds alternate
between the targets so each sees the same load on average; it prints the median and
spread of requests/s at 50 connections, CPU per request, and the ratio to nginx computed
within each round.

    .venv/bin/python bench/ceiling.py            # ~1 min
    .venv/bin/python bench/ceiling.py --granian  # with granian as a third server
    .venv/bin/python bench/ceiling.py --serve PORT edge-protocol   # (internal) one target
"""

from __future__ import annotations

import argparse
import contextlib
import operator
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    ROOT,
    free_port,
    interleave,
    nginx_proxy,
    per_round,
    print_spread,
    require_tools,
    run_wrk,
    static_upstream,
    uptime,
    wait_port,
)
from heartbeat import PATH, wrk_script

BODY = b'{"ok":true,"at":"edge"}'


async def bare_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Read the body, answer a fixed JSON 200: the least an ASGI handler can do."""
    if scope["type"] != "http":
        return
    more = True
    while more:
        more = (await receive()).get("more_body", False)
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(BODY)).encode()),
        (b"cache-control", b"no-store"),
    ]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": BODY})


def serve(port: int, kind: str) -> None:
    import uvicorn

    if kind == "uvicorn":
        uvicorn.run(
            bare_app,
            host="127.0.0.1",
            port=port,
            loop="uvloop",
            http="httptools",
            access_log=False,
            log_level="warning",
        )
        return
    from gateway.config import GatewayConfig
    from gateway.server import _new_loop, _uvicorn_config

    cfg = GatewayConfig.model_validate(
        {
            "server": {"listen": f"127.0.0.1:{port}"},
            "upstreams": {"app": {"url": "http://127.0.0.1:9"}},
            "routes": [{"name": "all", "match": {"path": "/{p:path}"}, "upstream": "app"}],
        }
    )
    server = uvicorn.Server(_uvicorn_config(bare_app, "127.0.0.1", port, cfg, lifespan="off"))
    with __import__("asyncio").Runner(loop_factory=_new_loop) as runner:
        runner.run(server.serve())


def _command(kind: str, port: int) -> tuple[list[str], Path]:
    """How to start one target, and where (granian imports the app from bench/)."""
    if kind != "granian":
        return [sys.executable, __file__, "--serve", str(port), kind], ROOT
    # One worker process with granian's default runtime (a single-threaded runtime,
    # `--runtime-mode st --runtime-threads 1`, cost more CPU a request here, not less);
    # the CPU per request counts all of the process's threads.
    return [
        *(sys.executable, "-m", "granian", "--interface", "asgi", "--loop", "uvloop"),
        *("--http", "1", "--workers", "1"),
        *("--no-log", "--host", "127.0.0.1", "--port", str(port), "ceiling:bare_app"),
    ], ROOT / "bench"


@contextlib.contextmanager
def target(kind: str) -> Iterator[tuple[str, int]]:
    port = free_port()
    cmd, cwd = _command(kind, port)
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL)
    try:
        wait_port(port, proc=proc)
        yield f"http://127.0.0.1:{port}", proc.pid
    finally:
        proc.terminate()
        proc.wait(10)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--seconds", type=float, default=4)
    p.add_argument("--granian", action="store_true", help="also serve it with granian")
    p.add_argument("--serve", nargs=2, metavar=("PORT", "KIND"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        serve(int(args.serve[0]), args.serve[1])
        return 0
    require_tools()
    print(f"ceiling bench — {uptime()}", flush=True)
    with contextlib.ExitStack() as stack:
        up = stack.enter_context(static_upstream())
        px = stack.enter_context(nginx_proxy(up.url))
        targets = {"nginx": (px.url, px.proc.pid)}
        kinds = ("uvicorn", "edge-protocol", *(("granian",) if args.granian else ()))
        for kind in kinds:
            targets[kind] = stack.enter_context(target(kind))
        script = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "ping.lua"
        wrk_script(script)
        for url, _ in targets.values():
            run_wrk(url + PATH, 50, 2, 2, script=script)

        def measure(url: str, pid: int) -> dict[str, float]:
            res = run_wrk(url + PATH, 50, 2, args.seconds, cpu_pid=pid, script=script)
            return {"rps_c50": res.rps, "cpu_us_c50": res.cpu_us_per_request or 0.0}

        rows = interleave(targets, args.rounds, measure)
    for name in kinds:
        rows[name]["ratio"] = per_round(
            rows[name]["rps_c50"], rows["nginx"]["rps_c50"], operator.truediv
        )
    print(f"after — {uptime()}  ({args.rounds} rounds of {args.seconds:g} s, wrk -t2 -c50)")
    print_spread(rows, 14, 11)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
