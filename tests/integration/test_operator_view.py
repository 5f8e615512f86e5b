"""What an operator sees, against a real worker: Flower's task list (model, version, the job's
own runtime) and the Prometheus series of a worker and of the exporter (one owner each,
Redis health from the exporter even while Redis is down)."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sklearn.datasets import load_digits

from producer import InferenceClient, JobFailed, ModelNotFound
from tests.conftest import WorkerProcess
from tests.ops.test_ops_config import FLOWER_COLUMNS
from tests.security.support import FlowerProcess
from workers.launch.redisproc import RedisServer, free_port
from workers.ops import exporter as exporter_module

pytestmark = pytest.mark.integration

X = load_digits().data.astype(np.float32)
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _parse(text: str) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        return _parse(reply.read().decode())


def _wait(check: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (found := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return found


@pytest.fixture
def flower(redis_server: RedisServer, shared_worker: WorkerProcess, tmp_path: Path
           ) -> Iterator[FlowerProcess]:
    """Flower configured as the compose stack runs it (task columns), API open on loopback."""
    proc = FlowerProcess(redis_server.url, tmp_path / "flower.log",
                         FLOWER_UNAUTHENTICATED_API="true", FLOWER_TASKS_COLUMNS=FLOWER_COLUMNS)
    try:
        proc.wait_listening()
        yield proc
    finally:
        proc.stop()


def _task(flower: FlowerProcess, job_id: str, state: str) -> dict[str, Any] | None:
    status, body = flower.request(f"/api/task/info/{job_id}")
    if status != 200:
        return None
    info: dict[str, Any] = json.loads(body)
    return info if info.get("state") == state else None


def test_flower_lists_each_job_with_its_model_version_and_own_runtime(
    redis_server: RedisServer, flower: FlowerProcess
) -> None:
    with InferenceClient(redis_server.url) as client:
        # Flower hears only the events sent after it subscribed: wait until it hears one.
        def heard() -> bool:
            probe = client.submit("digits", {"pixels": X[0]})
            probe.result(timeout=30)
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                if _task(flower, probe.id, "SUCCESS"):
                    return True
                time.sleep(0.1)
            return False

        _wait(heard, "Flower to receive task events", timeout=60)
        jobs = client.submit_many("digits", [{"pixels": x} for x in X[:16]])
        results = client.results([j.id for j in jobs], timeout=30)
        unchecked = InferenceClient(redis_server.url, validate=False)
        missing = unchecked.submit("digits", {"pixels": X[:1]}, version=99)
        [outcome] = client.outcomes([missing.id], timeout=30)
        assert isinstance(outcome, ModelNotFound)

    for job, result in zip(jobs, results, strict=True):
        info = _wait(partial(_task, flower, job.id, "SUCCESS"), f"job {job.id} in Flower")
        # The wire task name, with the model and the version it ran on beside it.
        assert info["name"] == "inferq.infer"
        assert info["args"] == "('digits',)"
        assert info["kwargs"] == f"{{'version': {result.version}}}"
        # Runtime is the job's own time in the worker: its batch wait plus the model run.
        batch_wait, inference = result.timings_ms["batch_wait"], result.timings_ms["inference"]
        assert batch_wait is not None and inference is not None
        assert info["runtime"] == pytest.approx((batch_wait + inference) / 1000, abs=2e-3)
        assert info["runtime"] >= inference / 1000
        # Received is the pick-up, Started the batch's start.
        assert info["started"] - info["received"] == pytest.approx(batch_wait / 1000, abs=2e-3)
        assert info["received"] <= info["started"] <= info["succeeded"]

    failed = _wait(lambda: _task(flower, missing.id, "FAILURE"), "the failed job in Flower")
    assert failed["args"] == "('digits',)"
    assert failed["kwargs"] == "{'version': None}"  # no version was resolved
    assert "99" in failed["exception"]

    # The task list's columns: the model and version are visible without opening a task.
    status, page = flower.request("/tasks")
    assert status == 200
    for column in ('data-column="args"', 'data-column="kwargs"', 'data-column="runtime"'):
        assert column.encode() in page, column


def test_worker_exports_its_jobs_and_the_exporter_the_queues_and_redis(
    redis_server: RedisServer, shared_worker: WorkerProcess
) -> None:
    ports = [r["port"] for r in shared_worker.log_records()
             if r.get("event") == "metrics_listening"]
    assert ports, "the worker did not log its metrics port"
    port = int(ports[-1])  # type: ignore[call-overload]

    def count(samples: Samples, name: str, **labels: str) -> float:
        return sum(v for (n, ls), v in samples.items()
                   if n == name and all(dict(ls).get(k) == w for k, w in labels.items()))

    before = _scrape(port)
    with InferenceClient(redis_server.url, validate=False) as client:
        missing = client.submit("digits", {"pixels": X[:1]}, version=99)
        good = client.submit("digits", {"pixels": X[:1]})
        assert isinstance(client.outcomes([missing.id], timeout=30)[0], JobFailed)
        good.result(timeout=30)

    def grew(name: str, **labels: str) -> float:
        return count(after, name, **labels) - count(before, name, **labels)

    # A lone job's metrics are recorded a moment after its result is stored.
    deadline = time.monotonic() + 5
    while True:
        after = _scrape(port)
        if (grew("inferq_job_latency_seconds_count", model="digits", code="OK") >= 1
                or time.monotonic() > deadline):
            break
        time.sleep(0.01)

    # A failure before a version was resolved is labelled "none", never "".
    assert grew("inferq_jobs_total", model="digits", version="none", code="NOT_FOUND") == 1
    assert not [k for k in after if ("version", "") in k[1]]
    # Latency by code; a job refused before its batch has no latency.
    assert grew("inferq_job_latency_seconds_count", model="digits", code="OK") == 1
    assert grew("inferq_job_latency_seconds_count", model="digits", code="NOT_FOUND") == 0
    assert count(after, "inferq_model_ready", model="digits", version="2") == 1
    assert count(after, "inferq_worker_ready") == 1
    # One owner per series: the worker exports no queue or Redis gauge.
    assert not [n for n, _ in after if n.startswith(
        ("inferq_queue_depth", "inferq_queue_oldest", "inferq_queue_consumers", "inferq_redis"))]

    exporter = exporter_module.QueueExporter(redis_server.client())
    exporter.sample()
    samples: Samples = {(s.name, frozenset(s.labels.items())): s.value
                        for m in exporter.collect() for s in m.samples}
    assert count(samples, "inferq_redis_up") == 1
    assert count(samples, "inferq_redis_memory_used_bytes") > 0
    assert ("inferq_redis_maxmemory_bytes", frozenset()) in samples
    assert ("inferq_queue_depth", frozenset({("model", "digits")})) in samples


def test_exporter_answers_with_redis_down_while_redis_is_stopped(
    fresh_redis: RedisServer,
) -> None:
    port, stop = free_port(), threading.Event()
    thread = threading.Thread(target=exporter_module.run_exporter,
                              args=(fresh_redis.url, port, 0.1),
                              kwargs={"stop": stop, "addr": "127.0.0.1"}, daemon=True)
    thread.start()

    def redis_up() -> float | None:
        try:
            return _scrape(port).get(("inferq_redis_up", frozenset()))
        except OSError:
            return None

    try:
        _wait(lambda: redis_up() == 1, "the exporter to read Redis")
        fresh_redis.kill()
        _wait(lambda: redis_up() == 0, "the exporter to report Redis down")
        assert not [n for n, _ in _scrape(port) if n != "inferq_redis_up"]
        fresh_redis.restart()
        _wait(lambda: redis_up() == 1, "the exporter to see Redis back")
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not thread.is_alive()
