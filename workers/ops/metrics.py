"""Prometheus metrics of a worker process, and the serving loop's metrics observer.

One registry and one HTTP server per worker process (one process per GPU): worker ``i`` of
a host listens on ``INFERQ_METRICS_PORT + i`` (:func:`metrics_port`). The per-job counter
and histograms are numpy bucket arrays added to once per batch and rendered at scrape time,
so the hot path costs well under a microsecond per job. GPU gauges are sampled by a
background thread into a snapshot that a scrape reads as it is.

Each series has one owner. A worker exports what it alone knows: its jobs, batches, models
and readiness. Queue depth and age, consumers, dead letters and Redis itself are the queue
exporter's (:mod:`workers.ops.exporter`): every worker exporting them made one series per
worker for one queue.

Label rules:

- ``version`` is the version a job resolved to (the one it ran on, or would have);
  ``"none"`` when it failed before one was resolved (an unreadable message, an unknown
  model or version, ...). Never ``""``: Prometheus reads an empty label as no label.
- ``inferq_job_latency_seconds{model,code}`` holds every job that reached a batch, by the
  code it ended with (``OK`` or an error code); a job refused before a batch (at intake, or
  poisoned) has no batch timings and is only counted in ``inferq_jobs_total``.
- :data:`CLIENT_CODES` are the codes a client causes (fix the client); every other error
  code is the service's (:data:`SERVER_CODES`). Dashboards and alerts split on this.
"""

from __future__ import annotations

import bisect
import contextlib
import os
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import structlog
from prometheus_client import CollectorRegistry, Gauge, start_http_server
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector

from producer.errors import CODES as ERROR_CODES
from producer.errors import JobFailed
from workers.ops.gcpause import GcPauses
from workers.ops.gpu import Nvml
from workers.serving.observers import Batch, Observer, Outcome

if TYPE_CHECKING:
    from workers.serving.intake import Pending

log = structlog.get_logger(__name__)

#: Port of worker 0 (``INFERQ_METRICS_PORT``); worker ``i`` of a host listens on base + i.
DEFAULT_PORT = 9464
#: Codes a job ends with: OK, or the error code of its FAILURE result.
CODES = ("OK", *sorted(ERROR_CODES))
#: Error codes the client caused: bad inputs, or a model or version no worker serves. The
#: client must change; no operator action helps. ``DEADLINE_EXCEEDED`` is not one: a job
#: waited longer than its deadline because the service was too slow for it.
CLIENT_CODES = ("INVALID_ARGUMENT", "NOT_FOUND")
#: Error codes the service caused (the model, a worker, Redis, capacity).
SERVER_CODES = tuple(sorted(ERROR_CODES - set(CLIENT_CODES)))
#: The ``version`` label of a job that failed before a version was resolved.
NO_VERSION = "none"
SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                   1.0, 2.5, 5.0, 10.0, 30.0)
ROWS_BUCKETS = tuple(float(2**i) for i in range(11))  # 1, 2, 4, ... 1024

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
    return NO_VERSION if version is None else str(version)


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
                                  "Enqueue (else pick-up) to result stored, of the jobs that "
                                  "reached a batch, by the code they ended with.",
                                  ("model", "code"), SECONDS_BUCKETS)
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



# --- model lifecycle: shadow runs and route guards ---------------------------------------

#: What became of a job sampled for the shadow version.
SHADOW_OUTCOMES = ("compared", "dropped", "failed")
#: Absolute differences between primary and shadow outputs (per job: max, and mean).
DIFF_BUCKETS = (1e-6, 1e-5, 1e-4, 1e-3, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 10.0, 100.0)


class LifecycleMetrics:
    """Shadow comparisons and automatic route rollbacks (``inferq_shadow_*``,
    ``inferq_route_rollbacks_total``), rendered at scrape time like the job counters.
    Updated off the model thread: on the shadow thread, the result writer's (drops) and the
    heartbeat."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.lock = threading.Lock()
        #: (model, version, outcome) -> jobs sampled for the shadow version.
        self.shadow_jobs: dict[tuple[str, str, str], int] = {}
        #: (model, version, agreement) -> label outputs compared.
        self.shadow_labels: dict[tuple[str, str, str], int] = {}
        #: (model,) -> splits a guard on this worker rolled back.
        self.route_rollbacks: dict[tuple[str], int] = {}
        self.abs_diff = _Histogram(
            "inferq_shadow_abs_diff", "Per compared job and output: the max absolute "
            "difference between shadow and primary outputs.", ("model", "version", "output"),
            DIFF_BUCKETS)
        self.latency = _Histogram(
            "inferq_shadow_latency_seconds", "Model compute seconds per row of the compared "
            "jobs, for the shadow run and the primary run (side).",
            ("model", "version", "side"), SECONDS_BUCKETS)
        registry.register(self)

    def shadow_outcome(self, model: str, version: int, outcome: str, n: int = 1) -> None:
        """``n`` sampled jobs were compared, dropped (backlog full) or failed."""
        key = (model, str(version), outcome)
        with self.lock:
            self.shadow_jobs[key] = self.shadow_jobs.get(key, 0) + n

    def shadow_compared(self, model: str, version: int, agree: bool | None,
                        diffs: Mapping[str, float], shadow_row_s: float,
                        primary_row_s: float) -> None:
        """One compared job: label agreement (None: no label output), the max absolute
        difference per (non-label) output, and compute seconds per row of both runs."""
        v = str(version)
        with self.lock:
            key = (model, v, "compared")
            self.shadow_jobs[key] = self.shadow_jobs.get(key, 0) + 1
            if agree is not None:
                lkey = (model, v, "agree" if agree else "disagree")
                self.shadow_labels[lkey] = self.shadow_labels.get(lkey, 0) + 1
            for output, value in diffs.items():
                self.abs_diff.observe((model, v, output), value)
            self.latency.observe((model, v, "shadow"), shadow_row_s)
            self.latency.observe((model, v, "primary"), primary_row_s)

    def route_rolled_back(self, model: str) -> None:
        with self.lock:
            self.route_rollbacks[(model,)] = self.route_rollbacks.get((model,), 0) + 1

    def model_loaded(self, model: str) -> None:
        """From 0 when a model loads, so ``increase()`` sees its first rollback."""
        with self.lock:
            self.route_rollbacks.setdefault((model,), 0)

    def collect(self) -> Iterable[Metric]:
        with self.lock:
            out: list[Metric] = []
            for name, doc, labels, values in (
                    ("inferq_shadow_jobs", "Jobs sampled for the shadow version, by what became "
                     "of them (compared; dropped: the backlog was full; failed: the shadow run "
                     "failed).", ("model", "version", "outcome"), self.shadow_jobs),
                    ("inferq_shadow_labels", "Label outputs compared, by whether the shadow "
                     "version gave the same label as the version that answered.",
                     ("model", "version", "agreement"), self.shadow_labels),
                    ("inferq_route_rollbacks", "Splits a route guard on this worker rolled "
                     "back.", ("model",), self.route_rollbacks)):
                family = CounterMetricFamily(name, doc, labels=labels)
                for key, count in values.items():
                    family.add_metric(key, count)
                out.append(family)
            return [*out, self.abs_diff.family(), self.latency.family()]


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
        self._model_ready = Gauge("inferq_model_ready",
                                  "1 once the model version is loaded, verified and warm; "
                                  "0 when that failed (the worker log says why).",
                                  ("model", "version"), registry=self.registry)
        self.lifecycle = LifecycleMetrics(self.registry)
        #: The process's collector pauses (timed once :meth:`GcPauses.start` is called).
        self.gc = GcPauses(self.registry)
        self._server: Any = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # --- hot path ------------------------------------------------------------------------

    def job_done(self, model: str, version: int | str | None, code: str,
                 queue_s: float | None, batch_wait_s: float | None,
                 latency_s: float | None) -> None:
        """One finished job (OK or an error code); a None timing is not observed, a None
        version is labelled ``"none"``."""
        s = self._stats
        key = (model, _label(version), code)
        with s.lock:
            s.jobs[key] = s.jobs.get(key, 0) + 1
            if queue_s is not None:
                s.queue.observe((model,), queue_s)
            if batch_wait_s is not None:
                s.batch_wait.observe((model,), batch_wait_s)
            if latency_s is not None:
                s.latency.observe((model, code), latency_s)

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
            s.latency.observe_many((model, code), latency_s)

    def batch_done(self, model: str, version: int | str, rows: int, compute_s: float) -> None:
        """One batch ran through the model."""
        s = self._stats
        with s.lock:
            s.rows.observe((model,), float(rows))
            s.compute.observe((model, str(version)), compute_s)

    # --- state ---------------------------------------------------------------------------

    def model_loaded(self, model: str, version: int | str, provider: str,
                     seconds: float) -> None:
        """A model version is loaded, verified and warm (so it is ready); its job counters
        start at 0, and so do the failures of the model's jobs that resolve no version."""
        self._load.labels(model, str(version)).set(seconds)
        self._info.labels(model, str(version), provider).set(1)
        self.model_ready(model, version, True)
        self.lifecycle.model_loaded(model)
        with self._stats.lock:
            for code in CODES:
                self._stats.jobs.setdefault((model, str(version), code), 0)
            for code in ERROR_CODES:
                self._stats.jobs.setdefault((model, NO_VERSION, code), 0)

    def model_ready(self, model: str, version: int | str, ready: bool) -> None:
        """Whether a model version is loaded, verified and warm (1), or failed to be (0);
        the caller logs why it failed."""
        self._model_ready.labels(model, str(version)).set(1 if ready else 0)

    def model_unloaded(self, model: str, version: int | str, provider: str | None = None
                       ) -> None:
        """A model version was unloaded, or left the repository after failing to load: its
        gauges go (it is not "not ready" any more)."""
        gauges: list[tuple[Gauge, tuple[str, ...]]] = [
            (self._load, (model, str(version))), (self._model_ready, (model, str(version)))]
        if provider is not None:
            gauges.append((self._info, (model, str(version), provider)))
        for gauge, labels in gauges:
            with contextlib.suppress(KeyError):
                gauge.remove(*labels)

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

    def sample(self, gpus: Nvml | None) -> None:
        """One pass of the sampler: the GPU gauges (none without NVML)."""
        self._sampled.families = gpus.families() if gpus is not None else []

    def start_sampler(self, redis_client: object = None, models: Sequence[str] = (),
                      interval_s: float = 5.0,
                      stop: threading.Event | None = None) -> threading.Thread:
        """Sample the GPUs this process may use (``CUDA_VISIBLE_DEVICES``) every
        ``interval_s`` until ``stop`` is set or :meth:`close` is called; the thread ends at
        once where NVML does not work.

        ``redis_client`` and ``models`` are ignored: queue gauges are the exporter's. They
        stay for callers of the former signature.
        """
        stop = self._stop if stop is None else stop

        def loop() -> None:
            gpus = Nvml.open(os.environ.get("CUDA_VISIBLE_DEVICES"))
            if gpus is None:
                return
            failing = ""  # warn once per distinct failure, not every interval
            try:
                while not stop.is_set() and not self._stop.is_set():
                    try:
                        self.sample(gpus)
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
                gpus.close()

        thread = threading.Thread(target=loop, name="inferq-metrics", daemon=True)
        self._threads.append(thread)
        thread.start()
        return thread

    def close(self) -> None:
        """Stop the sampler, the collector's timing and the HTTP server."""
        self.gc.close()
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=10)
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class MetricsObserver(Observer):
    """Feeds one model server's batches and failures into :class:`WorkerMetrics`.

    Each job is counted once: a job that failed inside a batch is counted in
    :meth:`batch_done`, with its timings, under its code; any other failure in
    :meth:`job_failed`, without timings.
    """

    def __init__(self, metrics: WorkerMetrics, model: str) -> None:
        self.metrics = metrics
        self.model = model
        self._batch: Batch | None = None
        #: The running batch's job IDs, built at its first failure only (failures are rare).
        self._batch_ids: set[str] | None = None

    def batch_started(self, batch: Batch) -> None:
        self._batch, self._batch_ids = batch, None

    def batch_done(self, batch: Batch, outcomes: Sequence[Outcome]) -> None:
        self._batch = self._batch_ids = None
        # One observation per model run: a job larger than a batch ran in parts.
        runs = batch.runs or [batch.rows]
        for rows in runs:
            self.metrics.batch_done(self.model, batch.version, rows,
                                    (batch.finished - batch.started) / len(runs))
        by_code: dict[str, Sequence[Pending]] = {"OK": batch.jobs}
        if any(isinstance(o, JobFailed) for o in outcomes):
            groups: dict[str, list[Pending]] = {}
            for pending, outcome in zip(batch.jobs, outcomes, strict=True):
                code = outcome.code if isinstance(outcome, JobFailed) else "OK"
                groups.setdefault(code, []).append(pending)
            by_code = dict(groups)
        for code, jobs in by_code.items():
            self.metrics.jobs_done_bulk(
                self.model, batch.version, code,
                queue_s=[p.picked_at - p.job.enqueued_at for p in jobs
                         if p.job.enqueued_at is not None],
                batch_wait_s=[batch.started - p.picked_at for p in jobs],
                latency_s=[batch.stored - (p.picked_at if p.job.enqueued_at is None
                                           else p.job.enqueued_at) for p in jobs])

    def job_failed(self, job_id: str, error: JobFailed, version: int | None) -> None:
        batch = self._batch
        if batch is not None:
            if self._batch_ids is None:
                self._batch_ids = {p.job.id for p in batch.jobs}
            if job_id in self._batch_ids:
                return  # counted, with its latency, in batch_done
        # The model label is the server's, never the client's: no unbounded labels.
        self.metrics.job_done(self.model, version, error.code, None, None, None)
