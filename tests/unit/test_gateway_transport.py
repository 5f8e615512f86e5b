"""The gateway's transport: the writes of one loop step leave as one write."""

from __future__ import annotations

import asyncio

from workers.gateway.transport import CoalescingTransport


class Recording(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.events: list[str] = []
        self.closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.events.append("close")
        self.closing = True

    def write_eof(self) -> None:
        self.events.append("eof")

    def get_write_buffer_size(self) -> int:
        return 7


def test_one_step_of_writes_is_one_write() -> None:
    async def main() -> Recording:
        inner = Recording()
        t = CoalescingTransport(inner, asyncio.get_running_loop())
        t.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
        t.write(b"")
        t.write(memoryview(b"ok"))
        assert inner.writes == []  # nothing leaves before the step ends
        await asyncio.sleep(0)
        assert inner.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"]
        t.writelines([b"a", b"b"])
        await asyncio.sleep(0)
        t.write(b"c")
        await asyncio.sleep(0)
        assert t.get_write_buffer_size() == 7  # the rest is the inner transport's
        return inner

    inner = asyncio.run(main())
    assert inner.writes[1:] == [b"ab", b"c"]


def test_close_and_eof_send_what_is_queued_first() -> None:
    async def main() -> Recording:
        inner = Recording()
        t = CoalescingTransport(inner, asyncio.get_running_loop())
        t.write(b"last words")
        t.write_eof()
        assert inner.writes == [b"last words"] and inner.events == ["eof"]
        t.write(b"bye")
        t.close()
        await asyncio.sleep(0)  # the scheduled flush finds nothing left
        t.write(b"after close")
        await asyncio.sleep(0)
        return inner

    inner = asyncio.run(main())
    assert inner.writes == [b"last words", b"bye"]
    assert inner.events == ["eof", "close"]
