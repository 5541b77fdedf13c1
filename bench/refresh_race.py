"""End-to-end refresh race with the real client: supabase-js clients sharing sessions
(bench/refresh_race/race.mjs) against the fake GoTrue (tests/fakes/gotrue.py), once
directly and once through the gateway running the shipped `token_refresh` route of
config.yaml (`python -m gateway` in its own process). Reports sign-outs for both.

    cd bench/refresh_race && npm ci && cd ../..
    .venv/bin/python bench/refresh_race.py [--users 25 --clients 4 --rounds 4 ...]

The same seed draws the same participation pattern for both runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.fakes.gotrue import FakeGoTrue  # noqa: E402

NODE_DIR = ROOT / "bench" / "refresh_race"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def gateway_config(gotrue_url: str, store_url: str, port: int, admin_port: int) -> dict[str, Any]:
    shipped = yaml.safe_load((ROOT / "config.yaml").read_text())
    route = next(r for r in shipped["routes"] if r["name"] == "token_refresh")
    return {
        "server": {
            "listen": f"127.0.0.1:{port}",
            "admin_listen": f"127.0.0.1:{admin_port}",
            "access_log": False,
        },
        "store": {"url": store_url},
        "upstreams": {"supabase": {"url": gotrue_url}},
        "routes": [
            route,
            {
                "name": "default",
                "match": {"path": "/{path:path}"},
                "upstream": "supabase",
                "auth": "off",
            },
        ],
    }


async def start_gateway(cfg: dict[str, Any], tmp: Path) -> asyncio.subprocess.Process:
    path = tmp / "gateway.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "--config", str(path), cwd=str(ROOT)
    )
    admin = "http://" + cfg["server"]["admin_listen"] + "/healthz"
    deadline = time.monotonic() + 20
    async with httpx.AsyncClient() as c:
        while True:
            try:
                if (await c.get(admin)).status_code == 200:
                    return proc
            except httpx.HTTPError:
                pass
            if proc.returncode is not None or time.monotonic() > deadline:
                raise RuntimeError("gateway did not start")
            await asyncio.sleep(0.1)


async def run_node(plan: dict[str, Any], tmp: Path) -> dict[str, Any]:
    path = tmp / "plan.json"
    path.write_text(json.dumps(plan))
    proc = await asyncio.create_subprocess_exec(
        "node", str(NODE_DIR / "race.mjs"), str(path), stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"node exited {proc.returncode}")
    result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return result


async def one_run(args: argparse.Namespace, through_gateway: bool, tmp: Path) -> dict[str, Any]:
    fake = FakeGoTrue(reuse_interval=args.reuse_interval, latency=args.latency)
    await fake.start()
    gw: asyncio.subprocess.Process | None = None
    try:
        sessions = [fake.sign_in(f"viewer{i}@example.com") for i in range(args.users)]
        url = fake.url
        if through_gateway:
            port = free_port()
            cfg = gateway_config(fake.url, args.store, port, free_port())
            gw = await start_gateway(cfg, tmp)
            url = f"http://127.0.0.1:{port}"
        plan = {
            "url": url,
            "anonKey": "anon-key",
            "sessions": sessions,
            "clientsPerUser": args.clients,
            "rounds": args.rounds,
            "participate": args.participate,
            "jitterMs": args.jitter_ms,
            "pauseMs": args.pause_ms,
            "seed": args.seed,
        }
        t0 = time.perf_counter()
        result = await run_node(plan, tmp)
        result["seconds"] = round(time.perf_counter() - t0, 2)
        stats = fake.stats()
        result["gotrue_refresh_calls"] = stats["calls"]
        result["gotrue_outcomes"] = stats["outcomes"]
        result["sessions_revoked"] = stats["sessions_revoked"]
        return result
    finally:
        if gw is not None:
            gw.terminate()
            await gw.wait()
        await fake.stop()


async def main() -> None:
    p = argparse.ArgumentParser(
        description="supabase-js refresh race, with and without the gateway"
    )
    p.add_argument("--users", type=int, default=25)
    p.add_argument("--clients", type=int, default=4, help="clients sharing each session")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--participate", type=float, default=0.7)
    p.add_argument("--jitter-ms", type=float, default=20)
    p.add_argument("--pause-ms", type=float, default=100)
    p.add_argument("--reuse-interval", type=float, default=0.0, help="GoTrue's, in seconds")
    p.add_argument("--latency", type=float, default=0.02, help="GoTrue's, in seconds")
    p.add_argument("--store", default="memory://")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    if not (NODE_DIR / "node_modules").exists():
        raise SystemExit("run `npm ci` in bench/refresh_race first")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        report = {
            "params": vars(args),
            "direct": await one_run(args, False, tmp),
            "gateway": await one_run(args, True, tmp),
        }
    print(json.dumps(report, indent=2))
    for name in ("direct", "gateway"):
        r = report[name]
        print(
            f"{name:8s} refreshSession={r['refresh_attempts']:4d} ok={r['refresh_ok']:4d} "
            f"token_requests={r['token_requests']:4d} "
            f"errors={r['refresh_errors']} signed_out_clients={r['clients_signed_out']}"
            f"/{r['clients']} users_hit={r['users_with_a_signed_out_client']}/{args.users} "
            f"sessions_revoked={r['sessions_revoked']} gotrue_calls={r['gotrue_refresh_calls']}",
            file=sys.stderr,
        )


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    asyncio.run(main())
