"""The worker's garbage-collector pauses: kept short, and measured.

A full collection walks every tracked object of the process: a worker that imported Celery,
ONNX Runtime, numpy and its models holds about 90,000, a 50 ms stop of every thread (the
model's included) each time enough objects were promoted (every 1.3 s of one-row `mlp`
jobs at saturation). What the worker set up before serving lives as long as the process,
so :func:`freeze_startup_heap` moves it out of the collector's reach (``gc.freeze``): later
full collections walk only what serving allocated (and :func:`refreeze` gives it back once
when a version is unloaded). Every pause is observed in ``inferq_worker_gc_pause_seconds``
by generation.
"""

from __future__ import annotations

import bisect
import gc
import itertools
import time
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import HistogramMetricFamily, Metric

#: Up to the pauses a full collection of a large heap takes.
BUCKETS = (0.0001, 0.0003, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3)


def freeze_startup_heap() -> int:
    """Collect once, then freeze every object left (they outlive serving); the count."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def refreeze() -> int:
    """After something loaded before the freeze was let go (an unloaded model version):
    unfreeze, so a full collection can free its reference cycles, and freeze what is left
    again. One full pause, on a rare event; 0 when the heap was never frozen."""
    if not gc.get_freeze_count():
        return 0
    gc.unfreeze()
    return freeze_startup_heap()


class GcPauses:
    """The collector's pauses as a histogram of ``registry``: :meth:`start` times every
    collection of this process (``gc.callbacks``), :meth:`close` stops.

    No lock: a callback runs under the GIL and collections never overlap, and one taken in
    a scrape that a collection interrupted (a collection can start in any thread, the
    scraper's included) would deadlock it. A scrape may see a pause counted and its
    seconds not yet added: the next one adds up.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self._counts = [[0] * (len(BUCKETS) + 1) for _ in range(3)]
        self._sums = [0.0, 0.0, 0.0]
        self._started: float | None = None
        #: The longest pause seen, by generation (seconds).
        self.longest = [0.0, 0.0, 0.0]
        registry.register(self)

    def start(self) -> None:
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)

    def close(self) -> None:
        """Stop timing (the histogram keeps what it has)."""
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        if self._started is None:
            return
        paused, self._started = time.perf_counter() - self._started, None
        generation = min(2, int(info.get("generation", 2)))
        self._counts[generation][bisect.bisect_left(BUCKETS, paused)] += 1
        self._sums[generation] += paused
        if paused > self.longest[generation]:
            self.longest[generation] = paused

    def collect(self) -> Iterable[Metric]:
        family = HistogramMetricFamily(
            "inferq_worker_gc_pause_seconds",
            "Garbage-collector pauses of the worker process (every thread stops), by "
            "generation (2: a full collection).", labels=("generation",))
        bounds = [repr(float(b)) for b in BUCKETS] + ["+Inf"]
        for generation in range(3):
            cumulative = list(itertools.accumulate(list(self._counts[generation])))
            family.add_metric([str(generation)], list(zip(bounds, cumulative, strict=True)),
                              self._sums[generation])
        return [family]
