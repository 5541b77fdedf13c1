"""Fault bench (issue 15): Redis frozen, then killed and restarted, under heartbeat load.

500 viewers (each with its own HS256 token) ping `POST /api/webinars/{id}/presence/ping`
once a second through the gateway (`python -m gateway`, 1 worker, Redis store of the
bench's own, default `store.timeout: 50ms`). After a healthy phase Redis is SIGSTOPped
for 10 s (a hung VM: connections accepted, never answered), then SIGKILLed and started
again empty, and the load goes on. Counted: every client answer's status and latency
by phase, and every ping that reached the app (an in-process aiohttp app). Run once per
`store.on_failure` mode:

    .venv/bin/python bench/store_fault.py                  # local and open
    .venv/bin/python bench/store_fault.py --modes local --viewers 500 --freeze 10

Targets (issue 15): every answer 2xx, the app receives <= 2 x viewers pings in total,
added latency <= store.timeout + 10 ms. Results: bench/results/store_fault.json.

`--cpu` runs the CPU-pressure case instead: Redis healthy, `--busy` (4) processes
spinning on the CPUs, `wrk -t2 -c50` for `--duration` (60 s) rotating over the viewers'
tokens, `on_failure: closed` in front of a static nginx app. Targets: 0 503s (the store
was fine), heartbeat forwards <= 1.05 x viewers. Results:
bench/results/store_cpu_pressure.json. Needs /usr/bin/wrk and /usr/sbin/nginx.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    LOOPBACK,
    ROOT,
    free_port,
    gateway,
    http_get,
    run_header,
    run_wrk,
    static_upstream,
    uptime,
    wait_port,
)

SECRET = "store-fault-bench-secret-with-at-least-32-chars"  # noqa: S105 - a bench key
ISSUER = "http://bench.test/auth/v1"
WEBINAR = "5b1f0000-0000-4000-8000-000000000001"
PATH = f"/api/webinars/{WEBINAR}/presence/ping"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def token(i: int) -> str:
    now = int(time.time())
    head = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    claims = {
        "iss": ISSUER,
        "aud": "authenticated",
        "sub": f"00000000-0000-4000-8000-{i:012d}",
        "role": "authenticated",
        "exp": now + 3600,
        "iat": now,
    }
    body = _b64(json.dumps(claims).encode())
    sig = hmac.new(SECRET.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{_b64(sig)}"


class Redis:
    """A redis-server of the bench's own: frozen, killed and restarted on the same port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="bench-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        exe = shutil.which("redis-server") or "redis-server"
        args = [exe, "--port", str(self.port), "--bind", LOOPBACK, "--save", ""]
        args += ["--appendonly", "no", "--dir", self.dir]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port, 5.0, self.proc)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


def config(app_url: str, redis_port: int, mode: str) -> dict[str, Any]:
    return {
        "server": {
            "listen": f"{LOOPBACK}:{free_port()}",
            "admin_listen": f"{LOOPBACK}:{free_port()}",
            # The gateway's own time per request (duration_ms), free of client stalls.
            "access_log": True,
            "log_level": "info",
            "drain_timeout": "2s",
        },
        "store": {"url": f"redis://{LOOPBACK}:{redis_port}/0", "on_failure": mode},
        "upstreams": {"app": {"url": app_url}},
        "auth": {"issuer": ISSUER, "audience": "authenticated", "hs256_secret": SECRET},
        "routes": [
            {
                "name": "presence_ping",
                "match": {"methods": ["POST"], "path": "/api/webinars/{webinar_id}/presence/ping"},
                "upstream": "app",
                "auth": "required",
                "heartbeat": {"forward_interval": "300s"},
            }
        ],
    }


async def start_app(counts: Counter[str]) -> tuple[web.AppRunner, str]:
    async def ping(request: web.Request) -> web.Response:
        await request.read()
        counts["pings"] += 1
        return web.json_response({"success": True})

    app = web.Application()
    app.router.add_post("/api/webinars/{w}/presence/ping", ping)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, LOOPBACK, port).start()
    return runner, f"http://{LOOPBACK}:{port}"


def phase_of(t: float, healthy: float, freeze: float) -> str:
    if t < healthy:
        return "healthy"
    if t < healthy + freeze:
        return "frozen"
    return "restarted"


def pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


async def load(
    url: str, viewers: int, duration: float, on_tick: list[tuple[float, Any]], wall0: list[float]
) -> list[tuple[float, int, float]]:
    """Each viewer pings once a second (viewers spread evenly over the second) until
    `duration`; `on_tick` runs the fault actions at their times. Returns (t, status,
    latency) per request; status 0 = no answer."""
    tokens = [token(i) for i in range(viewers)]
    out: list[tuple[float, int, float]] = []
    t0 = time.monotonic()
    wall0.append(time.time())
    conn = aiohttp.TCPConnector(limit=256)
    async with aiohttp.ClientSession(connector=conn) as s:

        async def viewer(i: int) -> None:
            headers = {"Authorization": f"Bearer {tokens[i]}"}
            n = 0
            while True:
                due = t0 + n + i / viewers
                if due - t0 >= duration:
                    return
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                start = time.monotonic()
                try:
                    async with s.post(url, data=b"{}", headers=headers, timeout=10) as r:
                        await r.read()
                        status = r.status
                except (aiohttp.ClientError, TimeoutError):
                    status = 0
                out.append((start - t0, status, time.monotonic() - start))
                n += 1

        async def faults() -> None:
            for at, action in on_tick:
                await asyncio.sleep(max(0.0, t0 + at - time.monotonic()))
                action()

        await asyncio.gather(faults(), *(viewer(i) for i in range(viewers)))
    return out


async def run_mode(mode: str, viewers: int, healthy: float, freeze: float, after: float) -> Any:
    counts: Counter[str] = Counter()
    runner, app_url = await start_app(counts)
    redis = Redis()
    redis.start()
    try:
        with gateway(config(app_url, redis.port, mode)) as gw:

            def restart() -> None:
                redis.kill()  # SIGKILL of the stopped server: its data is gone
                redis.start()

            ticks = [
                (healthy, lambda: redis.signal(signal.SIGSTOP)),
                (healthy + freeze, restart),
            ]
            wall0: list[float] = []
            rows = await load(gw.url + PATH, viewers, healthy + freeze + after, ticks, wall0)
            async with aiohttp.ClientSession() as s, s.get(gw.admin_url + "/metrics") as r:
                metrics = await r.text()
            log = (gw.workdir / "gateway.log").read_text()
    finally:
        redis.kill()
        await runner.cleanup()
    server = [
        (doc["ts"] - wall0[0], doc["duration_ms"])
        for doc in map(json.loads, filter(lambda ln: '"gateway.access"' in ln, log.splitlines()))
    ]
    summary = summarize(mode, viewers, healthy, freeze, rows, counts["pings"], metrics, log)
    summary["gateway_phases"] = gateway_phases(server, healthy, freeze)
    return summary


def gateway_phases(
    server: list[tuple[float, float]], healthy: float, freeze: float
) -> dict[str, Any]:
    """Per phase, the gateway's own request durations (access log, written at the end
    of each request, so a request is placed by when it ended)."""
    out: dict[str, Any] = {}
    for name in ("healthy", "frozen", "restarted"):
        # The first second is every viewer's first (forwarded) heartbeat: not a baseline.
        lats = [ms for t, ms in server if phase_of(t, healthy, freeze) == name and t >= 1.0]
        out[name] = {
            "requests": len(lats),
            "p50_ms": round(pct(lats, 0.50), 2),
            "p99_ms": round(pct(lats, 0.99), 2),
            "p999_ms": round(pct(lats, 0.999), 2),
            "max_ms": round(max(lats, default=0.0), 2),
        }
    out["per_second"] = [
        [sec, round(pct(v, 0.5), 1), round(pct(v, 0.99), 1), round(max(v, default=0), 1)]
        for sec in range(int(max((t for t, _ in server), default=0)) + 1)
        if (v := [ms for t, ms in server if sec <= t < sec + 1])
    ]
    return out


def summarize(
    mode: str,
    viewers: int,
    healthy: float,
    freeze: float,
    rows: list[tuple[float, int, float]],
    app_pings: int,
    metrics: str,
    log: str,
) -> dict[str, Any]:
    phases: dict[str, Any] = {}
    for name in ("healthy", "frozen", "restarted"):
        sel = [(st, lat) for t, st, lat in rows if phase_of(t, healthy, freeze) == name]
        lats = [lat * 1000 for _, lat in sel]
        phases[name] = {
            "requests": len(sel),
            "non_2xx": sum(1 for st, _ in sel if not 200 <= st < 300),
            "p50_ms": round(pct(lats, 0.50), 2),
            "p99_ms": round(pct(lats, 0.99), 2),
            "max_ms": round(max(lats, default=0.0), 2),
        }
    seconds: list[dict[str, float]] = []
    for sec in range(int(max((t for t, _, _ in rows), default=0)) + 1):
        lats = [lat * 1000 for t, _, lat in rows if sec <= t < sec + 1]
        seconds.append(
            {
                "t": sec,
                "n": len(lats),
                "p50": round(pct(lats, 0.5), 1),
                "p99": round(pct(lats, 0.99), 1),
            }
        )
    base = phases["healthy"]["p50_ms"]
    outcomes = {
        line.split('outcome="', 1)[1].split('"', 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("edge_heartbeats_total{")
    }
    return {
        "mode": mode,
        "viewers": viewers,
        "requests": len(rows),
        "non_2xx": sum(1 for _, st, _ in rows if not 200 <= st < 300),
        "app_pings": app_pings,
        "app_pings_per_viewer": round(app_pings / viewers, 2),
        "added_p99_ms": round(max(phases[p]["p99_ms"] for p in phases) - base, 2),
        "phases": phases,
        "per_second_ms": seconds,
        "gateway_outcomes": outcomes,
        "store_log_lines": [
            json.loads(ln)
            for ln in log.splitlines()
            if ln.startswith("{") and '"logger":"gateway.store"' in ln.replace(" ", "")
        ],
        "gateway_duration_buckets": {
            line.split('le="', 1)[1].split('"', 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith("edge_request_duration_seconds_bucket{")
        },
    }


def wrk_script(path: Path, viewers: int) -> None:
    """POST the ping, rotating over `viewers` valid tokens."""
    tokens = ",\n".join(f'"{token(i)}"' for i in range(viewers))
    path.write_text(
        f"""
local tokens = {{
{tokens}
}}
local n = #tokens
local i = 0
request = function()
  i = i + 1
  return wrk.format("POST", "{PATH}", {{
    ["Authorization"] = "Bearer " .. tokens[(i % n) + 1],
    ["Content-Type"] = "application/json",
  }}, "{{}}")
end
"""
    )


def watch_lag(admin_url: str, lags: list[float], stop: threading.Event) -> None:
    """edge_event_loop_lag_seconds (worst of the last second) once a second."""
    while not stop.wait(1.0):
        with contextlib.suppress(OSError):
            _, body = http_get(admin_url + "/metrics", 2.0)
            for line in body.decode().splitlines():
                if line.startswith("edge_event_loop_lag_seconds "):
                    lags.append(float(line.split()[1]))


def cpu_pressure(mode: str, viewers: int, duration: float, busy: int) -> dict[str, Any]:
    """Redis healthy, `busy` processes spinning on the CPUs, wrk -t2 -c50 for
    `duration` with `viewers` rotating tokens. Wrong answers: any 503 (the store was
    fine), any forward beyond each viewer's first."""
    redis = Redis()
    redis.start()
    spinners: list[subprocess.Popen[bytes]] = []
    lags: list[float] = []
    workdir = Path(tempfile.mkdtemp(prefix="bench-cpu-"))
    script = workdir / "ping.lua"
    wrk_script(script, viewers)
    try:
        with static_upstream() as app, gateway(config(app.url, redis.port, mode)) as gw:
            code = "while True: pass"
            spinners = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(busy)]
            stop = threading.Event()
            watcher = threading.Thread(target=watch_lag, args=(gw.admin_url, lags, stop))
            watcher.start()
            try:
                result = run_wrk(gw.url, 50, 2, duration, script=script, cpu_pid=gw.proc.pid)
            finally:
                stop.set()
                watcher.join()
            _, body = http_get(gw.admin_url + "/metrics")
    finally:
        for proc in spinners:
            proc.kill()
            proc.wait()
        redis.kill()
    metrics = body.decode()

    def total(prefix: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for line in metrics.splitlines():
            if line.startswith(prefix + "{"):
                labels, value = line.rsplit(" ", 1)
                out[labels[len(prefix) :]] = out.get(labels[len(prefix) :], 0) + float(value)
        return out

    hb = {
        k.split('outcome="', 1)[1].split('"', 1)[0]: v
        for k, v in total("edge_heartbeats_total").items()
    }
    forwards = hb.get("forwarded", 0) + hb.get("local_forwarded", 0) + hb.get("failed_open", 0)
    return {
        "mode": mode,
        "viewers": viewers,
        "busy_processes": busy,
        "wrk": result.as_dict(),
        "non_2xx": result.errors,
        "heartbeat_outcomes": hb,
        "forwards": forwards,
        "forwards_per_viewer": round(forwards / viewers, 3),
        "store_errors": total("edge_store_errors_total"),
        "loop_lag_s_max_of_1s_samples": max(lags, default=None),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    ap.add_argument("--modes", default="local,open")
    ap.add_argument("--viewers", type=int, default=500)
    ap.add_argument("--healthy", type=float, default=5.0)
    ap.add_argument("--freeze", type=float, default=10.0)
    ap.add_argument("--after", type=float, default=10.0)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "store_fault.json"))
    ap.add_argument("--cpu", action="store_true", help="the CPU-pressure run instead")
    ap.add_argument("--duration", type=float, default=60.0, help="--cpu: wrk seconds")
    ap.add_argument("--busy", type=int, default=4, help="--cpu: spinning processes")
    args = ap.parse_args()
    started, load_before = time.time(), uptime()
    if args.cpu:
        out = Path(args.out).with_name("store_cpu_pressure.json")
        r = cpu_pressure("closed", args.viewers, args.duration, args.busy)
        print(json.dumps(r, indent=2))
        header = run_header("store_fault", None, started, load_before, uptime())
        out.write_text(json.dumps({**header, "runs": [r]}, indent=2) + "\n")
        return
    runs: list[dict[str, Any]] = []
    for mode in args.modes.split(","):
        r = asyncio.run(run_mode(mode, args.viewers, args.healthy, args.freeze, args.after))
        runs.append(r)
        print(
            f"{mode:>6}: {r['requests']} answers, {r['non_2xx']} non-2xx, app got "
            f"{r['app_pings']} pings ({r['app_pings_per_viewer']} per viewer), "
            f"gateway-side latency by phase {json.dumps(r['gateway_phases'])}"
        )
    header = run_header("store_fault", None, started, load_before, uptime())
    Path(args.out).write_text(json.dumps({**header, "runs": runs}, indent=2) + "\n")


if __name__ == "__main__":
    main()
