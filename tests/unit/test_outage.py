"""An unreachable Redis is told once, reminded at a bounded rate, and retried with backoff."""

from __future__ import annotations

from typing import Any

import pytest

from workers.serving import outage as outage_module
from workers.serving.outage import Outage


class Log:
    def __init__(self) -> None:
        self.lines: list[tuple[str, dict[str, Any]]] = []

    def warning(self, event: str, **fields: Any) -> None:
        self.lines.append((event, fields))

    info = warning


def test_an_outage_is_told_once_reminded_rarely_and_backed_off(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [100.0]
    monkeypatch.setattr(outage_module.time, "monotonic", lambda: now[0])
    log = Log()
    outage = Outage(log, "queue", "redis://app:secret@db:6379/0", every_s=30)
    delays = []
    for _ in range(80):  # 40 s of failures, one every 0.5 s
        delays.append(outage.failed(ConnectionError("refused")))
        now[0] += 0.5
    events = [e for e, _ in log.lines]
    assert events == ["redis_unreachable", "redis_still_unreachable"]
    assert "secret" not in str(log.lines) and "app:***@db:6379" in str(log.lines)
    assert delays[:4] == [0.05, 0.1, 0.2, 0.4] and max(delays) == 5.0
    outage.recovered()
    assert log.lines[-1][0] == "redis_reachable_again"
    assert outage.failed(ConnectionError("again")) == 0.05, "backoff starts over"


def test_no_outage_no_line() -> None:
    log = Log()
    Outage(log, "queue", "redis://localhost:6379/0").recovered()
    assert log.lines == []
