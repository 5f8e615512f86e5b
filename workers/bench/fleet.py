"""The worker processes a benchmark measures: inferq workers under the supervisor, and the
plain Celery worker of the naive baseline."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from producer import wire
from producer.wire.connect import connect
from workers.launch.launcher import Supervisor, plan

#: Model instances per inferq worker (two trade single-job latency for a little throughput).
INSTANCES = 1



def _wait_key(url: str, key: str, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    client = connect(url)
    deadline = time.monotonic() + timeout
    while not client.exists(key):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"benchmark worker did not start (exit {proc.poll()})")
        time.sleep(0.05)


@contextmanager
def inferq_workers(url: str, model_dir: Path, model: str, workers: int,
                   gpus: Sequence[int] | None, log: Path) -> Iterator[list[int]]:
    """inferq worker processes serving ``model``; yields their pids."""
    env = {**os.environ, "INFERQ_BROKER_URL": url, "INFERQ_RESULT_URL": url,
           "INFERQ_MODEL_DIR": str(model_dir), "INFERQ_MODELS": model,
           "INFERQ_LOG_FORMAT": "json", "INFERQ_INSTANCES": str(INSTANCES)}
    specs = plan(list(gpus) if gpus else None, workers, base_env=env)
    with open(log, "ab") as out:
        sup = Supervisor(specs, output=out)
        sup.start()
    try:
        for s in specs:
            _wait_key(url, wire.worker_key(s.hostname), sup.procs[s.hostname])
        yield [p.pid for p in sup.procs.values()]
    finally:
        sup.stop()


@contextmanager
def naive_worker(url: str, model_dir: Path, threads: int, log: Path,
                 gpus: Sequence[int] | None = None) -> Iterator[int]:
    """One plain Celery worker (solo pool) for the baseline; yields its pid."""
    env = {**os.environ, "INFERQ_BROKER_URL": url, "INFERQ_MODEL_DIR": str(model_dir),
           "INFERQ_INTRA_OP_THREADS": str(threads),
           "INFERQ_DEVICE": "cuda" if gpus else "cpu",
           "CUDA_VISIBLE_DEVICES": str(gpus[0]) if gpus else ""}
    argv = [sys.executable, "-m", "celery", "-A", "workers.bench.naive", "worker", "-P", "solo",
            "-Q", "bench.naive", "-n", "naive@bench", "--without-mingle", "--without-gossip",
            "-l", "WARNING"]
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=out, start_new_session=True)
    try:
        from celery import Celery

        probe = Celery(broker=url, backend=url)
        probe.conf.accept_content = ["msgpack", "json"]
        deadline = time.monotonic() + 120
        while not probe.control.ping(timeout=0.5):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("naive worker did not start")
        yield proc.pid
    finally:
        proc.terminate()
        proc.wait(timeout=30)
