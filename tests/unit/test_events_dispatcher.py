"""The task-event dispatcher: a lone job's events go out at once; a busy worker's are held
and published together at most ``min_interval_s`` later; nothing held is lost at close."""

from __future__ import annotations

import json
import threading
import time
import types
from typing import Any

from workers.serving.events import Dispatcher, Event, received


class FakeCeleryDispatcher:
    """What the dispatcher uses of Celery's: its producer (recording each publish), clock,
    exchange and identity."""

    def __init__(self) -> None:
        self.published: list[list[str]] = []
        self.messages: list[dict[str, Any]] = []
        self.closed = False
        self.enabled = True
        self.hostname, self.pid, self.delivery_mode = "w@h", 42, 1
        self.headers = {"hostname": "w@h"}
        self.mutex = threading.Lock()
        self.exchange = types.SimpleNamespace(name="celeryev")
        ticks = iter(range(1, 10**6))
        self.clock = types.SimpleNamespace(forward=lambda: next(ticks))
        self.producer = types.SimpleNamespace(publish=self._publish)

    def _publish(self, body: bytes, **kwargs: Any) -> None:
        events = json.loads(body)
        self.messages.append(kwargs)
        self.published.append([e["uuid"] for e in events])
        for event in events:
            assert {"type", "timestamp", "hostname", "utcoffset", "pid", "clock"} <= set(event)

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


def published(app: FakeApp, count: int, timeout: float = 5.0) -> list[list[str]]:
    """What was published once ``count`` publishes happened (or ``timeout`` passed)."""
    deadline = time.monotonic() + timeout
    while len(app.celery.published) < count and time.monotonic() < deadline:
        time.sleep(0.005)
    return app.celery.published


def test_a_lone_batch_is_published_at_once() -> None:
    app = FakeApp()
    dispatcher = Dispatcher(app, "w@h", min_interval_s=0.2)
    started = time.monotonic()
    dispatcher.send(events("a"))
    assert published(app, 1) == [["a"]]
    assert time.monotonic() - started < 0.15  # not held for the interval
    # One message as Celery sends a buffered group: to task.multi, already JSON.
    assert app.celery.messages[0]["routing_key"] == "task.multi"
    assert app.celery.messages[0]["content_type"] == "application/json"


def test_batches_close_together_share_one_publish_within_the_interval() -> None:
    app = FakeApp()
    dispatcher = Dispatcher(app, "w@h", min_interval_s=0.2)
    dispatcher.send(events("a"))
    assert published(app, 1) == [["a"]]
    for i in range(50):
        dispatcher.send(events(f"b{i}"))
    time.sleep(0.05)
    assert app.celery.published == [["a"]]  # held: the last publish was just now
    assert published(app, 2) == [["a"], [f"b{i}" for i in range(50)]]


def test_close_publishes_what_is_held() -> None:
    app = FakeApp()
    dispatcher = Dispatcher(app, "w@h", min_interval_s=60)
    dispatcher.send(events("a"))
    assert published(app, 1) == [["a"]]
    dispatcher.send(events("b", "c"))
    dispatcher.close()
    assert app.celery.published == [["a"], ["b", "c"]] and app.celery.closed
