"""Messages taken from a queue and not yet acknowledged.

A message may carry many jobs; it is acked (and its blobs deleted) only once every one of
them has a result ready to store, so a crash before that hands the whole message back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from producer.wire import Notify


@dataclass(slots=True)
class Message:
    """One drained message: its delivery tag, whom to notify, and jobs still open."""

    tag: str
    notify: Notify | None
    open_jobs: int
    blobs: Sequence[str]
    #: From the lowest-priority list (batch runs): online jobs go ahead of its jobs.
    background: bool = False


class InFlight:
    """The open messages of one model server."""

    def __init__(self) -> None:
        self._touched: list[Message] = []

    def add(self, tag: str, notify: Notify | None, jobs: int, blobs: Sequence[str],
            background: bool = False) -> Message:
        """Record a drained message carrying ``jobs`` jobs."""
        message = Message(tag, notify, jobs, blobs, background)
        self._touched.append(message)
        return message

    @staticmethod
    def close(message: Message) -> None:
        """One job of ``message`` has its outcome."""
        message.open_jobs -= 1

    def take_done(self) -> tuple[list[str], list[str]]:
        """Tags and blobs of the messages with no job left open; they are forgotten here."""
        if not self._touched:
            return [], []
        done = [m for m in self._touched if m.open_jobs <= 0]
        if not done:
            return [], []
        self._touched = [m for m in self._touched if m.open_jobs > 0]
        return [m.tag for m in done], [b for m in done for b in m.blobs]
