"""The real Next.js 15 app of e2e/nextapp, built and started once per test session, with
the gateway on the shipped config.yaml in front of it.

`npm ci` runs when node_modules is missing or the lock file changed, `next build` when
the app's sources changed (stamps in e2e/nextapp). Without Node the suite is skipped,
saying so; under CI=true it fails instead (.ci/run installs Node)."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port, node_binary

APP = Path(__file__).resolve().parents[2] / "e2e" / "nextapp"


def _digest(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(str(p.relative_to(APP)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def _run(cmd: list[str], what: str) -> None:
    env = {**os.environ, "NEXT_TELEMETRY_DISABLED": "1"}
    proc = subprocess.run(cmd, cwd=APP, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        pytest.fail(
            f"{what} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )


def _ensure_built() -> None:
    node_binary()  # fails under CI, skips elsewhere, with the reason
    npm = shutil.which("npm")
    if npm is None:
        if os.environ.get("CI") == "true":
            pytest.fail("npm is required under CI=true (.ci/run installs npm)")
        pytest.skip("npm is not installed: the Next.js e2e suite needs it (apt install npm)")
    assert npm is not None
    lock = _digest([APP / "package-lock.json"])
    stamp = APP / ".e2e-stamp-install"
    if not (APP / "node_modules").is_dir() or not stamp.exists() or stamp.read_text() != lock:
        _run([npm, "ci", "--no-audit", "--no-fund"], "npm ci")
        stamp.write_text(lock)
    sources = [p for p in (APP / "app").rglob("*") if p.is_file()]
    sources += [*(APP / "lib").rglob("*.js"), APP / "next.config.mjs", APP / "package-lock.json"]
    built = _digest(sources)
    stamp = APP / ".e2e-stamp-build"
    if (
        not (APP / ".next" / "BUILD_ID").exists()
        or not stamp.exists()
        or stamp.read_text() != built
    ):
        _run([npm, "run", "build"], "next build")
        stamp.write_text(built)


class NextApp:
    def __init__(self, port: int, proc: subprocess.Popen[bytes]) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.proc = proc


@pytest.fixture(scope="session")
def next_app() -> Iterator[NextApp]:
    node = node_binary()
    _ensure_built()
    port = free_port()
    proc = subprocess.Popen(
        [node, str(APP / "node_modules" / "next" / "dist" / "bin" / "next"), "start",
         "-p", str(port), "-H", "127.0.0.1"],
        cwd=APP,
        env={**os.environ, "NEXT_TELEMETRY_DISABLED": "1", "E2E_ADMINS": "admin-1,admin-2,admin-3"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail("next start did not listen")
            time.sleep(0.1)
    yield NextApp(port, proc)
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
