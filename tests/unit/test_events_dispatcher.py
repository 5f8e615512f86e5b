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


def test_a_lone_batch_is_published_at_once() -> None:
    app = FakeApp()
    dispatcher = Dispatcher(app, "w@h", min_interval_s=0.2)
    dispatcher.send(events("a"))
    assert app.celery.published == [["a"]]
    # One message as Celery sends a buffered group: to task.multi, already JSON.
    assert app.celery.messages[0]["routing_key"] == "task.multi"
    assert app.celery.messages[0]["content_type"] == "application/json"


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
