"""WebSocket passthrough through real sockets: subprotocols, frames both ways, close
codes from either side, and a refused upgrade."""

from __future__ import annotations

import asyncio
import socket

import aiohttp
import pytest

from tests.fakes.app import FakeApp
from tests.helpers import Running, make_config, run_gateway


async def wait_metric(s: aiohttp.ClientSession, admin_url: str, line: str) -> None:
    """The relay records the close after both sides settle; poll briefly for it."""
    text = ""
    for _ in range(100):
        text = await (await s.get(admin_url + "/metrics")).text()
        if line in text:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{line!r} not in metrics")


def ws_url(http_url: str, path: str) -> str:
    return http_url.replace("http://", "ws://") + path


async def test_frames_both_ways_and_subprotocol(gw: Running) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.ws_connect(
            ws_url(gw.url, "/realtime/v1/websocket?apikey=k&vsn=1.0.0"),
            protocols=("chat.v1",),
        ) as ws:
            assert ws.protocol == "chat.v1"
            await ws.send_str("hello")
            assert (await ws.receive(timeout=5)).data == "echo:hello"
            await ws.send_bytes(b"\x01\x02\x03")
            assert (await ws.receive(timeout=5)).data == b"\x03\x02\x01"
        await wait_metric(
            s, gw.admin_url, 'edge_websocket_closes_total{by="client",route="default"} 1.0'
        )


async def test_upstream_close_code_reaches_client(gw: Running) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.ws_connect(ws_url(gw.url, "/ws")) as ws:
            await ws.send_str("close:4001")
            msg = await ws.receive(timeout=5)
            assert msg.type == aiohttp.WSMsgType.CLOSE
            assert ws.close_code == 4001 or msg.data == 4001
        await wait_metric(
            s, gw.admin_url, 'edge_websocket_closes_total{by="upstream",route="default"} 1.0'
        )


async def test_client_close_code_reaches_upstream(fake_app: FakeApp, gw: Running) -> None:
    async with aiohttp.ClientSession() as s:
        ws = await s.ws_connect(ws_url(gw.url, "/ws"))
        await ws.send_str("x")
        await ws.receive(timeout=5)
        await ws.close(code=4002)
        for _ in range(200):
            if fake_app.ws_closed_codes:
                break
            await asyncio.sleep(0.01)
    assert fake_app.ws_closed_codes == [4002]


async def test_upgrade_to_dead_upstream_is_refused() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with run_gateway(make_config(f"http://127.0.0.1:{port}")) as gw:
        async with aiohttp.ClientSession() as s:
            with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
                await s.ws_connect(ws_url(gw.url, "/ws"))
            assert exc.value.status in (403, 502)
