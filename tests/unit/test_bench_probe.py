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


def test_the_batch_command_runs_to_its_end_with_its_memory_sampled(tmp_path: Any) -> None:
    import sys

    command = [sys.executable, "-c",
               "import json, time; time.sleep(0.4); print(json.dumps({'rows_per_s': 5.0}))"]
    summary, rss = batch._score(command, dict(os.environ), tmp_path / "run.log")
    assert summary == {"rows_per_s": 5.0}
    assert len(rss) >= 2 and min(rss) > 0
    failing = [sys.executable, "-c", "import sys; sys.stderr.write('no input'); sys.exit(3)"]
    with pytest.raises(RuntimeError, match="exited 3"):
        batch._score(failing, dict(os.environ), tmp_path / "fail.log")
    assert (tmp_path / "fail.log").read_text() == "no input"
