"""Test helpers: build configs from dicts, run the gateway on a real socket in-process."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import yaml

from gateway.admin import create_admin_app
from gateway.app import Gateway, create_app
from gateway.config import GatewayConfig, parse_config
from gateway.server import _Server, _uvicorn_config

BASE: dict[str, Any] = {
    "server": {
        "listen": "127.0.0.1:0",
        "admin_listen": "127.0.0.1:1",
        "access_log": False,
        "drain_timeout": "2s",
    },
    "store": {"url": "memory://"},
    "upstreams": {"app": {"url": "http://127.0.0.1:9"}},
    "routes": [
        {"name": "default", "match": {"path": "/{path:path}"}, "upstream": "app", "auth": "off"}
    ],
}


def make_config(upstream_url: str, **sections: Any) -> GatewayConfig:
    data = copy.deepcopy(BASE)
    data["upstreams"]["app"]["url"] = upstream_url
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return parse_config(yaml.safe_dump(data), env={})


def _bound_socket() -> socket.socket:
    # IPPROTO_TCP explicitly: asyncio only sets TCP_NODELAY on sockets it knows are TCP
    # (otherwise Nagle adds ~40 ms to every keep-alive response after the first).
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    return s


@dataclass
class Running:
    url: str
    admin_url: str
    app: Gateway
    server: _Server


@contextlib.asynccontextmanager
async def run_gateway(cfg: GatewayConfig, **runtime_kwargs: Any) -> AsyncIterator[Running]:
    app = create_app(cfg, **runtime_kwargs)
    sock = _bound_socket()
    asock = _bound_socket()
    server = _Server(_uvicorn_config(app, "127.0.0.1", 0, cfg, lifespan="on"))
    admin = _Server(
        _uvicorn_config(create_admin_app(lambda: app.rt), "127.0.0.1", 0, cfg, lifespan="off")
    )
    t1 = asyncio.ensure_future(server.serve(sockets=[sock]))
    t2 = asyncio.ensure_future(admin.serve(sockets=[asock]))
    while not (server.started and admin.started):
        if t1.done() or t2.done():
            await asyncio.gather(t1, t2)
            raise RuntimeError("gateway failed to start")
        await asyncio.sleep(0.005)
    try:
        yield Running(
            f"http://127.0.0.1:{sock.getsockname()[1]}",
            f"http://127.0.0.1:{asock.getsockname()[1]}",
            app,
            server,
        )
    finally:
        server.should_exit = True
        admin.should_exit = True
        await asyncio.gather(t1, t2, return_exceptions=True)
