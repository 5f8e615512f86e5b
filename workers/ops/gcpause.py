"""The worker's garbage-collector pauses: kept short, and measured.

A full collection walks every tracked object of the process: a worker that imported Celery,
ONNX Runtime, numpy and its models holds about 90,000, a 30 ms stop of every thread (the
model's included) each time enough objects were promoted under load. What the worker set up
before serving lives as long as the process, so :func:`freeze_startup_heap` moves it out of
the collector's reach (``gc.freeze``): later full collections walk only what serving
allocated (and :func:`refreeze` gives it back once when a version is unloaded). Every pause
is observed in ``inferq_worker_gc_pause_seconds`` by generation.
"""

from __future__ import annotations

import gc
import threading
import time
from typing import Any

from prometheus_client import CollectorRegistry, Histogram

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
    """Times every collection through ``gc.callbacks`` into a histogram of ``registry``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.histogram = Histogram(
            "inferq_worker_gc_pause_seconds",
            "Garbage-collector pauses of the worker process (every thread stops), by "
            "generation (2: a full collection).", ("generation",), buckets=BUCKETS,
            registry=registry)
        self._children = [self.histogram.labels(str(g)) for g in range(3)]
        # Collections run one at a time under the GIL, but on whichever thread allocated.
        self._started = threading.local()
        #: The longest pause seen, by generation (seconds).
        self.longest = [0.0, 0.0, 0.0]
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started.at = time.perf_counter()
            return
        started = getattr(self._started, "at", None)
        if started is None:
            return
        paused = time.perf_counter() - started
        generation = min(2, int(info.get("generation", 2)))
        self._children[generation].observe(paused)
        if paused > self.longest[generation]:
            self.longest[generation] = paused

    def close(self) -> None:
        """Stop timing (the histogram keeps what it has)."""
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)
