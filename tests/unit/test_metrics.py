"""Worker metrics: the per-process registry over real HTTP, the metrics observer, the
sampler and the exporter against fakeredis, NVML through a stand-in module."""

from __future__ import annotations

import json
import sys
import threading
import time
import types
import urllib.request
from collections.abc import Iterator
from typing import Any

import fakeredis
import pytest
import redis
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from producer import wire
from producer.errors import DeadlineExceeded, InternalError, InvalidInput, ModelNotFound
from producer.wire import DLQ_KEY, JobRequest
from workers.launch.redisproc import free_port
from workers.ops import exporter as exporter_module
from workers.ops import gpu, metrics, queues
from workers.ops.exporter import QueueExporter
from workers.ops.metrics import MetricsObserver, WorkerMetrics, metrics_port, port_from_env
from workers.serving.inflight import Message
from workers.serving.intake import Pending
from workers.serving.observers import Batch

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of a text exposition, keyed by (sample name, labels)."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        assert reply.status == 200
        return str(reply.read().decode())


def message(enqueued_at: Any = None, *, bulk: bool = False) -> bytes:
    job_id = wire.new_id()
    headers: dict[str, Any] = {}
    if enqueued_at is not None:
        headers[wire.HEADER_ENQUEUED_AT] = enqueued_at
    if bulk:
        headers[wire.HEADER_JOB_IDS] = [job_id]
    return wire.build_message(
        task=wire.BULK_TASK_NAME if bulk else wire.TASK_NAME, task_id=job_id,
        args=["digits", {}], kwargs={"version": None}, queue="inferq.digits", headers=headers)


class InfoRedis(fakeredis.FakeRedis):
    """fakeredis with the ``INFO memory`` fields the exporter reads (fakeredis has no INFO)."""

    def info(self, section: str | None = None, *args: Any, **kwargs: Any) -> dict[str, Any]:
        assert section == "memory"
        return {"used_memory": 3 * 2**30, "maxmemory": 4 * 2**30,
                "maxmemory_policy": "noeviction"}


@pytest.fixture
def client() -> fakeredis.FakeRedis:
    return InfoRedis()


@pytest.fixture
def worker_metrics() -> Iterator[WorkerMetrics]:
    m = WorkerMetrics()
    yield m
    m.close()


# --- ports -------------------------------------------------------------------------------


def test_metrics_port_per_worker() -> None:
    assert metrics_port(9464, 0) == 9464
    assert metrics_port(9464, 3) == 9467
    assert metrics_port(0, 5) == 0  # ephemeral stays ephemeral
    for base, index in ((9464, -1), (-1, 0), (65536, 0), (65535, 1)):
        with pytest.raises(ValueError):
            metrics_port(base, index)


def test_port_from_env() -> None:
    assert port_from_env({}) == metrics.DEFAULT_PORT == 9464
    assert port_from_env({"INFERQ_METRICS_PORT": "9500"}) == 9500
    assert port_from_env({"INFERQ_METRICS_PORT": "0"}) == 0
    assert port_from_env({"INFERQ_METRICS_PORT": "off"}) is None
    with pytest.raises(ValueError, match="INFERQ_METRICS_PORT"):
        port_from_env({"INFERQ_METRICS_PORT": "http"})


# --- the worker registry over HTTP ---------------------------------------------------------


def test_http_scrape_has_every_worker_metric(worker_metrics: WorkerMetrics) -> None:
    m = worker_metrics
    m.model_loaded("digits", 2, "CPUExecutionProvider", 0.25)
    m.job_done("digits", 2, "OK", 0.001, 0.0004, 0.003)
    m.job_done("digits", None, "INVALID_ARGUMENT", None, None, None)
    m.jobs_done_bulk("digits", 2, "OK", queue_s=[0.002] * 20, batch_wait_s=[0.0005] * 30,
                     latency_s=[0.04] * 30)
    m.batch_done("digits", 2, 31, 0.0002)
    m.set_ready(True)
    port = m.start_http(0)
    assert port > 0
    s = parse(scrape(port))

    assert value(s, "inferq_jobs_total", model="digits", version="2", code="OK") == 31
    # No version resolved: "none", never "" (which Prometheus reads as no label at all).
    assert value(s, "inferq_jobs_total", model="digits", version="none",
                 code="INVALID_ARGUMENT") == 1
    assert not [k for k in s if ("version", "") in k[1]]
    # model_loaded starts every code at 0, so rate() sees the first error.
    assert value(s, "inferq_jobs_total", model="digits", version="2", code="POISONED") == 0
    assert value(s, "inferq_jobs_total", model="digits", version="none", code="NOT_FOUND") == 0
    assert value(s, "inferq_queue_seconds_count", model="digits") == 21
    assert value(s, "inferq_queue_seconds_bucket", model="digits", le="0.001") == 1
    assert value(s, "inferq_queue_seconds_bucket", model="digits", le="0.0025") == 21
    assert value(s, "inferq_queue_seconds_sum", model="digits") == pytest.approx(0.041)
    # A value equal to a bound falls in that bucket (le), on both the single and bulk paths.
    assert value(s, "inferq_batch_wait_seconds_bucket", model="digits", le="0.0005") == 31
    ok = {"model": "digits", "code": "OK"}
    assert value(s, "inferq_job_latency_seconds_bucket", **ok, le="0.0025") == 0
    assert value(s, "inferq_job_latency_seconds_bucket", **ok, le="0.025") == 1
    assert value(s, "inferq_job_latency_seconds_bucket", **ok, le="0.05") == 31
    assert value(s, "inferq_job_latency_seconds_bucket", **ok, le="+Inf") == 31
    assert value(s, "inferq_compute_seconds_count", model="digits", version="2") == 1
    assert value(s, "inferq_batch_rows_bucket", model="digits", le="16.0") == 0
    assert value(s, "inferq_batch_rows_bucket", model="digits", le="32.0") == 1
    assert value(s, "inferq_batch_rows_bucket", model="digits", le="1024.0") == 1
    assert value(s, "inferq_model_load_seconds", model="digits", version="2") == 0.25
    assert value(s, "inferq_model_info", model="digits", version="2",
                 provider="CPUExecutionProvider") == 1
    assert value(s, "inferq_worker_ready") == 1
    # Loaded, verified and warm is ready.
    assert value(s, "inferq_model_ready", model="digits", version="2") == 1
    m.set_ready(False)
    m.model_ready("digits", 3, False)  # the bootstep logs why
    s = parse(scrape(port))
    assert value(s, "inferq_worker_ready") == 0
    assert value(s, "inferq_model_ready", model="digits", version="3") == 0
    assert value(s, "inferq_model_ready", model="digits", version="2") == 1
    assert not [k for k in s if k[0].startswith(("inferq_queue_depth", "inferq_queue_oldest",
                                                 "inferq_queue_consumers", "inferq_redis_"))]


def test_bulk_and_single_paths_agree() -> None:
    values = [0.0, 0.0005, 0.0007, 0.001, 0.3, 29.0, 31.0, -0.002]  # negative: clock skew
    single, bulk = WorkerMetrics(), WorkerMetrics()
    for v in values * 3:
        single.job_done("m", 1, "OK", v, v, v)
    bulk.jobs_done_bulk("m", 1, "OK", values * 3, values * 3, values * 3)  # numpy path
    a = parse(generate_latest(single.registry).decode())
    b = parse(generate_latest(bulk.registry).decode())
    hist = {k: v for k, v in a.items() if k[0].startswith("inferq_")}
    assert hist == pytest.approx({k: v for k, v in b.items() if k[0].startswith("inferq_")})
    assert value(a, "inferq_queue_seconds_bucket", model="m", le="0.0005") == 9
    assert value(a, "inferq_queue_seconds_bucket", model="m", le="30.0") == 21


# --- the observer ----------------------------------------------------------------------------


def pending(job_id: str, picked_at: float, enqueued_at: float | None = None) -> Pending:
    job = JobRequest(job_id, "digits", None, {}, enqueued_at=enqueued_at)
    return Pending(job, 2, {}, 1, Message("tag", None, 1, []), picked_at=picked_at)


def test_observer_counts_each_job_once_and_times_failures_by_code() -> None:
    m = WorkerMetrics()
    observer = MetricsObserver(m, "digits")
    # Refused at intake, before a version was resolved and before any batch.
    observer.job_failed("early", ModelNotFound("no version 9"), None)
    observer.job_failed("late", DeadlineExceeded("too late"), 2)
    jobs = [pending("a", 100.0, 99.0), pending("b", 100.5), pending("c", 100.0, 99.5),
            pending("d", 100.0, 99.0)]
    batch = Batch("digits", 2, "CPUExecutionProvider", jobs, 4, started=101.0)
    observer.batch_started(batch)
    boom = InternalError("the model failed", job_id="c")
    bad = InvalidInput("nan", job_id="d")
    # The loop reports a batch's failures one by one, then the batch.
    observer.job_failed("c", boom, 2)
    observer.job_failed("d", bad, 2)
    batch.finished, batch.stored = 101.25, 101.5
    observer.batch_done(batch, [{}, {}, boom, bad])
    s = parse(generate_latest(m.registry).decode())

    def jobs_total(version: str, code: str) -> float:
        return value(s, "inferq_jobs_total", model="digits", version=version, code=code)

    assert jobs_total("2", "OK") == 2
    assert jobs_total("2", "INTERNAL") == 1 and jobs_total("2", "INVALID_ARGUMENT") == 1
    assert jobs_total("none", "NOT_FOUND") == 1
    assert jobs_total("2", "DEADLINE_EXCEEDED") == 1

    def latency(code: str, le: str = "+Inf") -> float:
        return value(s, "inferq_job_latency_seconds_bucket", model="digits", code=code, le=le)

    # Enqueue (else pick-up) to stored: a 2.5 s, b 1.0 s, c 2.0 s, d 2.5 s.
    assert latency("OK") == 2 and latency("OK", "1.0") == 1
    assert value(s, "inferq_job_latency_seconds_sum", model="digits", code="OK") == 3.5
    assert latency("INTERNAL") == 1 and latency("INTERNAL", "1.0") == 0
    assert latency("INVALID_ARGUMENT") == 1
    # Failures before a batch have no batch timings.
    assert not [k for k in s if k[0] == "inferq_job_latency_seconds_count"
                and dict(k[1])["code"] in ("NOT_FOUND", "DEADLINE_EXCEEDED")]
    assert value(s, "inferq_batch_wait_seconds_count", model="digits") == 4
    assert value(s, "inferq_queue_seconds_count", model="digits") == 3

    # A later failure outside a batch (a poisoned job runs no batch) is counted again.
    observer.job_failed("c", boom, 2)
    s = parse(generate_latest(m.registry).decode())
    assert value(s, "inferq_jobs_total", model="digits", version="2", code="INTERNAL") == 2


def test_registry_is_per_instance() -> None:
    a, b = WorkerMetrics(), WorkerMetrics(CollectorRegistry())
    a.job_done("m", 1, "OK", None, None, 0.1)
    assert value(parse(generate_latest(a.registry).decode()),
                 "inferq_jobs_total", model="m", version="1", code="OK") == 1
    other = parse(generate_latest(b.registry).decode())
    assert not [k for k in other if k[0] == "inferq_jobs_total"]


def test_start_http_on_a_taken_port_raises(worker_metrics: WorkerMetrics) -> None:
    port = worker_metrics.start_http(0)
    other = WorkerMetrics()
    with pytest.raises(OSError):
        other.start_http(port)


# --- sampler -------------------------------------------------------------------------------


def test_queue_stats_counts_priority_lists_and_oldest_age(client: fakeredis.FakeRedis) -> None:
    now = 1_700_000_100.0
    queue = wire.queue_name("digits")
    client.lpush(queue, message(now - 30))  # oldest: pushed first, popped from the right
    client.lpush(queue, message(now - 5))
    client.lpush(queue, message())  # no header
    client.lpush(queue + "\x06\x166", message(now - 50, bulk=True))
    client.lpush(queue + "\x06\x169", b"not json")
    client.lpush(wire.queue_name("mlp"), message())
    stats = queues.queue_stats(client, ["digits", "mlp", "idle"], now=now)
    assert stats["digits"][0] == 5
    assert stats["digits"][1] == pytest.approx(50.0)
    assert stats["mlp"] == (1, 0.0)  # unstamped: age unknown -> 0
    assert stats["idle"] == (0, 0.0)


def test_enqueued_at_forms() -> None:
    assert queues._enqueued_at(message(12.5)) == 12.5
    assert queues._enqueued_at(message("1970-01-01T00:01:00+00:00")) == 60.0
    assert queues._enqueued_at(message("1970-01-01T00:01:00")) == 60.0  # naive: UTC
    for raw in (message(), message(True), message("soon"), b"[]", b"{", None):
        assert queues._enqueued_at(raw) is None


def test_workers_do_not_export_queue_gauges(client: fakeredis.FakeRedis,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """One owner per series: queue depth and age come from the exporter only."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no NVML on a CPU worker
    client.lpush(wire.queue_name("digits"), message(time.time() - 2))
    m = WorkerMetrics()
    thread = m.start_sampler(client, ["digits"], interval_s=0.05)  # the former signature
    thread.join(timeout=5)
    assert not thread.is_alive(), "without NVML the sampler has nothing to do"
    m.sample(None)
    text = generate_latest(m.registry).decode()
    assert "inferq_queue_depth" not in text and "inferq_queue_oldest_age_seconds" not in text
    m.close()


def test_close_stops_a_sampler_with_its_own_stop_event(client: fakeredis.FakeRedis) -> None:
    m = WorkerMetrics()
    thread = m.start_sampler(client, ["digits"], interval_s=60, stop=threading.Event())
    started = time.monotonic()
    m.close()
    assert not thread.is_alive() and time.monotonic() - started < 5


# --- NVML ----------------------------------------------------------------------------------


def fake_nvml(count: int = 2, fail_init: bool = False) -> types.ModuleType:
    """A stand-in ``pynvml`` with ``count`` GPUs of 80 GB, GPU i busy (10 * i + 40)%."""
    mod = types.ModuleType("pynvml")
    state = {"shutdown": False}

    def init() -> None:
        if fail_init:
            raise RuntimeError("NVML Shared Library Not Found")

    def shutdown() -> None:
        state["shutdown"] = True

    mod.nvmlInit = init  # type: ignore[attr-defined]
    mod.nvmlShutdown = shutdown  # type: ignore[attr-defined]
    mod.nvmlDeviceGetCount = lambda: count  # type: ignore[attr-defined]
    mod.nvmlDeviceGetHandleByIndex = lambda i: i  # type: ignore[attr-defined]
    mod.nvmlDeviceGetUUID = lambda h: f"GPU-{h}aaa-bbbb".encode()  # type: ignore[attr-defined]
    mod.nvmlDeviceGetUtilizationRates = (  # type: ignore[attr-defined]
        lambda h: types.SimpleNamespace(gpu=10 * h + 40, memory=0))
    mod.nvmlDeviceGetMemoryInfo = (  # type: ignore[attr-defined]
        lambda h: types.SimpleNamespace(used=(h + 1) * 10**9, total=80 * 10**9, free=0))
    mod.state = state  # type: ignore[attr-defined]
    return mod


@pytest.mark.parametrize(("mask", "gpus"), [
    (None, ["0", "1"]), ("1", ["1"]), ("0,1", ["0", "1"]), ("GPU-1aaa", ["1"]), ("7", []),
])
def test_gpu_gauges_follow_cuda_visible_devices(
    monkeypatch: pytest.MonkeyPatch, client: fakeredis.FakeRedis, mask: str | None,
    gpus: list[str],
) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml())
    nvml = gpu.Nvml.open(mask)
    assert nvml is not None
    m = WorkerMetrics()
    m.sample(nvml)
    s = parse(generate_latest(m.registry).decode())
    found = sorted(dict(k[1])["gpu"] for k in s if k[0] == "inferq_gpu_utilization_ratio")
    assert found == gpus
    if "1" in gpus:
        assert value(s, "inferq_gpu_utilization_ratio", gpu="1") == 0.5
        assert value(s, "inferq_gpu_memory_used_bytes", gpu="1") == 2e9
        assert value(s, "inferq_gpu_memory_total_bytes", gpu="1") == 80e9


def test_gpu_gauges_absent_without_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    assert gpu.Nvml.open(None) is None
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(fail_init=True))
    assert gpu.Nvml.open("0") is None
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml())
    assert gpu.Nvml.open("") is None  # an empty mask hides every GPU


def test_sampler_reports_gpus_and_shuts_nvml_down(
    monkeypatch: pytest.MonkeyPatch, client: fakeredis.FakeRedis,
) -> None:
    nvml = fake_nvml(count=1)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    m = WorkerMetrics()
    m.start_sampler(client, ["digits"], interval_s=0.05)
    deadline = time.monotonic() + 5
    while "inferq_gpu_memory_used_bytes{" not in generate_latest(m.registry).decode():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    m.close()
    assert nvml.state["shutdown"]


# --- exporter ------------------------------------------------------------------------------


def seed(client: fakeredis.FakeRedis, now: float) -> None:
    client.hset(wire.MODELS_KEY, mapping={"digits": "{}", "mlp": "{}"})
    client.set(wire.WORKER_KEY_PREFIX + "gpu0@a", json.dumps({"models": ["digits", "mlp"]}))
    client.set(wire.WORKER_KEY_PREFIX + "gpu1@a", json.dumps({"models": ["digits"]}))
    client.set(wire.WORKER_KEY_PREFIX + "broken@a", b"{")
    client.lpush(wire.queue_name("mlp"), message(now - 90), message(now - 10))
    client.lpush(DLQ_KEY, b"a", b"b", b"c")


def test_exporter_reports_queues_consumers_and_dead_letters(client: fakeredis.FakeRedis) -> None:
    now = 1_700_000_000.0
    seed(client, now)
    registry = CollectorRegistry()
    exporter = QueueExporter(client, models=["cnn"])  # named on the command line only
    registry.register(exporter)
    exporter.sample(now=now)
    s = parse(generate_latest(registry).decode())
    assert value(s, "inferq_queue_consumers", model="digits") == 2
    assert value(s, "inferq_queue_consumers", model="mlp") == 1
    assert value(s, "inferq_queue_consumers", model="cnn") == 0
    assert value(s, "inferq_queue_depth", model="mlp") == 2
    assert value(s, "inferq_queue_oldest_age_seconds", model="mlp") == pytest.approx(90)
    assert value(s, "inferq_queue_depth", model="digits") == 0
    assert value(s, "inferq_dead_letter_jobs") == 3
    assert value(s, "inferq_redis_up") == 1
    assert value(s, "inferq_redis_memory_used_bytes") == 3 * 2**30
    assert value(s, "inferq_redis_maxmemory_bytes") == 4 * 2**30

    # The only worker serving mlp dies: its heartbeat key expires, the jobs stay waiting.
    client.delete(wire.WORKER_KEY_PREFIX + "gpu0@a")
    exporter.sample(now=now + 60)
    s = parse(generate_latest(registry).decode())
    assert value(s, "inferq_queue_consumers", model="mlp") == 0
    assert value(s, "inferq_queue_depth", model="mlp") == 2
    assert value(s, "inferq_queue_oldest_age_seconds", model="mlp") == pytest.approx(150)


def test_exporter_keeps_only_redis_up_when_redis_fails() -> None:
    server = fakeredis.FakeServer()
    client = InfoRedis(server=server)
    seed(client, time.time())
    exporter = QueueExporter(client)
    exporter.sample()
    assert len(list(exporter.collect())) > 1
    server.connected = False  # fakeredis: every command raises ConnectionError
    with pytest.raises(redis.exceptions.ConnectionError):
        exporter.sample()
    # Stale queue gauges would look healthy: only the Redis-up gauge is left, at 0.
    registry = CollectorRegistry()
    registry.register(exporter)
    s = parse(generate_latest(registry).decode())
    assert {k[0] for k in s} == {"inferq_redis_up"}
    assert value(s, "inferq_redis_up") == 0
    server.connected = True
    exporter.sample()
    assert value(parse(generate_latest(registry).decode()), "inferq_redis_up") == 1


def test_exporter_without_info_permission_still_exports_queues() -> None:
    """An ACL without +info: the memory gauges are missing, nothing else is."""
    client = fakeredis.FakeRedis()  # no INFO command: a refusal, as NOPERM is
    seed(client, time.time())
    exporter = QueueExporter(client)
    exporter.sample()
    names = {m.name for m in exporter.collect()}
    assert {"inferq_queue_depth", "inferq_redis_up", "inferq_dead_letter_jobs"} <= names
    assert not {"inferq_redis_memory_used_bytes", "inferq_redis_maxmemory_bytes"} & names


def test_run_exporter_serves_http(monkeypatch: pytest.MonkeyPatch) -> None:
    server = fakeredis.FakeServer()
    client = InfoRedis(server=server)
    seed(client, time.time())
    monkeypatch.setattr(exporter_module, "connect", lambda url, **kw: client)
    port, stop = free_port(), threading.Event()
    thread = threading.Thread(target=exporter_module.run_exporter,
                              args=("redis://unused:6379/0", port, 0.05),
                              kwargs={"stop": stop, "addr": "127.0.0.1"}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                text = scrape(port)
                if "inferq_dead_letter_jobs" in text:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "exporter never answered"
            time.sleep(0.05)
        assert value(parse(text), "inferq_queue_consumers", model="digits") == 2
        # Redis goes away: the scrape still answers, and says so.
        server.connected = False
        deadline = time.monotonic() + 10
        while value(s := parse(scrape(port)), "inferq_redis_up") != 0:
            assert time.monotonic() < deadline, "the exporter never reported Redis down"
            time.sleep(0.05)
        assert "inferq_queue_depth" not in {k[0] for k in s}
    finally:
        stop.set()
        thread.join(timeout=10)
    assert not thread.is_alive()
