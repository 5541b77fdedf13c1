"""A fake asyncio transport for driving uvicorn protocol objects without a socket: it
records what was written, whether the write side was shut (write_eof) and whether it was
closed, so tests of gateway/protocol.py can feed bytes and read the answer directly."""

from __future__ import annotations

import asyncio
from typing import Any


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        # Each write() call's bytes (one entry per syscall a real transport would make).
        self.writes: list[bytes] = []
        self.closed = False
        self.eof_written = False
        self.reading = True
        self._protocol: asyncio.BaseProtocol | None = None

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("198.51.100.7", 40000), "sockname": ("127.0.0.1", 8080)}.get(
            name, default
        )

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data
        self.writes.append(bytes(data))

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof_written = True

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self._protocol is not None
        return self._protocol

    def status(self) -> int | None:
        """The status code of the first response written, if any."""
        if not self.written.startswith(b"HTTP/1.1 "):
            return None
        return int(self.written[9:12])
