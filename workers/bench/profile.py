"""Where a worker's CPU goes, per job and by stage: a py-spy profile of the worker under
saturation, each sample charged to the innermost inferq stage on its stack, scaled by the
worker's CPU seconds per job over the same window (``inferq bench --isolate --profile``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from producer import InferenceClient
from workers.bench.measure import cpu_seconds, submit_chunk

#: (stage, where its frames live): the innermost frame on a stack that matches decides.
STAGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("model", ("workers/serving/runtime.py",)),
    ("events and metrics", ("workers/serving/observers.py", "workers/serving/events.py",
                            "workers/ops/", "prometheus_client/", "workers/serving/shadow.py",
                            "workers/serving/drift.py")),
    ("result documents", ("producer/wire/results.py", "_succeed", "_fail")),
    ("Redis writes (results, acks)", ("workers/serving/writer.py",)),
    ("batch assembly", ("workers/serving/batching.py",)),
    ("decode and checks", ("workers/serving/intake.py", "workers/serving/validation.py",
                           "producer/wire/envelope.py", "producer/wire/tensors.py",
                           "workers/serving/inflight.py", "workers/serving/poison.py")),
    ("queue reads", ("workers/serving/reader.py",)),
    ("serving loop", ("workers/serving/loop.py",)),
)
OTHER = "Celery, heartbeats, other"
#: Innermost frames of a thread that is waiting, not running: py-spy does not always tell a
#: thread blocked on a lock, in epoll or in a socket read from one on the CPU, and counting
#: those samples would charge a stage for its idle time (the writer waiting for the next
#: batch, a thread waiting for Redis's reply). The CPU per job itself is measured, not sampled.
WAITING = ("Condition.wait (", "Event.wait (", "_epoll.poll (", "select (",
           "read_from_socket (")


def stage_of(stack: Sequence[str]) -> str:
    """The stage of one sampled stack (frames outermost first, as py-spy writes them)."""
    for frame in reversed(stack):
        for stage, marks in STAGES:
            if any(mark in frame for mark in marks):
                return stage
    return OTHER


def parse_raw(text: str) -> Counter[str]:
    """Samples by stage from py-spy's ``--format raw`` output (``a;b;c COUNT`` lines)."""
    out: Counter[str] = Counter()
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            frames = stack.split(";")
            if not any(mark in frames[-1] for mark in WAITING):
                out[stage_of(frames)] += int(count)
    return out


def _py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(found).exists():
        raise RuntimeError("--profile needs py-spy (pip install 'inferq[dev]')")
    return found


def profile_worker(client: InferenceClient, model: str, inputs: Sequence[dict[str, Any]],
                   pid: int, seconds: float) -> dict[str, Any]:
    """Keep the worker saturated for ``seconds`` while py-spy samples it; CPU-us per job by
    stage."""
    stop = threading.Event()
    done = [0]

    def load() -> None:
        chunk = [inputs[i % len(inputs)] for i in range(submit_chunk(inputs))]
        # Two chunks in flight: the worker never waits for the producer.
        ahead = client.submit_many(model, chunk)
        while not stop.is_set():
            handles = client.submit_many(model, chunk)
            client.results([h.id for h in ahead], timeout=120)
            done[0] += len(ahead)
            ahead = handles
        client.results([h.id for h in ahead], timeout=120)

    feeder = threading.Thread(target=load, daemon=True)
    feeder.start()
    time.sleep(0.5)  # saturated before sampling starts
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "profile.txt"
        cpu0, jobs0 = cpu_seconds(pid), done[0]
        spy = subprocess.run(
            [_py_spy(), "record", "--pid", str(pid), "--duration", str(int(seconds)),
             "--rate", "250", "--format", "raw", "--nonblocking", "--output", str(raw)],
            capture_output=True, text=True, check=False)
        cpu, jobs = cpu_seconds(pid) - cpu0, done[0] - jobs0
        stop.set()
        feeder.join(timeout=120)
        if spy.returncode != 0 or not raw.exists():
            raise RuntimeError(f"py-spy failed: {spy.stderr.strip()[-500:]}")
        text = raw.read_text()
        if keep := os.environ.get("INFERQ_BENCH_PROFILE_RAW"):
            Path(keep).write_text(text)  # for a closer look (flamegraph.pl, speedscope)
        samples = parse_raw(text)
    total = sum(samples.values()) or 1
    per_job_us = cpu * 1e6 / max(1, jobs)
    return {
        "seconds": seconds, "jobs": jobs, "worker_cpu_us_per_job": round(per_job_us, 1),
        "samples": total,
        "cpu_us_per_job_by_stage": {stage: round(per_job_us * n / total, 1)
                                    for stage, n in samples.most_common()},
    }
