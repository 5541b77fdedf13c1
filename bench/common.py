"""Shared plumbing for the benchmarks under bench/.

Owns: finding free loopback ports, running nginx from a throw-away prefix as a child
process (never daemonised, so it dies with the bench), starting the gateway as
`python -m gateway --config <tmp>` and waiting for its /readyz, running wrk and parsing
its report (requests/s, latency percentiles from `--latency`, errors), and reading a
process tree's CPU time so a result can say how many CPU microseconds one request cost
(a figure that other load on the machine disturbs far less than requests/s).

Everything binds 127.0.0.1 only and every child is stopped on exit, with bounded waits.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

NGINX = "/usr/sbin/nginx"
WRK = "/usr/bin/wrk"
ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"
# A fixed ~100-byte JSON body: small enough that the figures measure per-request
# overhead, not copying.
UPSTREAM_BODY = json.dumps(
    {"ok": True, "service": "bench-upstream", "items": [1, 2, 3], "pad": "x" * 36},
    separators=(",", ":"),
)


class BenchError(RuntimeError):
    """A benchmark could not run (a child failed to start, wrk failed, ...)."""


def require_tools() -> None:
    """Exit non-zero with the install hint when nginx or wrk is missing."""
    missing = [p for p in (NGINX, WRK) if not os.access(p, os.X_OK)]
    if missing:
        print(
            f"missing {', '.join(missing)}; install them with:\n  apt-get install nginx-light wrk",
            file=sys.stderr,
        )
        sys.exit(3)


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A loopback TCP port nobody listens on right now (the usual bind-to-0 trick; the
    tiny race until the child binds it is acceptable for a benchmark), never one this
    process was given before: two calls in a row can otherwise return the same port,
    which made `listen` and `admin_listen` equal in one bench/profile.py run."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((LOOPBACK, 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise BenchError("no free loopback port not handed out before")


def wait_port(port: int, timeout: float = 10.0, proc: subprocess.Popen[Any] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"process exited with {proc.returncode} before port {port} opened")
        with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, port), 0.2):
            return
        time.sleep(0.05)
    raise BenchError(f"port {port} did not open within {timeout}s")


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - loopback
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


# Where a KVM guest's idle policy shows (Linux's cpuidle-haltpoll driver).
SYSFS_CPUIDLE = Path("/sys/devices/system/cpu/cpuidle/current_driver")
HALT_POLL_NS = Path("/sys/module/haltpoll/parameters/guest_halt_poll_ns")


def idle_policy(driver: Path = SYSFS_CPUIDLE, halt_poll: Path = HALT_POLL_NS) -> str:
    """What an idle CPU does here. On a VM whose guest halt polling is 0 (this project's
    machines boot with `haltpoll.guest_halt_poll_ns=0`), every idle vCPU exits to the
    hypervisor and each wake-up costs hundreds of µs: a one-connection p50 then measures
    wake-ups, not the gateway (docs/performance.md, eighth session). Linux's default is
    200000 ns; bench/halt_poll.py sets it for one command."""
    try:
        name = driver.read_text().strip()
    except OSError:
        return "cpuidle: unknown"
    try:
        return f"cpuidle: {name}, guest_halt_poll_ns={halt_poll.read_text().strip()}"
    except OSError:
        return f"cpuidle: {name}"


def uptime() -> str:
    """`uptime` output (the load averages go in every report: the figures are noisy) and
    the idle policy (which decides one-connection latencies on a VM)."""
    try:
        load = subprocess.run(
            ["uptime"], capture_output=True, text=True, timeout=5, check=False
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        load = "load average: " + " ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{load}; {idle_policy()}"


def _stop(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


# ------------------------------------------------------------------------ CPU time

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    """The pids of a process's live children (every thread's)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            out += [int(c) for c in (task / "children").read_text().split()]
    return out


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its live descendants (threads included)."""
    total = 0.0
    stack = [pid]
    while stack:
        p = stack.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # utime and stime are fields 14 and 15 of /proc/PID/stat; [0] here is field 3.
        total += (int(fields[11]) + int(fields[12])) / _CLK_TCK
        stack += children(p)
    return total


# ------------------------------------------------------------------------ nginx


@dataclass
class NginxServer:
    proc: subprocess.Popen[bytes]
    port: int
    prefix: Path

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def error_log(self) -> str:
        with contextlib.suppress(OSError):
            return (self.prefix / "error.log").read_text()[-2000:]
        return ""


def _nginx_conf(prefix: Path, server_block: str, http_extra: str = "") -> str:
    # Everything nginx writes goes under the temporary prefix; `daemon off` keeps the
    # master a child of this process so it cannot outlive the bench.
    user = "user root root;" if os.geteuid() == 0 else ""
    temp = "\n".join(
        f"    {name}_temp_path {prefix}/{name};"
        for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""
daemon off;
master_process on;
worker_processes 1;
{user}
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; multi_accept on; }}
http {{
    access_log off;
{temp}
    keepalive_requests 10000000;
    keepalive_timeout 75s;
{http_extra}
    server {{
        listen {LOOPBACK}:{{port}} reuseport backlog=4096;
{server_block}
    }}
}}
"""


@contextlib.contextmanager
def nginx(server_block: str, http_extra: str = "", name: str = "nginx") -> Iterator[NginxServer]:
    """Run nginx (1 worker) on a free loopback port with the given `server {}` body."""
    prefix = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
    port = free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(_nginx_conf(prefix, server_block, http_extra).replace("{port}", str(port)))
    proc = subprocess.Popen(
        [NGINX, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    server = NginxServer(proc, port, prefix)
    try:
        try:
            wait_port(port, 10.0, proc)
        except BenchError as exc:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise BenchError(f"{name}: {exc}\n{err}{server.error_log()}") from None
        yield server
    finally:
        # SIGQUIT: graceful; the bounded wait in _stop falls back to SIGKILL.
        _stop(proc, signal.SIGQUIT, 5.0)
        if proc.stderr:
            proc.stderr.close()
        shutil.rmtree(prefix, ignore_errors=True)


def static_upstream(body: str = UPSTREAM_BODY) -> contextlib.AbstractContextManager[NginxServer]:
    """nginx answering every request with a fixed JSON body (no disk access)."""
    escaped = body.replace("\\", "\\\\").replace("'", "\\'")
    block = f"""
        default_type application/json;
        location / {{ return 200 '{escaped}'; }}
"""
    return nginx(block, name="upstream")


def nginx_proxy(upstream_url: str) -> contextlib.AbstractContextManager[NginxServer]:
    """The anchor: nginx proxy_pass with a keepalive pool to the upstream."""
    hostport = upstream_url.split("://", 1)[1]
    http_extra = f"""
    upstream backend {{
        server {hostport};
        keepalive 64;
        keepalive_requests 10000000;
    }}
"""
    block = """
        location / {
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_buffering on;
        }
"""
    return nginx(block, http_extra, name="proxy")


# ------------------------------------------------------------------------ gateway


@dataclass
class GatewayProcess:
    proc: subprocess.Popen[bytes]
    port: int
    admin_port: int
    workdir: Path

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://{LOOPBACK}:{self.admin_port}"

    def log_tail(self, n: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return (self.workdir / "gateway.log").read_text(errors="replace")[-n:]
        return ""


def gateway_config(
    upstream_url: str, port: int, admin_port: int, *, access_log: bool = False, workers: int = 1
) -> dict[str, Any]:
    """One upstream, one catch-all route with auth off, memory store."""
    return {
        "server": {
            "listen": f"{LOOPBACK}:{port}",
            "admin_listen": f"{LOOPBACK}:{admin_port}",
            "workers": workers,
            "access_log": access_log,
            "log_level": "info",
            "drain_timeout": "2s",
        },
        "store": {"url": "memory://"},
        "upstreams": {"app": {"url": upstream_url}},
        "routes": [
            {"name": "default", "match": {"path": "/{path:path}"}, "upstream": "app", "auth": "off"}
        ],
    }


@contextlib.contextmanager
def gateway(
    config: dict[str, Any],
    python: str = sys.executable,
    ready_timeout: float = 20.0,
    cwd: Path | None = None,
) -> Iterator[GatewayProcess]:
    """Start `python -m gateway --config <tmp>` and wait until /readyz answers 200.
    `cwd` runs the gateway package of another source tree (`-m` imports from it first).

    Logs (the access log when enabled) go to a file in the temp dir: a file is what a
    deployment writes to, and an unread pipe would stall the gateway."""
    workdir = Path(tempfile.mkdtemp(prefix="bench-gateway-"))
    cfg_path = workdir / "config.yaml"
    # JSON is YAML; it spares the bench a PyYAML import.
    cfg_path.write_text(json.dumps(config, indent=2))
    port = int(config["server"]["listen"].rsplit(":", 1)[1])
    admin_port = int(config["server"]["admin_listen"].rsplit(":", 1)[1])
    log = (workdir / "gateway.log").open("wb")
    proc = subprocess.Popen(
        [python, "-m", "gateway", "--config", str(cfg_path)],
        cwd=cwd or ROOT,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
    )
    gw = GatewayProcess(proc, port, admin_port, workdir)
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            if proc.poll() is not None:
                raise BenchError(
                    f"gateway exited with {proc.returncode} during startup:\n{gw.log_tail()}"
                )
            with contextlib.suppress(OSError):
                status, _ = http_get(gw.admin_url + "/readyz", 1.0)
                if status == 200:
                    break
            if time.monotonic() > deadline:
                raise BenchError(f"gateway not ready within {ready_timeout}s:\n{gw.log_tail()}")
            time.sleep(0.1)
        yield gw
    finally:
        _stop(proc, signal.SIGTERM, 10.0)
        log.close()
        shutil.rmtree(workdir, ignore_errors=True)


# ------------------------------------------------------------------------ wrk

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
_TIME = r"([\d.]+)(us|ms|s|m|h)"
_PCT = re.compile(r"^\s+(50|75|90|99)(?:\.000)?%\s+" + _TIME + r"\s*$", re.M)
_RPS = re.compile(r"^Requests/sec:\s+([\d.]+)", re.M)
_TOTAL = re.compile(r"^\s+(\d+) requests in ([\d.]+)(us|ms|s|m|h)", re.M)
_NON2XX = re.compile(r"Non-2xx or 3xx responses:\s+(\d+)")
_SOCKERR = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_AVG = re.compile(r"^\s+Latency\s+" + _TIME, re.M)


@dataclass
class WrkResult:
    connections: int
    threads: int
    duration_s: float
    requests: int
    rps: float
    latency_ms: dict[str, float]  # "avg", "p50", "p75", "p90", "p99"
    non_2xx: int = 0
    socket_errors: dict[str, int] = field(default_factory=dict)
    cpu_us_per_request: float | None = None  # of the process under test

    @property
    def errors(self) -> int:
        return self.non_2xx + sum(self.socket_errors.values())

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["errors"] = self.errors
        return d


def parse_wrk(text: str, connections: int, threads: int) -> WrkResult:
    """Parse wrk's text report (run with `--latency`)."""
    rps = _RPS.search(text)
    total = _TOTAL.search(text)
    if not rps or not total:
        raise BenchError(f"could not parse wrk output:\n{text}")
    lat = {f"p{m.group(1)}": float(m.group(2)) * _UNITS[m.group(3)] for m in _PCT.finditer(text)}
    avg = _AVG.search(text)
    if avg:
        lat["avg"] = float(avg.group(1)) * _UNITS[avg.group(2)]
    non2xx = _NON2XX.search(text)
    sock = _SOCKERR.search(text)
    return WrkResult(
        connections=connections,
        threads=threads,
        duration_s=float(total.group(2)) * _UNITS[total.group(3)] / 1000,
        requests=int(total.group(1)),
        rps=float(rps.group(1)),
        latency_ms=lat,
        non_2xx=int(non2xx.group(1)) if non2xx else 0,
        socket_errors=(
            dict(zip(("connect", "read", "write", "timeout"), map(int, sock.groups()), strict=True))
            if sock
            else {}
        ),
    )


def run_wrk(
    url: str,
    connections: int,
    threads: int,
    duration: float,
    *,
    cpu_pid: int | None = None,
    timeout_s: float = 5.0,
    headers: dict[str, str] | None = None,
    script: Path | None = None,
) -> WrkResult:
    """Run wrk for `duration` seconds; with `cpu_pid`, also measure that process tree's
    CPU time over the run and report it per request. `headers` are sent on every
    request (-H); `script` is a wrk Lua script (-s)."""
    threads = max(1, min(threads, connections))
    cmd = [
        WRK,
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(duration))}s",
        f"--timeout={timeout_s:g}s",
        "--latency",
    ]
    for k, v in (headers or {}).items():
        cmd += ["-H", f"{k}: {v}"]
    if script is not None:
        cmd += ["-s", str(script)]
    cmd.append(url)
    cpu0 = tree_cpu_seconds(cpu_pid) if cpu_pid else 0.0
    try:
        out = subprocess.run(
            cmd, capture_output=True, text=True, timeout=duration + 30, check=False
        )
    except subprocess.TimeoutExpired:
        raise BenchError(f"wrk did not finish: {' '.join(cmd)}") from None
    cpu1 = tree_cpu_seconds(cpu_pid) if cpu_pid else 0.0
    if out.returncode != 0:
        raise BenchError(f"wrk failed ({out.returncode}): {out.stderr}{out.stdout}")
    result = parse_wrk(out.stdout, connections, threads)
    if cpu_pid and result.requests:
        result.cpu_us_per_request = round((cpu1 - cpu0) / result.requests * 1e6, 1)
    return result


def print_result(name: str, r: WrkResult, width: int = 22) -> None:
    """One line per wrk run: requests/s, p50, p99, CPU per request, errors."""
    lat = r.latency_ms
    cpu = f"{r.cpu_us_per_request:7.1f}" if r.cpu_us_per_request is not None else "      -"
    err = f"  errors {r.errors}" if r.errors else ""
    print(
        f"  {name:<{width}} c={r.connections:<3} {r.rps:>10,.0f} req/s   "
        f"p50 {lat.get('p50', float('nan')):7.3f} ms   p99 {lat.get('p99', float('nan')):7.3f} ms"
        f"   cpu {cpu} us/req{err}",
        flush=True,
    )


def versions(python: str = sys.executable) -> dict[str, str]:
    """Versions of the things being measured, for the results file."""
    out: dict[str, str] = {}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        r = subprocess.run([NGINX, "-v"], capture_output=True, text=True, timeout=5, check=False)
        out["nginx"] = r.stderr.strip().split("/")[-1]
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        r = subprocess.run([WRK, "-v"], capture_output=True, text=True, timeout=5, check=False)
        out["wrk"] = (r.stdout + r.stderr).split()[1]
    # The interpreter's own file too: a PGO+LTO build (the Docker image's, Debian's
    # /usr/bin/python3.11) ran the gateway 0-35 % cheaper a request than a plain one such
    # as pyenv's default, depending on the machine's state (docs/performance.md), so a
    # figure needs to say which it was.
    code = (
        "import importlib.metadata as m, platform, json, os, sys;"
        "print(json.dumps({'python': platform.python_version(),"
        " 'python_executable': os.path.realpath(sys.executable), **{p: m.version(p) for p in "
        "('uvicorn','uvloop','httptools','aiohttp','starlette')}}))"
    )
    with contextlib.suppress(OSError, subprocess.SubprocessError, ValueError):
        r = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=20)
        out.update(json.loads(r.stdout))
    return out


def run_header(
    bench: str,
    argv: list[str] | None,
    started: float,
    load_before: str,
    load_after: str,
    python: str = sys.executable,
) -> dict[str, Any]:
    """The fields every bench result JSON starts with: what ran, when, on what."""
    return {
        "bench": bench,
        "command": f"python bench/{bench}.py " + " ".join(argv or sys.argv[1:]),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "wall_seconds": round(time.time() - started, 1),
        "cpus": os.cpu_count(),
        "uptime_before": load_before,
        "uptime_after": load_after,
        "versions": versions(python),
    }


# Per target: figure name -> one value per round.
Rows = dict[str, dict[str, list[float]]]


def interleave(
    targets: dict[str, tuple[str, int]],
    rounds: int,
    measure: Callable[[str, int], dict[str, float]],
) -> Rows:
    """`measure(url, pid)` for every target, `rounds` times, the order reversed every
    other round, so targets started together see the same load on average when other
    work on the machine comes and goes. Value i of every list is from round i, so
    ratios between targets can be taken round by round."""
    rows: Rows = {name: {} for name in targets}
    for r in range(rounds):
        order = list(targets) if r % 2 == 0 else list(reversed(targets))
        for name in order:
            for key, value in measure(*targets[name]).items():
                rows[name].setdefault(key, []).append(value)
    return rows


def per_round(a: list[float], b: list[float], op: Callable[[float, float], float]) -> list[float]:
    """`op(a[i], b[i])` for each round i."""
    return [op(x, y) for x, y in zip(a, b, strict=True)]


def print_spread(rows: Rows, name_width: int, key_width: int) -> None:
    """Each figure's median over the rounds, with its [min .. max]."""
    for name, row in rows.items():
        for key, xs in row.items():
            spread = f"{statistics.median(xs):9.3f}  [{min(xs):.3f} .. {max(xs):.3f}]"
            print(f"  {name:{name_width}s} {key:{key_width}s} {spread}")
