"""Jobs queued for a model no worker knows end NOT_FOUND after a grace period."""

from __future__ import annotations

import importlib.util
import json
from typing import Any

import fakeredis
import numpy as np
import pytest

from producer import wire
from producer.errors import ModelNotFound
from workers.ops.sweeper import UnknownQueueSweeper
from workers.serving.writer import ResultStore

pytestmark = pytest.mark.skipif(importlib.util.find_spec("lupa") is None,
                                reason="fakeredis runs Lua scripts only with 'lupa'")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def message(model: str, job_id: str, notify: str | None = None) -> bytes:
    tensors = {"x": wire.encode_tensor(np.zeros((1, 4), np.float32))}
    headers = {wire.HEADER_NOTIFY: notify} if notify else {}
    return wire.build_message(task=wire.TASK_NAME, task_id=job_id, args=[model, tensors],
                              kwargs={"version": None}, queue=wire.queue_name(model),
                              headers=headers)


@pytest.fixture
def r() -> Any:
    return fakeredis.FakeRedis()


def sweeper(r: Any, clock: Clock) -> UnknownQueueSweeper:
    return UnknownQueueSweeper(r, ResultStore(r, 600), "cpu0@test", grace_s=30, clock=clock)


def test_jobs_for_an_unknown_model_end_not_found_after_the_grace(r: Any) -> None:
    clock = Clock()
    r.lpush(wire.queue_name("digitz"), message("digitz", "j1", notify="c1"))
    r.lpush(wire.queue_name("digitz") + wire.PRIORITY_SEP + "3", message("digitz", "j2"))
    sweep = sweeper(r, clock)
    assert sweep.sweep() == 0, "within the grace nothing is answered"
    clock.now += 31
    assert sweep.sweep() == 2
    for job_id in ("j1", "j2"):
        failed = wire.read_result(job_id, r.get(wire.result_key(job_id)))
        assert isinstance(failed, ModelNotFound) and failed.model == "digitz"
        assert "no worker serves model 'digitz'" in failed.message
    assert r.lrange(wire.notify_key("c1"), 0, -1) == [b"j1"], "a waiting client is woken"
    assert not r.exists(wire.queue_name("digitz"), wire.UNACKED, wire.UNACKED_INDEX)


def test_registered_models_and_the_control_queue_are_left_alone(r: Any) -> None:
    """A registered model's workers may be scaling from zero: its jobs wait for them."""
    clock = Clock()
    r.hset(wire.MODELS_KEY, "digits", json.dumps({"versions": [1]}))
    r.lpush(wire.queue_name("digits"), message("digits", "j1"))
    r.lpush(wire.CONTROL_QUEUE, b"celery control message")
    sweep = sweeper(r, clock)
    sweep.sweep()
    clock.now += 3600
    assert sweep.sweep() == 0
    assert r.llen(wire.queue_name("digits")) == 1 and r.llen(wire.CONTROL_QUEUE) == 1


def test_a_queue_emptied_meanwhile_starts_its_grace_again(r: Any) -> None:
    clock = Clock()
    queue = wire.queue_name("late")
    r.lpush(queue, message("late", "j1"))
    sweep = sweeper(r, clock)
    sweep.sweep()
    r.delete(queue)  # a worker for it came up and took it
    clock.now += 20
    sweep.sweep()
    r.lpush(queue, message("late", "j2"))
    clock.now += 20
    assert sweep.sweep() == 0, "its grace starts again now"
    clock.now += 29
    assert sweep.sweep() == 0
    clock.now += 2
    assert sweep.sweep() == 1


def test_one_worker_sweeps_at_a_time(r: Any) -> None:
    clock = Clock()
    r.lpush(wire.queue_name("x"), message("x", "j1"))
    first, second = sweeper(r, clock), sweeper(r, clock)
    r.set("inferq:sweep:lock", b"cpu9@elsewhere")  # another worker is sweeping
    first()
    assert first._seen == {}, "the lock is held: this pass does nothing"
    r.delete("inferq:sweep:lock")
    second()
    assert second._seen and not r.exists("inferq:sweep:lock"), "released after its pass"


def test_a_sweep_scans_a_bounded_part_of_a_large_keyspace(r: Any) -> None:
    """Results fill the keyspace: each sweep goes on with the scan where the last stopped,
    at most ``scan_steps`` SCAN calls, and a queue found once is looked at directly."""
    clock = Clock()
    for start in range(0, 5000, 500):
        r.mset({wire.result_key(f"done-{i}"): b"{}" for i in range(start, start + 500)})
    r.lpush(wire.queue_name("lost"), message("lost", "j1"))
    sweep = UnknownQueueSweeper(r, ResultStore(r, 600), "cpu0@test", grace_s=30, clock=clock,
                                scan_steps=2, scan_count=100)
    calls = []
    scan = r.scan

    def counting_scan(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        return scan(*args, **kwargs)

    r.scan = counting_scan
    sweeps = 0
    while not sweep._seen:
        before = len(calls)
        sweep.sweep()
        sweeps += 1
        assert len(calls) - before <= 2, "a sweep makes at most scan_steps SCAN calls"
        assert sweeps < 100, "the queue is found within one pass over the keyspace"
    assert sweeps > 1, "5,000 keys are not scanned in one sweep of 2 x 100"
    clock.now += 31
    calls.clear()
    assert sweep.sweep() == 1, "found once, it is answered after its grace"
    assert wire.read_result("j1", r.get(wire.result_key("j1"))) is not None


def test_a_bulk_message_is_answered_job_by_job_and_its_entries_deleted(r: Any) -> None:
    from producer import submission

    clock = Clock()
    env = submission.envelope("digitz", "c1", "msgpack", None, None, 0)
    blobs: submission.Blobs = {}
    x = {"x": wire.encode_tensor(np.zeros((1, 4), np.float32), text=False)}
    [raw] = submission.bulk_messages(env, ["b1", "b2"], [x, x], blobs)
    [(key, entries)] = blobs.items()
    r.set(key, entries)
    r.lpush(wire.queue_name("digitz"), raw)
    sweep = sweeper(r, clock)
    sweep.sweep()
    clock.now += 31
    assert sweep.sweep() == 2
    assert all(isinstance(wire.read_result(i, r.get(wire.result_key(i))), ModelNotFound)
               for i in ("b1", "b2"))
    assert not r.exists(key), "the entries go with the message"
