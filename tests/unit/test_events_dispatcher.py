"""The task-event dispatcher: a lone job's events go out at once; a busy worker's are held
and published together at most ``min_interval_s`` later; nothing held is lost at close."""

from __future__ import annotations

import threading
import time
from typing import Any

from workers.serving.events import Dispatcher, Event, received


class FakeCeleryDispatcher:
    """Records what Celery's event dispatcher would publish: one list per flush."""

    def __init__(self) -> None:
        self.buffer: list[str] = []
        self.published: list[list[str]] = []
        self.closed = False
        self.lock = threading.Lock()

    def send(self, kind: str, **fields: Any) -> None:
        self.buffer.append(fields["uuid"])

    def flush(self) -> None:
        with self.lock:
            if self.buffer:
                self.published.append(self.buffer)
            self.buffer = []

    def close(self) -> None:
        self.closed = True


class FakeApp:
    def __init__(self) -> None:
        self.celery = FakeCeleryDispatcher()
        app = self

        class Events:
            def Dispatcher(self, *args: Any, **kwargs: Any) -> FakeCeleryDispatcher:
                return app.celery

        self.events = Events()

    def connection_for_write(self) -> Any:
        class Connection:
            def release(self) -> None:
                pass

        return Connection()


def events(*ids: str) -> list[Event]:
    return [received(i, "m", 1, 0) for i in ids]


def test_a_lone_batch_is_published_at_once() -> None:
    app = FakeApp()
    dispatcher = Dispatcher(app, "w@h", min_interval_s=0.2)
    dispatcher.send(events("a"))
    assert app.celery.published == [["a"]]


def test_batches_close_together_share_one_publish_within_the_interval() -> None:
    app = FakeApp()
    dispatcher = Dispatcher(app, "w@h", min_interval_s=0.2)
    dispatcher.send(events("a"))
    for i in range(50):
        dispatcher.send(events(f"b{i}"))
    assert app.celery.published == [["a"]]  # held: the last publish was just now
    deadline = time.monotonic() + 5
    while len(app.celery.published) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert app.celery.published == [["a"], [f"b{i}" for i in range(50)]]


def test_close_publishes_what_is_held() -> None:
    app = FakeApp()
    dispatcher = Dispatcher(app, "w@h", min_interval_s=60)
    dispatcher.send(events("a"))
    dispatcher.send(events("b", "c"))
    dispatcher.close()
    assert app.celery.published == [["a"], ["b", "c"]] and app.celery.closed
