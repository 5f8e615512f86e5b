"""The batch bench's online probe: a refused submit is counted, and the probe goes on."""

from __future__ import annotations

import os
import subprocess
import time
from typing import Any

import fakeredis
import numpy as np
import pytest

from tests.unit.test_client_fakeredis import (  # noqa: F401  (fixtures)
    advertise,
    client,
    make_client,
    r,
    server,
)
from workers.bench import batch


def test_probe_counts_refused_submits_and_keeps_offering(
        client: Any, r: fakeredis.FakeRedis) -> None:  # noqa: F811  (fixtures)
    advertise(r, batch.MODEL, live=False)  # known, but no live worker serves it
    inputs = [{"pixels": np.zeros((1, 64), np.float32)}]
    probe = batch._Online(client, inputs, rate=2000.0)
    probe.start()
    time.sleep(0.2)
    probe.stop.set()
    probe.join(timeout=5)
    assert not probe.is_alive()
    assert probe.ids == [] and probe.refused["UNAVAILABLE"] > 10
    assert batch.figures([probe]) == {"jobs": 0, "refused": probe.refused}


def test_busy_loop_control_runs_one_loop_per_core_and_reaps_them(
        client: Any, r: fakeredis.FakeRedis,  # noqa: F811  (fixtures)
        monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[subprocess.Popen[bytes]] = []

    class Recorded(subprocess.Popen):  # type: ignore[type-arg]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            started.append(self)

    monkeypatch.setattr(batch.subprocess, "Popen", Recorded)
    advertise(r, batch.MODEL, live=False)
    probe = batch.hog_probe(client, [{"pixels": np.zeros((1, 64), np.float32)}], seconds=0.3)
    assert probe.refused["UNAVAILABLE"] > 0
    assert len(started) == len(os.sched_getaffinity(0))
    assert all(p.returncode is not None for p in started)  # killed and reaped
