"""The batch bench's PING probe: a process of its own, stopped on demand, its round trips
read back; one that cannot reach Redis fails loudly at its start."""

from __future__ import annotations

import time

import pytest

from workers.bench import batch
from workers.launch.redisproc import RedisServer


def test_the_ping_probe_runs_in_its_own_process_until_stopped(
        redis_server: RedisServer) -> None:
    pings = batch._Pings(redis_server.url)
    pings.start()
    assert pings.proc is not None and pings.proc.poll() is None
    proc = pings.proc
    time.sleep(0.3)
    ms = pings.done()
    assert proc.returncode == 0
    assert len(ms) >= 10 and all(m > 0 for m in ms)
    assert pings.done() == []  # stopping twice (the bench's cleanup) is harmless
    assert batch.ping_figures(ms)["pings"] == len(ms)


def test_a_ping_probe_that_cannot_reach_redis_fails_at_its_start() -> None:
    pings = batch._Pings("redis://127.0.0.1:1/0")
    with pytest.raises(RuntimeError, match="PING probe exited"):
        pings.start()


def test_pinged_returns_what_it_ran_and_stops_the_probe_even_when_that_raised(
        redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    value, ms = batch._pinged(redis_server.url, lambda: time.sleep(0.2) or "ran")
    assert value == "ran" and len(ms) >= 5
    started: list[batch._Pings] = []
    real_start = batch._Pings.start

    def recorded(self: batch._Pings) -> None:
        real_start(self)
        started.append(self)

    monkeypatch.setattr(batch._Pings, "start", recorded)

    def fails() -> None:
        raise ValueError("probe failed")

    with pytest.raises(ValueError, match="probe failed"):
        batch._pinged(redis_server.url, fails)
    assert len(started) == 1 and started[0].proc is None  # stopped and reaped
