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
