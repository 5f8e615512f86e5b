"""One send per response: uvicorn's HTTP protocol with the writes of one loop step joined.

uvicorn writes a response's status line and headers, then its body, as two writes on the
socket; each is a system call, and on loopback or a virtual machine each also wakes the
caller, whose client reads the headers, then waits again for the body. Here the writes made
in one step of the event loop (a response's are: Starlette sends start and body without
yielding) are queued and sent together as the step ends.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class CoalescingTransport:
    """A transport whose writes in one loop step go out as one write of ``transport``;
    everything else is ``transport``'s, and anything that ends or half-closes the stream
    sends what is queued first."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._queued: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        if not self._queued:
            self._loop.call_soon(self.flush)
        self._queued.append(bytes(data))

    def writelines(self, lines: Any) -> None:
        for data in lines:
            self.write(data)

    def flush(self) -> None:
        """Send what is queued now (called as the loop step that queued it ends)."""
        if not self._queued:
            return
        data = self._queued[0] if len(self._queued) == 1 else b"".join(self._queued)
        self._queued.clear()
        if not self._transport.is_closing():
            self._transport.write(data)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class CoalescingHttp(HttpToolsProtocol):
    """uvicorn's httptools protocol on a :class:`CoalescingTransport`."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.transport = CoalescingTransport(  # type: ignore[assignment]
            transport, asyncio.get_running_loop())
