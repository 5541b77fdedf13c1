"""Hot reload of config.yaml: on SIGHUP and when the file changes.

Owns: noticing a change (Kubernetes updates a mounted ConfigMap by swapping a symlink,
so the file is polled with stat() — which follows the link — rather than watched with
inotify, which would keep watching the old target), validating the new file, and asking
the Gateway to swap it in. A bad file is refused with its errors logged and counted
(`edge_config_reloads_total{result="error"}`); the old config keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.config import ConfigError, load_config
from gateway.routecheck import route_warnings

if TYPE_CHECKING:
    from gateway.app import Gateway

log = logging.getLogger("gateway.reload")


def _fingerprint(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


class Reloader:
    def __init__(self, app: Gateway, path: str | Path, poll_interval: float = 2.0) -> None:
        self.app = app
        self.path = Path(path)
        self.poll_interval = poll_interval
        self._seen = _fingerprint(self.path)
        self._lock = asyncio.Lock()
        self._counter = app.rt.metrics.config_reloads

    async def reload(self, reason: str) -> bool:
        """Validate and apply the file; True if applied."""
        async with self._lock:
            self._seen = _fingerprint(self.path)
            try:
                cfg = load_config(self.path)
            except ConfigError as exc:
                self._counter.labels("error").inc()
                log.error(
                    "config reload refused; keeping the running config",
                    extra={"reason": reason, "errors": [str(i) for i in exc.issues]},
                )
                return False
            if cfg == self.app.config:
                self._counter.labels("unchanged").inc()
                return False
            try:
                restart = await self.app.reload(cfg)
            except Exception:
                self._counter.labels("error").inc()
                log.exception("config reload failed; keeping the running config")
                return False
            self._counter.labels("ok").inc()
            log.info("config reloaded", extra={"reason": reason, "digest": self.app.rt.digest})
            for w in route_warnings(cfg):
                log.warning("config warning", extra={"key": w.key, "detail": w.message})
            if restart:
                log.warning("these settings change only on restart", extra={"keys": restart})
            return True

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            if _fingerprint(self.path) != self._seen:
                await self.reload("file changed")


def install_reload(app: Gateway, path: str, loop: asyncio.AbstractEventLoop) -> Reloader:
    reloader = Reloader(app, path)
    tasks: set[asyncio.Task[bool]] = set()

    def on_hup() -> None:
        task = loop.create_task(reloader.reload("SIGHUP"))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    watcher = loop.create_task(reloader.watch())
    tasks.add(watcher)  # type: ignore[arg-type]
    return reloader
