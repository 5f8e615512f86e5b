"""The isolated bench's core split and the profile's stage attribution."""

from __future__ import annotations

import pytest

from workers.bench.isolate import split_cores
from workers.bench.profile import OTHER, parse_raw, stage_of


def test_the_worker_gets_half_the_cores_and_never_all() -> None:
    assert split_cores([0, 1]) == ([1], [0])
    assert split_cores([0, 1, 2, 3, 4]) == ([3, 4], [0, 1, 2])
    with pytest.raises(ValueError, match="at least 2 cores"):
        split_cores([0])


def test_a_sample_goes_to_the_innermost_inferq_stage() -> None:
    loop = "ModelServer._run_batch (workers/serving/loop.py:300)"
    model = "LoadedModel.run (workers/serving/runtime.py:84)"
    ort = "Session.run (onnxruntime/capi/onnxruntime_inference_collection.py:406)"
    write = "ResultStore.store (workers/serving/writer.py:120)"
    redis_read = "_HiredisParser.read_from_socket (redis/_parsers/hiredis.py:192)"
    assert stage_of([loop, model, ort]) == "model"
    assert stage_of([loop, write, redis_read]) == "Redis writes (results, acks)"
    assert stage_of([loop]) == "serving loop"
    assert stage_of(["<module> (celery/bin/worker.py:1)"]) == OTHER
    pack = "HiredisRespSerializer.pack (redis/connection.py:139)"
    raw = (f"{loop};{model};{ort} 30\n{loop};{write};{pack} 10\n"
           f"{loop} 5\nnot a sample line\n")
    assert parse_raw(raw) == {"model": 30, "Redis writes (results, acks)": 10,
                              "serving loop": 5}


def test_samples_of_waiting_threads_are_not_charged_to_a_stage() -> None:
    """A thread blocked on a lock or on Redis's reply is idle: its samples count nowhere
    (the CPU per job is measured; samples only split it)."""
    write = "ResultWriter._loop (workers/serving/writer.py:194)"
    store = "ResultStore.store (workers/serving/writer.py:120)"
    raw = (f"{write};Queue.get (queue.py:171);Condition.wait (threading.py:327) 40\n"
           f"{write};{store};_HiredisParser.read_from_socket (redis/_parsers/hiredis.py:192) 7\n"
           f"{write};{store};Condition.notify (threading.py:382) 3\n")
    assert parse_raw(raw) == {"Redis writes (results, acks)": 3}
