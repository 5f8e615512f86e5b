"""A small TCP fault proxy for tests: 127.0.0.1:<free port> -> an upstream server (Redis).

Clients that connect through it can be hurt on demand, from any thread:

- ``set_latency(s)``: every chunk is delivered ``s`` seconds after it arrived (order kept,
  bandwidth not limited: real latency, not a per-chunk sleep in series);
- ``reset_all()``: every open connection is closed with a TCP RST on both sides;
- ``blackhole()`` / ``heal()``: while blackholed, bytes in both directions are read and
  thrown away and new connections are accepted but never answered, like a route that
  swallows packets; clients notice only through their own timeouts;
- ``sniff(regex)``: records the first time each match of ``regex`` (its group 1, or the
  whole match) crossed the proxy in one direction, so a test can tell which client sent
  or received what.

The proxy runs an asyncio loop in a daemon thread; ``stop()`` closes everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

_CHUNK = 65536


@dataclass
class Sniffer:
    """First sightings of a pattern in one direction ("up": client -> server)."""

    pattern: re.Pattern[bytes]
    direction: str
    keep: int = 256
    first_seen: dict[bytes, float] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def feed(self, tail: bytes, chunk: bytes) -> bytes:
        """Scan ``tail + chunk`` (the tail covers matches split across chunks)."""
        buf = tail + chunk
        now = time.monotonic()
        with self._lock:
            for match in self.pattern.finditer(buf):
                key = match.group(1) if self.pattern.groups else match.group(0)
                self.first_seen.setdefault(key, now)
        return buf[-self.keep:]

    def seen(self) -> dict[bytes, float]:
        with self._lock:
            return dict(self.first_seen)


@dataclass(eq=False)
class _Link:
    """One proxied connection: the client's side and the upstream side."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


class FaultProxy:
    """Forwards TCP connections to ``upstream_host:upstream_port`` and injects faults."""

    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = 0
        self.latency = 0.0
        self.blackholed = False
        self.accepted = 0
        self.resets = 0
        self._links: set[_Link] = set()
        self._sniffers: list[Sniffer] = []
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.base_events.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="faultproxy",
                                        daemon=True)

    # --- life cycle ----------------------------------------------------------------------

    @property
    def url(self) -> str:
        """A Redis URL that goes through the proxy."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> FaultProxy:
        self._thread.start()
        self._server = self._run(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        if not self._thread.is_alive():
            return

        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for link in list(self._links):
                self._abort(link)
            # Let every connection's task end here, not be destroyed pending at exit.
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)

        with contextlib.suppress(Exception):
            self._run(close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- faults --------------------------------------------------------------------------

    def set_latency(self, seconds: float) -> None:
        """Deliver every chunk ``seconds`` after it arrived (0: no added latency)."""
        self.latency = max(0.0, seconds)

    def reset_all(self) -> int:
        """Reset (RST) every open connection; return how many there were."""

        async def reset() -> int:
            links = list(self._links)
            for link in links:
                self._abort(link)
            return len(links)

        count = self._run(reset())
        self.resets += count
        return count

    def blackhole(self) -> None:
        """Swallow every byte in both directions until :meth:`heal`."""
        self.blackholed = True

    def heal(self) -> None:
        self.blackholed = False

    def sniff(self, pattern: bytes, direction: str = "up") -> Sniffer:
        """Record first sightings of ``pattern`` flowing ``up`` (to the server) or ``down``."""
        if direction not in ("up", "down"):
            raise ValueError("direction is 'up' (client -> server) or 'down'")
        sniffer = Sniffer(re.compile(pattern), direction)
        self._sniffers.append(sniffer)
        return sniffer

    @property
    def connections(self) -> int:
        return len(self._links)

    # --- internals -------------------------------------------------------------------------

    def _run(self, coro):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    @staticmethod
    def _abort(link: _Link) -> None:
        for writer in (link.client, link.upstream):
            if writer is None:
                continue
            sock = writer.get_extra_info("socket")
            if sock is not None:
                # Linger 0: close() sends RST instead of FIN.
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        for task in link.tasks:
            task.cancel()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        link = _Link(writer)
        self._links.add(link)
        try:
            while self.blackholed:  # accepted, never answered
                if reader.at_eof():
                    return
                await asyncio.sleep(0.05)
            try:
                up_reader, up_writer = await asyncio.open_connection(*self.upstream)
            except OSError:
                self._abort(link)  # upstream down: the client sees a reset, as with no proxy
                return
            link.upstream = up_writer
            link.tasks = [
                asyncio.ensure_future(self._pipe(reader, up_writer, "up")),
                asyncio.ensure_future(self._pipe(up_reader, writer, "down")),
            ]
            await asyncio.wait(link.tasks, return_when=asyncio.FIRST_COMPLETED)
            self._abort_quietly(link)
        finally:
            self._links.discard(link)

    def _abort_quietly(self, link: _Link) -> None:
        for task in link.tasks:
            task.cancel()
        for w in (link.client, link.upstream):
            if w is not None:
                w.transport.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    direction: str) -> None:
        tails: dict[int, bytes] = {}
        pending: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()
        sender = asyncio.ensure_future(self._send(pending, writer))
        try:
            while True:
                data = await reader.read(_CHUNK)
                if not data or sender.done():  # EOF, or the other side is gone
                    break
                if self.blackholed:
                    continue
                for sniffer in self._sniffers:
                    if sniffer.direction == direction:
                        key = id(sniffer)
                        tails[key] = sniffer.feed(tails.get(key, b""), data)
                pending.put_nowait((time.monotonic() + self.latency, data))
        except (ConnectionError, OSError):
            sender.cancel()
            return
        except asyncio.CancelledError:
            sender.cancel()
            raise
        # End of stream: deliver what is still delayed, then pass the EOF on.
        pending.put_nowait(None)
        with contextlib.suppress(ConnectionError, OSError):
            await sender

    @staticmethod
    async def _send(pending: asyncio.Queue[tuple[float, bytes] | None],
                    writer: asyncio.StreamWriter) -> None:
        while (item := await pending.get()) is not None:
            due, data = item
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            writer.write(data)
            await writer.drain()
        with contextlib.suppress(OSError, RuntimeError):
            writer.write_eof()
