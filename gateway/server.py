"""Process management: uvicorn run programmatically, both listeners, drain on SIGTERM.

Owns: the uvicorn settings that matter for a proxy (uvloop, httptools, no uvicorn access
log, no proxy-header rewriting: the gateway decides who the client is itself), the
drain sequence (readiness 503 → stop accepting → in-flight requests finish within
`server.drain_timeout` → shutdown hooks → pools close → exit 0), and `server.workers`
(a supervisor that proves the public port free, hands each of N workers its own
SO_REUSEPORT listener on it, serves the admin port itself with Prometheus multiprocess
metrics, and forwards SIGTERM; a worker whose supervisor dies drains). A drain is the same
whichever processes a signal reaches: a repeated SIGTERM never cuts it short, only a
second SIGINT (Ctrl-C twice) does.
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
import sys
import tempfile
from collections.abc import Callable, Generator, Sequence
from multiprocessing.synchronize import Event as EventType
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvicorn

from gateway.config import GatewayConfig, load_config
from gateway.observability.logging import setup_logging
from gateway.protocol import SWEEP_TICKS, EdgeConfig, HeadLimits, sweep_heads

if TYPE_CHECKING:
    from gateway.runtime import Runtime

log = logging.getLogger("gateway")

# Net container allocations between young-generation collections (default 700).
GC_YOUNG_THRESHOLD = 10_000


class _Server(uvicorn.Server):
    """uvicorn.Server whose signals are ours: the drain sequence is owned here. Its tick
    also expires request heads past `server.header_timeout` (gateway/protocol.py)."""

    # Called once the server accepts requests (lifespan startup done): the startup line.
    on_started: Callable[[], None] | None = None
    # A worker's supervisor: when it is gone (SIGKILL, OOM kill) the worker drains too,
    # instead of serving on as an orphan nobody signals or counts (gunicorn does the same).
    supervisor: int | None = None

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield

    async def on_tick(self, counter: int) -> bool:
        if counter % SWEEP_TICKS == 0:
            sweep_heads(self.server_state.connections)
            if self.supervisor is not None and os.getppid() != self.supervisor:
                self.supervisor = None
                log.warning("supervisor gone: draining")
                os.kill(os.getpid(), signal.SIGTERM)  # the one drain path, as if signalled
        return await super().on_tick(counter)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started and self.on_started is not None:
            self.on_started()


class BindError(Exception):
    """A listener address that cannot be bound, with the config key that names it."""

    def __init__(self, key: str, address: str, reason: str) -> None:
        super().__init__(f"{key}: cannot listen on {address}: {reason}")
        self.key = key
        self.address = address
        self.reason = reason


def bind(
    key: str, address: str, host: str, port: int, *, reuse_port: bool = False, listen: bool = True
) -> socket.socket:
    """A listening TCP socket, bound before any server starts: a port in use is then one
    error naming its key, instead of a failure inside uvicorn's startup while the other
    listener and the lifespan are half started (a CancelledError traceback)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio enables TCP_NODELAY only on sockets created as TCP,
    # and Nagle would otherwise delay every keep-alive response after the first by ~40 ms.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        if listen:
            sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise BindError(key, address, exc.strerror or str(exc)) from None
    sock.set_inheritable(True)
    return sock


def reuse_port_supported() -> bool:
    """Linux spreads connections over SO_REUSEPORT listeners by a hash of the 4-tuple;
    elsewhere (BSD, macOS) the option exists but the last socket bound takes them all."""
    return hasattr(socket, "SO_REUSEPORT") and sys.platform.startswith("linux")


def _reuse_port_group(key: str, address: str, probe: socket.socket, n: int) -> list[socket.socket]:
    """One listener per worker, as nginx's `listen ... reuse_port`: the kernel hands each
    new connection to one worker's accept queue, so a busy worker cannot take the burst
    its idle sibling would have served (with one shared socket, whichever process wakes
    first accepts everything). `probe` (bound, not listening) has proven the port free
    with the error naming its key; it is closed and the port rebound by the group."""
    host, port = probe.getsockname()[:2]
    # SO_REUSEPORT binds only join sockets that all set it, so the probe goes first. In
    # the gap (one close, N binds, at startup) another SO_REUSEPORT process of the same
    # user could join the port: inherent to the option, as it is for nginx.
    probe.close()
    group: list[socket.socket] = []
    try:
        for _ in range(n):
            group.append(bind(key, address, host, port, reuse_port=True))
    except BindError:
        for sock in group:
            sock.close()
        raise
    return group


def _listeners(cfg: GatewayConfig) -> tuple[list[socket.socket], socket.socket]:
    """The public listener of each worker (one socket shared, or one each with
    server.reuse_port) and the admin listener; BindError names the key."""
    s = cfg.server
    group = s.workers > 1 and s.reuse_port and reuse_port_supported()
    # With a group the first socket only proves the port free: it does not listen, so no
    # connection is queued on a socket about to close.
    public = bind("server.listen", s.listen, *s.listen_addr, listen=not group)
    try:
        admin = bind("server.admin_listen", s.admin_listen, *s.admin_addr)
    except BindError:
        public.close()
        raise
    if not group:
        return [public] * s.workers, admin
    try:
        return _reuse_port_group("server.listen", s.listen, public, s.workers), admin
    except BindError:
        admin.close()
        raise


def log_startup(cfg: GatewayConfig, config_path: str | None) -> None:
    """The gateway's one startup line: what runs, from which file, where."""
    from gateway import __version__
    from gateway.config import config_digest

    log.info(
        "gateway started",
        extra={
            "version": __version__,
            "config": config_path,
            "config_digest": config_digest(cfg),
            "listen": cfg.server.listen,
            "admin_listen": cfg.server.admin_listen,
            "workers": cfg.server.workers,
            # The scheme only: a store URL may carry a password.
            "store": cfg.store.url.split("://", 1)[0],
            "routes": len(cfg.routes),
        },
    )


def _log_warnings(cfg: GatewayConfig) -> None:
    from gateway.routecheck import route_warnings

    for w in route_warnings(cfg):
        log.warning("config warning", extra={"key": w.key, "detail": w.message})


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
    admin_sock: socket.socket | None = None,
    started: Callable[[], None] | None = None,
    early: list[signal.Signals] | None = None,
    supervisor: int | None = None,
) -> None:
    """One process: the public listener on `sock`, and the admin listener on `admin_sock`
    unless a supervisor serves it (workers; `started` then tells it this worker serves)."""
    from gateway.admin import create_admin_app
    from gateway.app import create_app

    app = create_app(cfg)
    # Everything allocated so far (modules, config, route table) lives as long as the
    # process: move it out of the GC's generations so a full collection under load
    # scans only request-time objects (bench/passthrough.py: gen-2 time 1.2 s -> 0.15 s
    # per 12 s run at 50 connections).
    gc.collect()
    gc.freeze()
    # A young-generation collection every 700 net allocations (CPython's default) runs
    # while 50 requests in flight hold several thousand live containers, so each one
    # scans live objects for nothing: 4.1 % of the shed path's samples (bench/profile.py
    # shed). Above the in-flight working set, collections become rare (under 0.1 %);
    # garbage cycles wait a little longer, bounded by the same count.
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    host, port = cfg.server.listen_addr
    public = _Server(_uvicorn_config(app, host, port, cfg, lifespan="on"))
    public.on_started = started
    public.supervisor = supervisor
    servers = [public.serve(sockets=[sock] if sock else None)]
    admin_server: _Server | None = None
    if admin_sock is not None:
        public.on_started = lambda: log_startup(cfg, config_path)
        admin_app = create_admin_app(lambda: app.rt, listening=lambda: public.started)
        admin_server = _Server(
            _uvicorn_config(admin_app, *cfg.server.admin_addr, cfg, lifespan="off")
        )
    loop = asyncio.get_running_loop()
    _install_drain(app, public, loop, early or [])
    if config_path is not None:
        from gateway.reload import install_reload

        install_reload(app, config_path, loop)

    async def run_public() -> None:
        try:
            await servers[0]
        finally:
            if admin_server is not None:
                admin_server.should_exit = True

    if admin_server is not None and admin_sock is not None:
        await asyncio.gather(run_public(), admin_server.serve(sockets=[admin_sock]))
    else:
        await run_public()
    log.info("stopped")


def _install_drain(
    app: Any, public: _Server, loop: asyncio.AbstractEventLoop, early: list[signal.Signals]
) -> None:
    """SIGTERM/SIGINT start the drain (readiness 503, stop accepting, finish in-flight
    requests); `early` are signals that arrived before the loop ran."""

    def drain(sig: signal.Signals) -> None:
        if app.rt.draining:
            # Only a second Ctrl-C stops at once. A repeated SIGTERM is the same request
            # again: sent to a whole process group (a shell wrapper, `tini -g`, `kill
            # -TERM -PGID`) a worker gets it once directly and once from its supervisor,
            # and must not drop its in-flight requests for that.
            if sig == signal.SIGINT:
                public.force_exit = True
            return
        log.info("draining", extra={"signal": sig.name})
        app.rt.draining = True
        public.should_exit = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, drain, sig)
    for sig in early:
        drain(sig)


def run(cfg: GatewayConfig, config_path: str | None = None) -> int:
    """Serve until drained. Exit code 0, or 1 when a listener cannot be bound."""
    setup_logging(cfg.server.log_level)
    try:
        socks, admin_sock = _listeners(cfg)
    except BindError as exc:
        log.error(
            "cannot listen",
            extra={"key": exc.key, "address": exc.address, "error": exc.reason},
        )
        return 1
    _log_warnings(cfg)
    if cfg.server.workers > 1:
        return _supervise(cfg, config_path, socks, admin_sock)
    (sock,) = socks
    with sock, admin_sock, asyncio.Runner(loop_factory=_new_loop) as runner:
        runner.run(_serve_single(cfg, config_path, sock, admin_sock))
    return 0


# ------------------------------------------------------------------ multi-worker


def _worker(
    config_path: str, sock: socket.socket, env: dict[str, str], serving: EventType, parent: int
) -> None:
    # `parent` is the supervisor's pid as the supervisor knows it: read here with
    # getppid(), a supervisor that died while this worker was still importing would
    # already be gone, and the orphan would never notice.
    # A signal that arrives while the worker is still starting (a group-wide SIGTERM
    # right after a restart) is kept and drained on as soon as the loop runs, instead
    # of killing the process by the default action.
    early: list[signal.Signals] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: early.append(signal.Signals(signum)))
    os.environ.update(env)
    cfg = load_config(config_path)
    setup_logging(cfg.server.log_level)
    with asyncio.Runner(loop_factory=_new_loop) as runner:
        runner.run(
            _serve_single(
                cfg, config_path, sock, started=serving.set, early=early, supervisor=parent
            )
        )


def _supervise(
    cfg: GatewayConfig,
    config_path: str | None,
    socks: list[socket.socket],
    admin_sock: socket.socket,
) -> int:
    if config_path is None:
        raise RuntimeError("server.workers > 1 needs a config file path")
    mp_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not mp_dir:
        mp_dir = tempfile.mkdtemp(prefix="edge-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = mp_dir
    for f in Path(mp_dir).glob("*.db"):
        f.unlink()
    # Only the workers serve the public socket; the supervisor keeps the admin one.
    admin_sock.set_inheritable(False)
    ctx = multiprocessing.get_context("spawn")
    env = {"PROMETHEUS_MULTIPROC_DIR": mp_dir}
    # Set by each worker once its public server has started: until all are, /readyz says
    # not ready (a worker still importing would leave its share of connections waiting).
    serving = [ctx.Event() for _ in range(cfg.server.workers)]
    me = os.getpid()
    procs = [
        ctx.Process(target=_worker, args=(config_path, s, env, ev, me), name=f"edge-worker-{i}")
        for i, (s, ev) in enumerate(zip(socks, serving, strict=True))
    ]
    for p in procs:
        p.start()
    if socks[0] is not socks[-1]:
        # Each worker got its own listener (spawn passed the fd to the child before
        # start() returned): the supervisor's copies go, so a worker that dies takes its
        # accept queue with it instead of leaving the kernel one nobody accepts on.
        for s in socks:
            s.close()
    log.debug("workers started", extra={"pids": [p.pid for p in procs]})

    def listening() -> bool:
        return all(p.is_alive() for p in procs) and all(ev.is_set() for ev in serving)

    with asyncio.Runner(loop_factory=_new_loop) as runner:
        runner.run(_supervisor_admin(cfg, config_path, procs, admin_sock, listening))
    for p in procs:
        p.join(timeout=1)
    for s in socks:
        s.close()  # closing twice is harmless (a reuse_port group is closed already)
    admin_sock.close()
    # A worker the drain signal reached before Python could install a handler (during
    # interpreter start) ended by SIGTERM with nothing in flight: a clean stop too.
    ok = {0, -signal.SIGTERM}
    return 0 if all(p.exitcode in ok for p in procs) else 1


def _forward_signals(rt: Runtime, procs: Sequence[multiprocessing.process.BaseProcess]) -> None:
    """SIGTERM/SIGINT drain every worker (and mark the supervisor draining); SIGHUP makes
    every worker reload its config."""
    loop = asyncio.get_running_loop()

    def stop(sig: signal.Signals) -> None:
        # The workers may have got this very signal already (sent to the group): ask
        # each to drain once, with SIGTERM, which a draining worker ignores; only a
        # second SIGINT here (Ctrl-C twice) is passed on to force them.
        again, rt.draining = rt.draining, True
        if again and sig != signal.SIGINT:
            return
        fwd = signal.SIGINT if again else signal.SIGTERM
        for p in procs:
            if p.pid and p.is_alive():
                os.kill(p.pid, fwd)

    def reload_all() -> None:
        for p in procs:
            if p.pid and p.is_alive():
                os.kill(p.pid, signal.SIGHUP)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop, sig)
    loop.add_signal_handler(signal.SIGHUP, reload_all)


async def _watch_workers(
    procs: Sequence[multiprocessing.process.BaseProcess], admin: _Server
) -> None:
    """Stop the admin listener once every worker has exited."""
    # Process sentinels are plain fds: wait on them in a thread, not a poll loop.
    await asyncio.to_thread(multiprocessing.connection.wait, [p.sentinel for p in procs])
    while any(p.is_alive() for p in procs):
        await asyncio.to_thread(
            multiprocessing.connection.wait, [p.sentinel for p in procs if p.is_alive()]
        )
    admin.should_exit = True


async def _supervisor_admin(
    cfg: GatewayConfig,
    config_path: str,
    procs: Sequence[multiprocessing.process.BaseProcess],
    admin_sock: socket.socket,
    listening: Callable[[], bool],
) -> None:
    """The supervisor's admin listener, until every worker has exited."""
    from prometheus_client import multiprocess

    from gateway.admin import create_admin_app
    from gateway.runtime import Runtime

    rt = Runtime(cfg)
    await rt.store.start()
    verifier = None
    if any(r.auth.mode != "off" for r in cfg.routes):
        # The workers' key sets are not visible from here: the supervisor loads the same
        # JWKS, so its /readyz says not ready while no key can be loaded.
        from gateway.policies.auth.policy import get_verifier

        verifier = get_verifier(rt)
        await verifier.start()
    # The supervisor proxies nothing itself: it is "started" once its store is up, and
    # "listening" while every worker is alive and serving.
    rt.started = True
    ahost, aport = cfg.server.admin_addr
    admin = _Server(
        _uvicorn_config(
            create_admin_app(rt, listening=listening),
            ahost,
            aport,
            cfg,
            lifespan="off",
        )
    )
    admin.on_started = lambda: log_startup(cfg, config_path)
    _forward_signals(rt, procs)
    await asyncio.gather(admin.serve(sockets=[admin_sock]), _watch_workers(procs, admin))
    for p in procs:
        if p.pid is not None:
            multiprocess.mark_process_dead(p.pid)
    rt.started = False
    if verifier is not None:
        await verifier.close()
    await rt.store.close()
