"""Measurements for ``inferq bench``: direct ONNX Runtime, naive Celery and inferq.

Every figure of one model comes from the same run on the same machine and Redis; only
ratios between them are meant to be compared across machines.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from producer import InferenceClient, JobFailed, JobResult, wire
from workers.bench.naive import TASK as NAIVE_TASK
from workers.launch.demo import percentiles
from workers.repository import Manifest
from workers.serving import runtime

Progress = Callable[[int], None]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process and its reaped children have used (Linux /proc).

    Children count because redis-server forks one for every AOF rewrite.
    """
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (Linux /proc)."""
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def make_inputs(
    manifest: Manifest, count: int, seed: int = 0
) -> list[dict[str, np.ndarray[Any, Any]]]:
    """``count`` distinct one-row jobs for ``manifest`` (values 0-16, like raw pixels)."""
    rng = np.random.default_rng(seed)
    return [
        {s.name: (rng.random([1 if d == -1 else d for d in s.shape]) * 16).astype(s.dtype)
         for s in manifest.inputs}
        for _ in range(count)
    ]


@dataclass
class CpuMeter:
    """CPU seconds used by named processes (this process is "producer") between start/stop."""

    pids: dict[str, int]
    used: dict[str, float] = field(default_factory=dict)

    def __enter__(self) -> CpuMeter:
        self._start = {k: cpu_seconds(p) for k, p in self.pids.items()}
        self._self = time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.used = {k: cpu_seconds(p) - self._start[k] for k, p in self.pids.items()}
        self.used["producer"] = time.process_time() - self._self


def direct(manifest: Manifest, threads: int, batches: Sequence[int] = (1, 8, 32, 64),
           seconds: float = 1.0, device: str = "cpu") -> dict[int, float]:
    """Rows/s of ONNX Runtime alone, in this process, for each batch size."""
    model = runtime.load(manifest, manifest.latest, device, threads)
    rows = make_inputs(manifest, max(batches))
    out = {}
    for batch in batches:
        feeds = {n: np.concatenate([r[n] for r in rows[:batch]]) for n in rows[0]}
        model.run(feeds)
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            model.run(feeds)
            done += batch
        out[batch] = done / (time.perf_counter() - start)
    return out


@dataclass
class Run:
    """One saturation run: throughput, latency, batches and CPU per job."""

    jobs: int
    seconds: float
    latencies_ms: list[float]
    batch_rows: list[int]
    cpu: dict[str, float]

    @property
    def jobs_per_s(self) -> float:
        return self.jobs / self.seconds

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "jobs": self.jobs,
            "seconds": round(self.seconds, 3),
            "jobs_per_s": round(self.jobs_per_s, 1),
            "latency_ms": percentiles(self.latencies_ms),
            "cpu_ms_per_job": {k: round(v * 1000 / self.jobs, 4) for k, v in self.cpu.items()},
        }
        if self.batch_rows:
            out["mean_batch_rows"] = round(float(np.mean(self.batch_rows)), 2)
            out["batch_rows_hist"] = dict(sorted(Counter(self.batch_rows).items()))
        return out


#: Tensor bytes per ``submit_many`` call. Each call is one MULTI/EXEC, and Redis spends
#: about twice the CPU per job on transactions of 4 MB and more than on 1-3 MB ones.
SUBMIT_BYTES = 2 * 1024 * 1024


def submit_chunk(inputs: Sequence[dict[str, Any]]) -> int:
    """Jobs per ``submit_many`` call: up to 512, and about :data:`SUBMIT_BYTES` of tensors."""
    per_job = max(1, sum(int(a.nbytes) for a in inputs[0].values()))
    return max(1, min(512, SUBMIT_BYTES // per_job))


def inferq_saturation(client: InferenceClient, model: str, inputs: Sequence[dict[str, Any]],
                      jobs: int, meter: CpuMeter, progress: Progress,
                      chunk: int | None = None) -> Run:
    """Submit ``jobs`` as fast as one producer can (pipelined), then collect every result."""
    chunk = chunk or submit_chunk(inputs)
    submitted: dict[str, float] = {}
    with meter:
        start = time.perf_counter()
        for first in range(0, jobs, chunk):
            batch = [inputs[i % len(inputs)] for i in range(first, min(jobs, first + chunk))]
            handles = client.submit_many(model, batch)
            now = time.perf_counter()
            submitted.update((h.id, now) for h in handles)
        latencies, rows = [], []
        for job_id, outcome in client.as_completed(list(submitted), timeout=600):
            if isinstance(outcome, JobFailed):
                raise outcome
            latencies.append((time.perf_counter() - submitted[job_id]) * 1000)
            rows.append(outcome.batch_size)
            progress(1)
        seconds = time.perf_counter() - start
    return Run(jobs, seconds, latencies, rows, meter.used)


def inferq_one_at_a_time(client: InferenceClient, model: str,
                         inputs: Sequence[dict[str, Any]], jobs: int) -> list[float]:
    """Round-trip milliseconds of ``jobs`` jobs sent one after another."""
    return one_at_a_time_stages(client, model, inputs, jobs)[0]


#: Every how many one-at-a-time jobs :func:`one_at_a_time_stages` times a Redis PING.
PING_EVERY = 4


def one_at_a_time_stages(client: InferenceClient, model: str,
                         inputs: Sequence[dict[str, Any]], jobs: int,
                         ping: Callable[[], Any] | None = None
                         ) -> tuple[list[float], dict[str, float]]:
    """Round-trip milliseconds of ``jobs`` jobs sent one after another, and where the time
    went (medians, ms): the client's ``submit()`` and ``result()`` calls, the job's own
    stages as the worker stamped them (``queued``: enqueued until taken; ``batch_wait``;
    ``inference``; ``total``: enqueued until stored), and, given ``ping`` (a Redis
    ``PING``; one every :data:`PING_EVERY` jobs, between them), the round trip each of the
    job's hops through Redis costs at least."""
    out, submit, result, pings = [], [], [], []
    stages: dict[str, list[float]] = {"queued": [], "batch_wait": [], "inference": [],
                                      "total": []}
    for i in range(jobs):
        start = time.perf_counter()
        handle = client.submit(model, inputs[i % len(inputs)])
        pushed = time.perf_counter()
        done = handle.result(timeout=60)
        end = time.perf_counter()
        out.append((end - start) * 1000)
        submit.append((pushed - start) * 1000)
        result.append((end - pushed) * 1000)
        for stage, values in stages.items():
            if (v := done.timings_ms.get(stage)) is not None:
                values.append(float(v))
        if ping is not None and i % PING_EVERY == 0:
            start = time.perf_counter()
            ping()
            pings.append((time.perf_counter() - start) * 1000)
    medians = {"round_trip": out, "submit": submit, "result": result, **stages,
               "redis_ping": pings}
    return out, {k: round(float(np.median(v)), 3) for k, v in medians.items() if v}


def _naive_args(model: str, item: dict[str, np.ndarray[Any, Any]]) -> list[Any]:
    return [model, {k: wire.encode_tensor(v) for k, v in item.items()}]


def naive_saturation(app: Any, model: str, inputs: Sequence[dict[str, Any]], jobs: int,
                     meter: CpuMeter, progress: Progress) -> Run:
    """The same load through plain Celery: send_task per job, then join all results."""
    from celery.result import ResultSet

    encoded = [_naive_args(model, item) for item in inputs]
    sent: dict[str, float] = {}
    arrived: dict[str, float] = {}

    def on_result(task_id: str, value: Any) -> None:
        arrived[task_id] = time.perf_counter()
        progress(1)

    with meter:
        start = time.perf_counter()
        results = []
        for i in range(jobs):
            r = app.send_task(NAIVE_TASK, args=encoded[i % len(encoded)], queue="bench.naive")
            sent[r.id] = time.perf_counter()
            results.append(r)
        ResultSet(results).join_native(timeout=600, callback=on_result)
        seconds = time.perf_counter() - start
    latencies = [(arrived[k] - sent[k]) * 1000 for k in sent]
    return Run(jobs, seconds, latencies, [], meter.used)


def naive_one_at_a_time(app: Any, model: str, inputs: Sequence[dict[str, Any]],
                        jobs: int) -> list[float]:
    out = []
    encoded = [_naive_args(model, item) for item in inputs]
    for i in range(jobs):
        start = time.perf_counter()
        app.send_task(NAIVE_TASK, args=encoded[i % len(encoded)], queue="bench.naive").get(
            timeout=60)
        out.append((time.perf_counter() - start) * 1000)
    return out


def open_loop(client: InferenceClient, model: str, inputs: Sequence[dict[str, Any]],
              rate: float, seconds: float) -> dict[str, float]:
    """Offer ``rate`` jobs/s for ``seconds``; latency from each job's own timings."""
    ids: list[str] = []
    start = time.perf_counter()
    sent = 0
    while (elapsed := time.perf_counter() - start) < seconds:
        due = int(elapsed * rate) + 1 - sent
        if due > 0:
            batch = [inputs[(sent + i) % len(inputs)] for i in range(due)]
            if due == 1:
                ids.append(client.submit(model, batch[0]).id)
            else:
                ids += [h.id for h in client.submit_many(model, batch)]
            sent += due
        else:
            time.sleep(min(0.0005, 1 / rate))
    results = [r for r in client.outcomes(ids, timeout=600) if isinstance(r, JobResult)]
    totals = [float(r.timings_ms["total"] or 0.0) for r in results]
    span = time.perf_counter() - start
    return {"offered_jobs_per_s": rate, "achieved_jobs_per_s": len(results) / span,
            **{f"{k}_ms": v for k, v in percentiles(totals).items()},
            "mean_batch_rows": float(np.mean([r.batch_size for r in results]))}
