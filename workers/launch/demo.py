"""``inferq demo``: the digits test set through the whole stack, with a summary."""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import redis
import structlog

from producer import InferenceClient, JobResult, wire
from producer.wire.connect import connect, masked
from workers.launch.stack import LocalStack

STAGES = ("queued", "batch_wait", "inference", "total")


def digits_test_split() -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """The held-out split ``models/digits/build.py`` evaluated on (raw 0-16 pixels)."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise SystemExit(
            "the demo reads scikit-learn's digits data: pip install scikit-learn"
        ) from None
    x, y = load_digits(return_X_y=True)
    _, x_test, _, y_test = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    return x_test.astype(np.float32), y_test


def percentiles(values: Sequence[float]) -> dict[str, float]:
    """p50/p95/p99 of ``values`` in the values' unit, to three decimals."""
    arr = np.asarray(values, dtype=np.float64)
    return {f"p{q}": round(float(np.percentile(arr, q)), 3) for q in (50, 95, 99)}


def _stage_table(results: Sequence[JobResult]) -> list[str]:
    lines = [f"  {'stage (ms)':<12}{'p50':>9}{'p95':>9}{'p99':>9}"]
    for stage in STAGES:
        values = [r.timings_ms[stage] for r in results if r.timings_ms.get(stage) is not None]
        if values:
            p = percentiles([float(v) for v in values])  # type: ignore[arg-type]
            lines.append(f"  {stage:<12}{p['p50']:>9.3f}{p['p95']:>9.3f}{p['p99']:>9.3f}")
    return lines


def _workers_serving(url: str, model: str) -> bool:
    client = connect(url, timeout=2)
    try:
        return client.hexists(wire.MODELS_KEY, model) and any(
            True for _ in client.scan_iter(wire.WORKER_KEY_PREFIX + "*", count=100)
        )
    except redis.exceptions.RedisError:
        return False


def run(out: Callable[[str], None] = print, single_jobs: int = 100, *, keep: bool = False,
        log_path: Path | None = None) -> int:
    """Run the demo; return the exit code (0 when every job succeeded).

    The processes it starts log to ``log_path`` (default: a new file in the temporary
    directory, kept), so ``out`` gets the summary alone. With ``keep`` the stack stays up,
    Flower with it, until Ctrl-C.
    """
    x_test, y_test = digits_test_split()
    configured = os.environ.get("INFERQ_BROKER_URL")
    if configured and _workers_serving(configured, "digits"):
        out(f"using the running stack at {masked(configured)}")
        code = _exercise(configured, x_test, y_test, out, single_jobs)
        if keep:
            out("--keep: nothing to keep, the stack was running before the demo")
        return code
    if log_path is None:
        fd, name = tempfile.mkstemp(prefix="inferq-demo-", suffix=".log")
        os.close(fd)
        log_path = Path(name)
    started = "a worker and Flower" if keep else "a worker"
    started = f"{started} on the Redis at {masked(configured)}" if configured else (
        f"Redis and {started}")
    out(f"starting {started}; logs go to {log_path} ...")
    with _records_to(log_path), LocalStack(flower=keep, log_path=log_path) as stack:
        code = _exercise(stack.broker_url, x_test, y_test, out, single_jobs)
        out(f"logs                {log_path}")
        if not keep:
            out("Flower              not kept: `inferq demo --keep` keeps the stack up, "
                "with Flower, until Ctrl-C")
            return code
        stack.run_until_stopped(
            lambda: out(f"Flower              {stack.flower_url}   (Ctrl-C stops the stack)"))
    out("stopped")
    return code


@contextlib.contextmanager
def _records_to(path: Path) -> Iterator[None]:
    """This process's own log records (Redis started, workers started) as JSON lines in
    ``path``, where its workers log, instead of between the summary's lines."""
    with open(path, "a") as log_file:
        structlog.configure(
            processors=[structlog.processors.add_log_level,
                        structlog.processors.TimeStamper(fmt="iso", utc=True),
                        structlog.processors.JSONRenderer()],
            logger_factory=structlog.WriteLoggerFactory(file=log_file))
        try:
            yield
        finally:
            structlog.reset_defaults()


def _exercise(
    url: str,
    x_test: np.ndarray[Any, Any],
    y_test: np.ndarray[Any, Any],
    out: Callable[[str], None],
    single_jobs: int,
) -> int:
    with InferenceClient(url) as client:
        started = time.perf_counter()
        handles = client.submit_many("digits", [{"pixels": row} for row in x_test])
        results = client.results([h.id for h in handles], timeout=120)
        elapsed = time.perf_counter() - started
        single = []
        for row in x_test[:single_jobs]:
            t0 = time.perf_counter()
            client.submit("digits", {"pixels": row}).result(timeout=30)
            single.append((time.perf_counter() - t0) * 1000)
    predicted = np.array([int(r["label"][0]) for r in results])
    accuracy = float(np.mean(predicted == y_test))
    sizes = Counter(r.batch_size for r in results)
    lo = percentiles(single)
    out(f"digits v{results[0].version} on {results[0].worker}: {len(results)} test images")
    out(f"accuracy            {accuracy:.4f} ({int(np.sum(predicted == y_test))}/{len(y_test)})")
    out(f"throughput          {len(results) / elapsed:,.0f} jobs/s "
        f"({len(results)} jobs in {elapsed * 1000:.1f} ms, submit_many + results)")
    out("latency under that load, by stage:")
    for line in _stage_table(results):
        out(line)
    out(f"one job at a time   p50 {lo['p50']:.2f} ms  p95 {lo['p95']:.2f} ms  "
        f"p99 {lo['p99']:.2f} ms round trip ({len(single)} jobs)")
    out("batch sizes (rows)  " + ", ".join(f"{k}x{v}" for k, v in sorted(sizes.items())))
    return 0 if len(results) == len(y_test) else 1
