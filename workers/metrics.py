"""Prometheus metrics of a worker process, and the queue exporter (``inferq exporter``).

One registry and one HTTP server per worker process (one process per GPU): worker ``i`` of
a host listens on ``INFERQ_METRICS_PORT + i`` (:func:`metrics_port`). The per-job counter
and histograms are numpy bucket arrays added to once per batch and rendered at scrape time,
so the hot path costs well under a microsecond per job. Queue and GPU gauges are sampled by
a background thread into a snapshot that a scrape reads as it is.
"""

from __future__ import annotations

import bisect
import json
import os
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

import numpy as np
import redis
import structlog
from prometheus_client import CollectorRegistry, Gauge, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector

from producer import contract

log = structlog.get_logger(__name__)

#: Port of worker 0 (``INFERQ_METRICS_PORT``); worker ``i`` of a host listens on base + i.
DEFAULT_PORT = 9464
#: Port of ``inferq exporter``.
EXPORTER_PORT = 9460
#: Dead-letter list of jobs that failed for good (``inferq dlq``).
DLQ_KEY = "inferq:dlq"
#: Codes a job ends with: OK, or the error code of its FAILURE result.
CODES = ("OK", "INVALID_ARGUMENT", "NOT_FOUND", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED",
         "UNAVAILABLE", "POISONED", "INTERNAL")
SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                   1.0, 2.5, 5.0, 10.0, 30.0)
ROWS_BUCKETS = tuple(float(2**i) for i in range(11))  # 1, 2, 4, ... 1024
# kombu's priority sub-queues of a Redis queue (as in workers.consumer).
_PRIORITY_SEP = "\x06\x16"
_PRIORITY_STEPS = (3, 6, 9)

Values = Sequence[float] | np.ndarray[Any, Any]


def metrics_port(base: int, index: int) -> int:
    """The metrics port of worker ``index`` of a host; base 0 stays 0 (ephemeral)."""
    if not 0 <= base <= 65535 or index < 0:
        raise ValueError(f"metrics port base {base} / worker index {index} out of range")
    port = base + index if base else 0
    if port > 65535:
        raise ValueError(f"metrics port {base} + {index} is above 65535")
    return port


def port_from_env(env: Mapping[str, str]) -> int | None:
    """``INFERQ_METRICS_PORT`` (default 9464); None when it is ``off``."""
    raw = env.get("INFERQ_METRICS_PORT", "").strip().lower()
    if raw in ("off", "none", "disabled"):
        return None
    if raw and not raw.isdigit():
        raise ValueError(f"INFERQ_METRICS_PORT must be a port number or off, got {raw!r}")
    return metrics_port(int(raw) if raw else DEFAULT_PORT, 0)


def _label(version: int | str | None) -> str:
    return "" if version is None else str(version)


class _Histogram:
    """Bucket counts per label set; the caller holds the owner's lock."""

    def __init__(self, name: str, doc: str, labels: tuple[str, ...],
                 bounds: Sequence[float]) -> None:
        self.name, self.doc, self.labels = name, doc, labels
        self.bounds = tuple(bounds)
        self._np_bounds = np.asarray(bounds, dtype=np.float64)
        self._le = [repr(float(b)) for b in bounds] + ["+Inf"]
        self._counts: dict[tuple[str, ...], np.ndarray[Any, Any]] = {}
        self._sums: dict[tuple[str, ...], float] = {}

    def _series(self, key: tuple[str, ...]) -> np.ndarray[Any, Any]:
        counts = self._counts.get(key)
        if counts is None:
            counts = self._counts[key] = np.zeros(len(self._le), dtype=np.int64)
            self._sums[key] = 0.0
        return counts

    def observe(self, key: tuple[str, ...], value: float) -> None:
        value = max(0.0, value)
        self._series(key)[bisect.bisect_left(self.bounds, value)] += 1
        self._sums[key] += value

    def observe_many(self, key: tuple[str, ...], values: Values) -> None:
        if len(values) <= 8:  # below this numpy's fixed cost is the larger one
            for value in values:
                self.observe(key, float(value))
            return
        arr = np.maximum(np.asarray(values, dtype=np.float64), 0.0)
        if arr.size:
            counts = self._series(key)
            counts += np.bincount(np.searchsorted(self._np_bounds, arr), minlength=len(self._le))
            self._sums[key] += float(arr.sum())

    def family(self) -> HistogramMetricFamily:
        family = HistogramMetricFamily(self.name, self.doc, labels=self.labels)
        for key, counts in self._counts.items():
            cumulative = np.cumsum(counts).tolist()
            family.add_metric(key, list(zip(self._le, cumulative, strict=True)), self._sums[key])
        return family


class _JobStats:
    """The per-job and per-batch counters: plain arrays, rendered when scraped."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.jobs: dict[tuple[str, str, str], int] = {}
        self.queue = _Histogram("inferq_queue_seconds", "Enqueue to picked up by a worker.",
                                ("model",), SECONDS_BUCKETS)
        self.batch_wait = _Histogram("inferq_batch_wait_seconds",
                                     "Picked up to its batch starting.", ("model",),
                                     SECONDS_BUCKETS)
        self.compute = _Histogram("inferq_compute_seconds", "Model run time of one batch.",
                                  ("model", "version"), SECONDS_BUCKETS)
        self.latency = _Histogram("inferq_job_latency_seconds",
                                  "Enqueue (else pick-up) to result stored.", ("model",),
                                  SECONDS_BUCKETS)
        self.rows = _Histogram("inferq_batch_rows", "Rows of one batch.", ("model",),
                               ROWS_BUCKETS)

    def collect(self) -> Iterable[Metric]:
        with self.lock:
            jobs = CounterMetricFamily("inferq_jobs", "Finished jobs by result code.",
                                       labels=("model", "version", "code"))
            for key, count in self.jobs.items():
                jobs.add_metric(key, count)
            hists = (self.queue, self.batch_wait, self.compute, self.latency, self.rows)
            return [jobs, *(h.family() for h in hists)]


class _Snapshot:
    """Metric families sampled by a background thread; replaced whole, read as they are."""

    def __init__(self) -> None:
        self.families: list[Metric] = []

    def collect(self) -> Iterable[Metric]:
        return list(self.families)


def _enqueued_at(raw: bytes | str | None) -> float | None:
    """The ``inferq_enqueued_at`` header of a stored message (epoch seconds), if any."""
    if raw is None:
        return None
    try:
        value = json.loads(raw).get("headers", {}).get(contract.HEADER_ENQUEUED_AT)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            moment = datetime.fromisoformat(value)
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=timezone.utc)
            return moment.timestamp()
    except (ValueError, TypeError, AttributeError, RecursionError):
        pass
    return None


def queue_stats(client: redis.Redis, models: Sequence[str],
                now: float | None = None) -> dict[str, tuple[int, float]]:
    """Per model: messages waiting (all priority lists) and the oldest one's age in seconds
    (0 when empty or unstamped), in one round trip."""
    pipe = client.pipeline(transaction=False)
    for model in models:
        queue = contract.queue_name(model)
        for key in [queue, *(f"{queue}{_PRIORITY_SEP}{p}" for p in _PRIORITY_STEPS)]:
            pipe.llen(key)
            pipe.lindex(key, -1)  # workers pop from the right: the oldest message
    replies: list[Any] = pipe.execute()
    now = time.time() if now is None else now
    stats = {}
    per_model = 2 * (1 + len(_PRIORITY_STEPS))
    for i, model in enumerate(models):
        part = replies[i * per_model:(i + 1) * per_model]
        stamps = [t for t in map(_enqueued_at, part[1::2]) if t is not None]
        stats[model] = (sum(int(n) for n in part[0::2]),
                        max(0.0, now - min(stamps)) if stamps else 0.0)
    return stats


def _queue_families(stats: Mapping[str, tuple[int, float]]) -> list[Metric]:
    depth = GaugeMetricFamily("inferq_queue_depth", "Messages waiting in the model's queue.",
                              labels=("model",))
    age = GaugeMetricFamily("inferq_queue_oldest_age_seconds",
                            "Age of the oldest waiting message (0 when empty or unknown).",
                            labels=("model",))
    for model, (waiting, oldest) in sorted(stats.items()):
        depth.add_metric((model,), waiting)
        age.add_metric((model,), oldest)
    return [depth, age]


def _visible(index: int, uuid: str, mask: str) -> bool:
    """Whether NVML device ``index`` is in a ``CUDA_VISIBLE_DEVICES`` list (indices or UUIDs)."""
    for token in (t.strip() for t in mask.split(",")):
        if token and (token == str(index) or (not token.isdigit() and uuid.startswith(token))):
            return True
    return False


class _Nvml:
    """GPU gauges through NVML, for the GPUs this process may use."""

    def __init__(self, nvml: Any, handles: list[tuple[str, Any]]) -> None:
        self.nvml, self.handles = nvml, handles

    @classmethod
    def open(cls, mask: str | None) -> _Nvml | None:
        """None when NVML is missing or fails, or ``mask`` (CUDA_VISIBLE_DEVICES) is empty."""
        if mask is not None and not mask.strip():
            return None
        try:
            import pynvml

            pynvml.nvmlInit()
            handles = []
            for index in range(pynvml.nvmlDeviceGetCount()):
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                uuid = pynvml.nvmlDeviceGetUUID(handle)
                uuid = uuid.decode() if isinstance(uuid, bytes) else str(uuid)
                if mask is None or _visible(index, uuid, mask):
                    handles.append((str(index), handle))
        except Exception as exc:  # ImportError, NVMLError, a driver that is not there
            log.debug("nvml_unavailable", error=str(exc))
            return None
        return cls(pynvml, handles)

    def families(self) -> list[Metric]:
        util = GaugeMetricFamily("inferq_gpu_utilization_ratio",
                                 "Share of the last sample period the GPU was busy.",
                                 labels=("gpu",))
        used = GaugeMetricFamily("inferq_gpu_memory_used_bytes", "GPU memory in use.",
                                 labels=("gpu",))
        total = GaugeMetricFamily("inferq_gpu_memory_total_bytes", "GPU memory.",
                                  labels=("gpu",))
        for label, handle in self.handles:
            try:
                rates = self.nvml.nvmlDeviceGetUtilizationRates(handle)
                memory = self.nvml.nvmlDeviceGetMemoryInfo(handle)
            except Exception as exc:
                log.debug("nvml_sample_failed", gpu=label, error=str(exc))
                continue
            util.add_metric((label,), rates.gpu / 100.0)
            used.add_metric((label,), memory.used)
            total.add_metric((label,), memory.total)
        return [util, used, total]

    def close(self) -> None:
        try:
            self.nvml.nvmlShutdown()
        except Exception as exc:
            log.debug("nvml_shutdown_failed", error=str(exc))


class WorkerMetrics:
    """Every metric of one worker process, in its own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = CollectorRegistry() if registry is None else registry
        self._stats = _JobStats()
        self._sampled = _Snapshot()
        self.registry.register(self._stats)
        self.registry.register(self._sampled)
        ProcessCollector(registry=self.registry)
        self._load = Gauge("inferq_model_load_seconds", "Seconds to load, verify and warm.",
                           ("model", "version"), registry=self.registry)
        self._info = Gauge("inferq_model_info", "Model versions served, with their provider.",
                           ("model", "version", "provider"), registry=self.registry)
        self._ready = Gauge("inferq_worker_ready",
                            "1 once its models are loaded and their queues consumed.",
                            registry=self.registry)
        self._server: Any = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # --- hot path ------------------------------------------------------------------------

    def job_done(self, model: str, version: int | str | None, code: str,
                 queue_s: float | None, batch_wait_s: float | None,
                 latency_s: float | None) -> None:
        """One finished job (OK or an error code); a None timing is not observed."""
        s = self._stats
        key = (model, _label(version), code)
        with s.lock:
            s.jobs[key] = s.jobs.get(key, 0) + 1
            if queue_s is not None:
                s.queue.observe((model,), queue_s)
            if batch_wait_s is not None:
                s.batch_wait.observe((model,), batch_wait_s)
            if latency_s is not None:
                s.latency.observe((model,), latency_s)

    def jobs_done_bulk(self, model: str, version: int | str | None, code: str,
                       queue_s: Values, batch_wait_s: Values, latency_s: Values) -> None:
        """``len(latency_s)`` jobs finished with ``code``; one call per batch.

        ``queue_s`` holds only the jobs that carried ``inferq_enqueued_at``.
        """
        s = self._stats
        key = (model, _label(version), code)
        with s.lock:
            s.jobs[key] = s.jobs.get(key, 0) + len(latency_s)
            s.queue.observe_many((model,), queue_s)
            s.batch_wait.observe_many((model,), batch_wait_s)
            s.latency.observe_many((model,), latency_s)

    def batch_done(self, model: str, version: int | str, rows: int, compute_s: float) -> None:
        """One batch ran through the model."""
        s = self._stats
        with s.lock:
            s.rows.observe((model,), float(rows))
            s.compute.observe((model, str(version)), compute_s)

    # --- state ---------------------------------------------------------------------------

    def model_loaded(self, model: str, version: int | str, provider: str,
                     seconds: float) -> None:
        """A model version is loaded, verified and warm; its job counters start at 0."""
        self._load.labels(model, str(version)).set(seconds)
        self._info.labels(model, str(version), provider).set(1)
        with self._stats.lock:
            for code in CODES:
                self._stats.jobs.setdefault((model, str(version), code), 0)

    def set_ready(self, ready: bool) -> None:
        """1 once every model is loaded and its queue consumed; 0 while stopping."""
        self._ready.set(1 if ready else 0)

    # --- threads -------------------------------------------------------------------------

    def start_http(self, port: int, addr: str = "0.0.0.0") -> int:
        """Serve ``/metrics`` on ``port`` (0: any free port); return the bound port.

        Raises OSError when the port is taken.
        """
        self._server, _ = start_http_server(port, addr=addr, registry=self.registry)
        return int(self._server.server_port)

    def sample(self, client: redis.Redis, models: Sequence[str],
               gpus: _Nvml | None = None) -> None:
        """One pass of the sampler: queue depth and oldest age, and the GPU gauges."""
        families = _queue_families(queue_stats(client, models))
        self._sampled.families = families + (gpus.families() if gpus is not None else [])

    def start_sampler(self, redis_client: redis.Redis, models: Sequence[str],
                      interval_s: float = 5.0,
                      stop: threading.Event | None = None) -> threading.Thread:
        """Sample queues (and GPUs, where NVML works) every ``interval_s`` until ``stop``
        is set or :meth:`close` is called."""
        stop = self._stop if stop is None else stop

        def loop() -> None:
            gpus = _Nvml.open(os.environ.get("CUDA_VISIBLE_DEVICES"))
            failing = ""  # warn once per distinct failure, not every interval
            try:
                while not stop.is_set() and not self._stop.is_set():
                    try:
                        self.sample(redis_client, models, gpus)
                        failing = ""
                    except Exception as exc:
                        if str(exc) != failing:
                            log.warning("metrics_sample_failed", error=repr(exc))
                        failing = str(exc)
                    # Wakes for close() too when the caller passed its own stop event.
                    deadline = time.monotonic() + interval_s
                    while (left := deadline - time.monotonic()) > 0 and not stop.is_set():
                        if self._stop.wait(min(left, 0.5)):
                            break
            finally:
                if gpus is not None:
                    gpus.close()

        thread = threading.Thread(target=loop, name="inferq-metrics", daemon=True)
        self._threads.append(thread)
        thread.start()
        return thread

    def close(self) -> None:
        """Stop the sampler and the HTTP server."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=10)
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


# --- exporter -------------------------------------------------------------------------


def consumers(client: redis.Redis) -> dict[str, int]:
    """Live workers per model, from the heartbeat keys (they expire when a worker dies)."""
    keys = list(client.scan_iter(match=contract.WORKER_KEY_PREFIX + "*", count=1000))
    counts: dict[str, int] = {}
    for raw in client.mget(keys) if keys else []:
        try:
            models = json.loads(raw)["models"] if raw is not None else []
        except (ValueError, TypeError, KeyError):
            continue
        for model in models if isinstance(models, list) else []:
            counts[str(model)] = counts.get(str(model), 0) + 1
    return counts


class QueueExporter:
    """What no worker can report: jobs waiting for a model nobody serves, dead letters."""

    def __init__(self, client: redis.Redis, models: Sequence[str] = ()) -> None:
        self.client = client
        self.models = tuple(models)
        self._families: list[Metric] = []

    def sample(self, now: float | None = None) -> None:
        """Read Redis and replace what the next scrape returns; clears it on a Redis error."""
        try:
            known = self.client.hkeys(contract.MODELS_KEY)
            names = sorted({*(k.decode() if isinstance(k, bytes) else str(k) for k in known),
                            *self.models})
            stats = queue_stats(self.client, names, now)
            live = consumers(self.client)
            dead = int(self.client.llen(DLQ_KEY))
        except redis.exceptions.RedisError:
            self._families = []
            raise
        serving = GaugeMetricFamily("inferq_queue_consumers", "Live workers serving the model.",
                                    labels=("model",))
        for name in names:
            serving.add_metric((name,), live.get(name, 0))
        dlq = GaugeMetricFamily("inferq_dead_letter_jobs", f"Jobs in the {DLQ_KEY} list.",
                                value=dead)
        self._families = [*_queue_families(stats), serving, dlq]

    def collect(self) -> Iterable[Metric]:
        return list(self._families)


def _connect(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)


def run_exporter(redis_url: str, port: int = EXPORTER_PORT, interval_s: float = 5.0, *,
                 models: Sequence[str] = (), stop: threading.Event | None = None,
                 addr: str = "0.0.0.0") -> None:
    """Serve the queue exporter on ``port`` and sample Redis every ``interval_s`` until
    ``stop`` is set (the body of ``inferq exporter``)."""
    registry = CollectorRegistry()
    exporter = QueueExporter(_connect(redis_url), models)
    registry.register(exporter)
    server, _ = start_http_server(port, addr=addr, registry=registry)
    log.info("exporter_listening", port=server.server_port, interval_s=interval_s)
    stop = threading.Event() if stop is None else stop
    try:
        while True:
            try:
                exporter.sample()
            except redis.exceptions.RedisError as exc:
                log.warning("exporter_sample_failed", error=str(exc))
            if stop.wait(interval_s):
                break
    finally:
        server.shutdown()
        server.server_close()
