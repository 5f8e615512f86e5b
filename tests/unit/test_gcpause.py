"""The worker's collector pauses: timed by generation, and the startup heap frozen."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry

from workers.ops.gcpause import GcPauses, freeze_startup_heap, refreeze


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def unfrozen() -> Iterator[None]:
    yield
    gc.unfreeze()  # the rest of the suite runs with the collector as it found it


def _count(registry: CollectorRegistry, generation: str) -> float:
    value = registry.get_sample_value("inferq_worker_gc_pause_seconds_count",
                                      {"generation": generation})
    assert value is not None
    return value


def test_every_collection_is_timed_by_generation(registry: CollectorRegistry) -> None:
    pauses = GcPauses(registry)
    gc.collect(2)
    assert _count(registry, "2") == 0  # exposed, not timing until started
    pauses.start()
    try:
        before = [_count(registry, g) for g in "012"]
        gc.collect(0)
        gc.collect(2)
        gc.collect(2)
        assert _count(registry, "0") - before[0] >= 1
        assert _count(registry, "2") - before[2] >= 2
        assert pauses.longest[2] > 0
        total = registry.get_sample_value("inferq_worker_gc_pause_seconds_sum",
                                          {"generation": "2"})
        assert total is not None and 0 < total < 10
    finally:
        pauses.close()
    assert pauses._callback not in gc.callbacks
    after = _count(registry, "2")
    gc.collect(2)
    assert _count(registry, "2") == after  # closed: no longer timed


def test_a_full_collection_after_the_freeze_walks_only_what_came_later(
    unfrozen: None,
) -> None:
    heap = [[i] for i in range(50_000)]  # stands for what a worker loads before serving
    frozen = freeze_startup_heap()
    assert frozen >= 50_000
    assert gc.get_count()[0] < 700  # collected just before, so nothing young is left behind
    assert gc.is_tracked(heap[0])
    assert all(not any(obj is heap[0] for obj in gc.get_objects(g)) for g in range(3))
    gc.unfreeze()
    assert any(obj is heap[0] for obj in gc.get_objects(2))


class _Session:
    """Stands for a model version loaded at start, holding a reference cycle."""

    def __init__(self) -> None:
        self.me = self


def test_a_version_let_go_after_the_freeze_is_collected_once_refrozen(
    unfrozen: None,
) -> None:
    assert refreeze() == 0 and gc.get_freeze_count() == 0  # never frozen: nothing to do
    session = _Session()
    gone = weakref.ref(session)
    freeze_startup_heap()
    del session  # the version is unloaded
    gc.collect()
    assert gone() is not None  # frozen: the collector does not see its cycle
    assert refreeze() > 0
    assert gone() is None
    assert gc.get_freeze_count() > 0  # and the rest is frozen again
