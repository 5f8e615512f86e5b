"""The worker measured as a fleet runs it: on core(s) of its own, with the producer and Redis
on the others (``inferq bench --isolate``), against ONNX Runtime alone on the same core(s)
with the same thread count.

Affinity is inherited: this process pins itself to the worker's cores while it starts the
worker (and while it measures ONNX Runtime alone), then moves to the other cores, and moves
every thread of the Redis server there too.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from producer import InferenceClient, wire
from producer.wire.connect import connect
from workers.bench import measure
from workers.bench.fleet import inferq_workers
from workers.launch.demo import percentiles
from workers.repository import load_manifest


def split_cores(cores: Sequence[int]) -> tuple[list[int], list[int]]:
    """(worker cores, producer and Redis cores): half each, the worker's rounded down."""
    ordered = sorted(cores)
    if len(ordered) < 2:
        raise ValueError("--isolate needs at least 2 cores (this process may use "
                         f"{len(ordered)})")
    half = len(ordered) // 2
    return ordered[-half:], ordered[:-half]


def pin_process(pid: int, cores: Sequence[int]) -> None:
    """Pin every thread of ``pid`` (``sched_setaffinity`` moves one thread only)."""
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(task), set(cores))
        except ProcessLookupError:
            continue  # a thread that just ended


@contextmanager
def pinned(cores: Sequence[int]) -> Iterator[None]:
    """Run the block (and whatever it starts) on ``cores``."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, set(cores))
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


@contextmanager
def intra_op_threads(threads: int) -> Iterator[None]:
    """Run the block with ``INFERQ_INTRA_OP_THREADS`` set (workers it starts read it)."""
    before = os.environ.get("INFERQ_INTRA_OP_THREADS")
    os.environ["INFERQ_INTRA_OP_THREADS"] = str(threads)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("INFERQ_INTRA_OP_THREADS", None)
        else:
            os.environ["INFERQ_INTRA_OP_THREADS"] = before


def backlog_drain(url: str, model_dir: Path, name: str, inputs: Sequence[dict[str, Any]],
                  jobs: int, worker_cores: Sequence[int], other_cores: Sequence[int],
                  logs: Path) -> dict[str, Any]:
    """The worker alone against a queue filled before it starts, as a fleet's worker meets a
    backlog: nothing on its side waits for the producer, which reads no result until the
    last job's is stored (its reads would load Redis's core while the worker drains). Jobs/s
    from the results' own ``date_done`` stamps (one per batch): the jobs after the first
    batch over the time from the first batch to the last."""
    with pinned(other_cores), InferenceClient(url, queue_without_workers=True) as client:
        chunk = measure.submit_chunk(inputs)
        ids = [h.id for first in range(0, jobs, chunk) for h in client.submit_many(
            name, [inputs[i % len(inputs)] for i in range(first, min(jobs, first + chunk))])]
    with contextlib.ExitStack() as stack:
        with pinned(worker_cores), intra_op_threads(len(worker_cores)):
            stack.enter_context(
                inferq_workers(url, model_dir, name, 1, None, logs / "isolate-backlog.log"))
        with pinned(other_cores), InferenceClient(url) as client:
            r = connect(url)
            deadline = time.monotonic() + 600
            # One worker drains in order: the last job's result comes with the last batch.
            while not r.exists(wire.result_key(ids[-1])) and time.monotonic() < deadline:
                time.sleep(0.02)
            client.results(ids, timeout=60)
            stamps = sorted(orjson.loads(raw)["date_done"]
                            for start in range(0, len(ids), 1000)
                            for raw in r.mget([wire.result_key(i)
                                               for i in ids[start:start + 1000]])
                            if raw is not None)
    first, last = stamps[0], stamps[-1]
    after_first = sum(stamp != first for stamp in stamps)
    seconds = (_epoch(last) - _epoch(first)) or float("nan")
    return {"jobs": jobs, "seconds": round(seconds, 3),
            "jobs_per_s": round(after_first / seconds, 1)}


def _epoch(stamp: str) -> float:
    return datetime.fromisoformat(stamp).timestamp()


def isolate_phase(url: str, redis_pid: int, model_dir: Path, name: str, jobs: int,
                  one_at_a_time: int, logs: Path, say: Callable[[str], None],
                  profile_s: float = 0.0) -> dict[str, Any]:
    """Worker jobs/s and CPU per job on its own core(s) vs ONNX Runtime alone there; with
    ``profile_s``, a py-spy profile of the worker split by stage."""
    worker_cores, other_cores = split_cores(sorted(os.sched_getaffinity(0)))
    threads = len(worker_cores)
    manifest = load_manifest(model_dir / name)
    inputs = measure.make_inputs(manifest, 256)
    say(f"{name} isolated: worker on cores {worker_cores}, producer and Redis on "
        f"{other_cores}; ONNX Runtime alone on {worker_cores} ({threads} thread(s))")
    with pinned(worker_cores):
        direct = measure.direct(manifest, threads)
    pin_process(redis_pid, other_cores)
    backlog = backlog_drain(url, model_dir, name, inputs, jobs, worker_cores, other_cores, logs)
    with contextlib.ExitStack() as stack:
        with pinned(worker_cores), intra_op_threads(threads):
            pids = stack.enter_context(
                inferq_workers(url, model_dir, name, 1, None, logs / "isolate.log"))
        with pinned(other_cores), InferenceClient(url) as client:
            client.results([h.id for h in client.submit_many(name, inputs)], timeout=120)
            meter = measure.CpuMeter({"redis": redis_pid, "worker": pids[0]})
            run = measure.inferq_saturation(client, name, inputs, jobs, meter, lambda n: None)
            low = percentiles(measure.inferq_one_at_a_time(client, name, inputs,
                                                           one_at_a_time))
            stages: dict[str, Any] = {}
            if profile_s:
                from workers.bench.profile import profile_worker

                stages = profile_worker(client, name, inputs, pids[0], profile_s)
    # ONNX Runtime alone again once the worker is gone, each batch size's better figure
    # kept: a slow second on this shared machine must not flatter the ratio.
    with pinned(worker_cores):
        again = measure.direct(manifest, threads)
    direct = {batch: max(rate, again[batch]) for batch, rate in direct.items()}
    best = max(direct.values())
    summary = run.summary()
    out: dict[str, Any] = {
        "worker_cores": worker_cores, "other_cores": other_cores, "threads": threads,
        "direct_jobs_per_s_by_batch": {str(k): round(v, 1) for k, v in direct.items()},
        "direct_best_jobs_per_s": round(best, 1),
        "inferq_jobs_per_s": round(run.jobs_per_s, 1),
        "ratio_inferq_direct_best": round(run.jobs_per_s / best, 3),
        # The worker draining a queue filled before it started (no producer in its way).
        "backlog": {**backlog, "ratio_direct_best": round(backlog["jobs_per_s"] / best, 3)},
        "worker_cpu_us_per_job": round(summary["cpu_ms_per_job"]["worker"] * 1000, 1),
        "redis_cpu_us_per_job": round(summary["cpu_ms_per_job"]["redis"] * 1000, 1),
        "producer_cpu_us_per_job": round(summary["cpu_ms_per_job"]["producer"] * 1000, 1),
        "model_cpu_us_per_job": round(1e6 * threads / best, 1),
        "mean_batch_rows": summary.get("mean_batch_rows"),
        "low_load_p50_ms": low["p50"], "low_load_p99_ms": low["p99"],
        "inferq": summary,
    }
    if stages:
        out["profile"] = stages
    say(f"  {name} isolated: inferq {run.jobs_per_s:,.0f} jobs/s = "
        f"{out['ratio_inferq_direct_best']:.0%} of ONNX Runtime alone ({best:,.0f}); draining a "
        f"backlog {backlog['jobs_per_s']:,.0f} jobs/s = {out['backlog']['ratio_direct_best']:.0%}; "
        "worker "
        f"{out['worker_cpu_us_per_job']} CPU-us/job (model alone {out['model_cpu_us_per_job']}); "
        f"one at a time p50 {low['p50']:.2f} ms, p99 {low['p99']:.2f} ms")
    return out
