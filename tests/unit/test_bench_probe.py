"""The batch bench's online probe: a refused submit is counted, and the probe goes on."""

from __future__ import annotations

import time
from typing import Any

import fakeredis
import numpy as np

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
