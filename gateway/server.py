"""Process management: uvicorn run programmatically, both listeners, drain on SIGTERM.

Owns: the uvicorn settings that matter for a proxy (uvloop, httptools, no uvicorn access
log, no proxy-header rewriting: the gateway decides who the client is itself), the
drain sequence (readiness 503 → stop accepting → in-flight requests finish within
`server.drain_timeout` → shutdown hooks → pools close → exit 0), and `server.workers`
(a supervisor that binds the public socket once, forks N workers, serves the admin port
itself with Prometheus multiprocess metrics, and forwards SIGTERM).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import tempfile
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

import uvicorn

from gateway.config import GatewayConfig, load_config
from gateway.observability.logging import setup_logging
from gateway.protocol import SWEEP_TICKS, EdgeConfig, HeadLimits, sweep_heads

log = logging.getLogger("gateway")


class _Server(uvicorn.Server):
    """uvicorn.Server whose signals are ours: the drain sequence is owned here. Its tick
    also expires request heads past `server.header_timeout` (gateway/protocol.py)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield

    async def on_tick(self, counter: int) -> bool:
        if counter % SWEEP_TICKS == 0:
            sweep_heads(self.server_state.connections)
        return await super().on_tick(counter)


def _uvicorn_config(
    app: Any,
    host: str,
    port: int,
    cfg: GatewayConfig,
    clock: Callable[[], float] | None = None,
    **kw: Any,
) -> uvicorn.Config:
    server = cfg.server
    return EdgeConfig(
        app,
        # httptools, with the head size limit and head timeout uvicorn lacks.
        head_limits=HeadLimits(server.max_header_bytes, server.header_timeout, clock),
        host=host,
        port=port,
        loop="none",
        ws="websockets-sansio",
        log_config=None,
        access_log=False,
        proxy_headers=False,
        server_header=False,
        date_header=False,
        timeout_keep_alive=int(cfg.server.keep_alive_timeout),
        timeout_graceful_shutdown=int(cfg.server.drain_timeout) or 1,
        limit_concurrency=cfg.server.limit_concurrency,
        backlog=2048,
        ws_max_size=max(cfg.server.max_body_bytes, 65536),
        **kw,
    )


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        return loop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.new_event_loop()


async def _serve_single(
    cfg: GatewayConfig,
    config_path: str | None,
    sock: socket.socket | None = None,
    admin: bool = True,
) -> None:
    from gateway.admin import create_admin_app
    from gateway.app import create_app

    app = create_app(cfg)
    # Everything allocated so far (modules, config, route table) lives as long as the
    # process: move it out of the GC's generations so a full collection under load
    # scans only request-time objects (bench/passthrough.py: gen-2 time 1.2 s -> 0.15 s
    # per 12 s run at 50 connections).
    gc.collect()
    gc.freeze()
    host, port = cfg.server.listen_addr
    public = _Server(_uvicorn_config(app, host, port, cfg, lifespan="on"))
    servers = [public.serve(sockets=[sock] if sock else None)]
    admin_server: _Server | None = None
    if admin:
        ahost, aport = cfg.server.admin_addr
        admin_server = _Server(
            _uvicorn_config(
                create_admin_app(lambda: app.rt, listening=lambda: public.started),
                ahost,
                aport,
                cfg,
                lifespan="off",
            )
        )
    loop = asyncio.get_running_loop()

    def drain(sig: signal.Signals) -> None:
        if app.rt.draining:
            public.force_exit = True
            return
        log.info("draining", extra={"signal": sig.name})
        app.rt.draining = True
        public.should_exit = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, drain, sig)
    if config_path is not None:
        from gateway.reload import install_reload

        install_reload(app, config_path, loop)

    async def run_public() -> None:
        try:
            await servers[0]
        finally:
            if admin_server is not None:
                admin_server.should_exit = True

    if admin_server is not None:
        await asyncio.gather(run_public(), admin_server.serve())
    else:
        await run_public()
    log.info("stopped")


def run(cfg: GatewayConfig, config_path: str | None = None) -> int:
    setup_logging(cfg.server.log_level)
    if cfg.server.workers > 1:
        return _supervise(cfg, config_path)
    with asyncio.Runner(loop_factory=_new_loop) as runner:
        runner.run(_serve_single(cfg, config_path))
    return 0


# ------------------------------------------------------------------ multi-worker


def _worker(config_path: str, sock: socket.socket, env: dict[str, str]) -> None:
    os.environ.update(env)
    cfg = load_config(config_path)
    setup_logging(cfg.server.log_level)
    with asyncio.Runner(loop_factory=_new_loop) as runner:
        runner.run(_serve_single(cfg, config_path, sock=sock, admin=False))


def _supervise(cfg: GatewayConfig, config_path: str | None) -> int:
    if config_path is None:
        raise RuntimeError("server.workers > 1 needs a config file path")
    mp_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not mp_dir:
        mp_dir = tempfile.mkdtemp(prefix="edge-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = mp_dir
    for f in Path(mp_dir).glob("*.db"):
        f.unlink()
    host, port = cfg.server.listen_addr
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio enables TCP_NODELAY only on sockets created as TCP,
    # and Nagle would otherwise delay every keep-alive response after the first by ~40 ms.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    ctx = multiprocessing.get_context("spawn")
    env = {"PROMETHEUS_MULTIPROC_DIR": mp_dir}
    procs = [
        ctx.Process(target=_worker, args=(config_path, sock, env), name=f"edge-worker-{i}")
        for i in range(cfg.server.workers)
    ]
    for p in procs:
        p.start()
    log.info("workers started", extra={"workers": len(procs), "pids": [p.pid for p in procs]})

    async def admin_main() -> None:
        from prometheus_client import multiprocess

        from gateway.admin import create_admin_app
        from gateway.runtime import Runtime

        rt = Runtime(cfg)
        await rt.store.start()
        # The supervisor proxies nothing itself: it is "started" once its store is up, and
        # "listening" while every worker is alive.
        rt.started = True
        ahost, aport = cfg.server.admin_addr
        admin = _Server(
            _uvicorn_config(
                create_admin_app(rt, listening=lambda: all(p.is_alive() for p in procs)),
                ahost,
                aport,
                cfg,
                lifespan="off",
            )
        )
        loop = asyncio.get_running_loop()

        def stop(sig: signal.Signals) -> None:
            rt.draining = True
            for p in procs:
                if p.pid and p.is_alive():
                    os.kill(p.pid, sig)

        def reload_all() -> None:
            for p in procs:
                if p.pid and p.is_alive():
                    os.kill(p.pid, signal.SIGHUP)

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop, sig)
        loop.add_signal_handler(signal.SIGHUP, reload_all)

        async def watch_workers() -> None:
            # Process sentinels are plain fds: wait on them in a thread, not a poll loop.
            await asyncio.to_thread(multiprocessing.connection.wait, [p.sentinel for p in procs])
            while any(p.is_alive() for p in procs):
                await asyncio.to_thread(
                    multiprocessing.connection.wait, [p.sentinel for p in procs if p.is_alive()]
                )
            admin.should_exit = True

        await asyncio.gather(admin.serve(), watch_workers())
        for p in procs:
            if p.pid is not None:
                multiprocess.mark_process_dead(p.pid)
        rt.started = False
        await rt.store.close()

    with asyncio.Runner(loop_factory=_new_loop) as runner:
        runner.run(admin_main())
    for p in procs:
        p.join(timeout=1)
    sock.close()
    codes = [p.exitcode for p in procs]
    return 0 if all(c == 0 for c in codes) else 1
