"""``inferq bench --drift``: what keeping drift histograms costs the answers.

For each model (``mlp``, ``cnn``) the version gets a reference profile first, so the
measured workers bin rows from the first job (steady state, not the reference's first
rows). Saturation throughput and one-at-a-time latency with ``INFERQ_DRIFT=0`` and with
drift on at its default sample (10%), in alternating rounds of the same run, each on fresh
workers (the setting is read at start), off first in one round and on first in the next.
Target: throughput with drift >= 97% of without,
one-at-a-time p50 within 5%.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
import types
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from producer import InferenceClient
from producer.wire.connect import connect
from workers.bench import measure
from workers.bench.fleet import inferq_workers
from workers.launch.demo import percentiles
from workers.ops import drift
from workers.repository import load_manifest
from workers.serving import runtime
from workers.serving.drift import DriftObserver
from workers.serving.observers import Batch

#: Reference rows profiled per model.
REFERENCE_ROWS = 512
#: (saturation jobs, one-at-a-time jobs) per round.
LOADS = {"mlp": (20_000, 200), "cnn": (1_500, 100)}
QUICK_LOADS = {"mlp": (3_000, 50), "cnn": (150, 20)}


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    """``os.environ`` with ``values`` set (workers started meanwhile inherit them)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def write_profile(root: Path, name: str) -> Path:
    """A profile.json for the latest version of ``root/name`` from seeded rows."""
    manifest = load_manifest(root / name)
    rows = measure.make_inputs(manifest, REFERENCE_ROWS, seed=1)
    arrays = {s.name: np.concatenate([r[s.name] for r in rows]) for s in manifest.inputs}
    model = runtime.load(manifest, manifest.latest, "cpu", 0)
    outputs = [model.run({k: v[i:i + 64] for k, v in arrays.items()})
               for i in range(0, REFERENCE_ROWS, 64)]
    for spec in manifest.outputs:
        arrays[spec.name] = np.concatenate([o[spec.name] for o in outputs])
    profile = drift.build_profile(name, manifest.latest, manifest.inputs, manifest.outputs,
                                  arrays, f"bench ({REFERENCE_ROWS} rows)")
    path = drift.profile_path(root, name, manifest.latest)
    path.write_text(profile.dumps())
    return path


def drift_model(url: str, root: Path, name: str, redis_pid: int, workers: int,
                gpus: Sequence[int] | None, logs: Path, say: Callable[[str], None],
                quick: bool) -> dict[str, Any]:
    """Drift off against on for one model."""
    manifest = load_manifest(root / name)
    inputs = measure.make_inputs(manifest, 256)
    jobs, low_jobs = (QUICK_LOADS if quick else LOADS)[name]
    rounds = 2
    profile = write_profile(root, name)
    cost = observer_cost(url, root, name)
    figures: dict[str, list[float]] = {"off": [], "on": []}
    p50s: dict[str, list[float]] = {"off": [], "on": []}
    #: Worker CPU per job: what drift costs, much less sensitive than throughput to other
    #: processes sharing the machine.
    cpu: dict[str, list[float]] = {"off": [], "on": []}
    try:
        for round_ in range(rounds):
            # Alternate which goes first: the first fleet of a round may meet a colder machine.
            for mode in ("off", "on") if round_ % 2 == 0 else ("on", "off"):
                # Counts written every second, not every 5: a short round still writes
                # them (rows_binned), and the figure includes five times the writes.
                with _env(INFERQ_DRIFT="1" if mode == "on" else "0", INFERQ_DRIFT_FLUSH="1"), \
                        inferq_workers(url, root, name, workers, gpus,
                                       logs / "drift.log") as pids, \
                        InferenceClient(url) as client:
                    client.results([h.id for h in client.submit_many(name, inputs)],
                                   timeout=120)  # warm
                    meter = measure.CpuMeter({"redis": redis_pid, **{
                        f"worker{i}": p for i, p in enumerate(pids)}})
                    say(f"{name} drift {mode}: {jobs} jobs at saturation, {low_jobs} one "
                        "at a time")
                    run = measure.inferq_saturation(client, name, inputs, jobs, meter,
                                                    lambda n: None)
                    figures[mode].append(run.jobs_per_s)
                    cpu[mode].append(sum(v for k, v in run.cpu.items()
                                         if k.startswith("worker")) * 1000 / jobs)
                    low = measure.inferq_one_at_a_time(client, name, inputs, low_jobs)
                    p50s[mode].append(percentiles(low)["p50"])
        window = drift.read_window(connect(url), name, manifest.latest, 60)
    finally:
        profile.unlink(missing_ok=True)
    off, on = statistics.mean(figures["off"]), statistics.mean(figures["on"])
    p50_off, p50_on = statistics.mean(p50s["off"]), statistics.mean(p50s["on"])
    return {
        "jobs_per_round": jobs, "rounds": rounds,
        "off_jobs_per_s": round(off, 1), "on_jobs_per_s": round(on, 1),
        "ratio_on_off": round(on / off, 3),
        "off_low_load_p50_ms": round(p50_off, 3), "on_low_load_p50_ms": round(p50_on, 3),
        "ratio_p50_on_off": round(p50_on / p50_off, 3),
        "off_rounds_jobs_per_s": [round(v, 1) for v in figures["off"]],
        "on_rounds_jobs_per_s": [round(v, 1) for v in figures["on"]],
        "off_worker_cpu_ms_per_job": round(statistics.mean(cpu["off"]), 4),
        "on_worker_cpu_ms_per_job": round(statistics.mean(cpu["on"]), 4),
        "ratio_cpu_on_off": round(statistics.mean(cpu["on"]) / statistics.mean(cpu["off"]), 3),
        "rows_binned": max(window.rows) if window is not None else 0,
        "observer": cost,
    }


def observer_cost(url: str, root: Path, name: str, seconds: float = 1.0) -> dict[str, Any]:
    """The drift observer's own time per full batch (best of 5), in this process, against
    the model's compute for that batch: the cost, free of the noise of a shared machine."""
    manifest = load_manifest(root / name)
    rows = manifest.max_batch_rows
    inputs = measure.make_inputs(manifest, rows, seed=2)
    model = runtime.load(manifest, manifest.latest, "cpu", 1)
    feeds = {k: np.concatenate([r[k] for r in inputs]) for k in inputs[0]}
    out = model.run(feeds)
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        model.run(feeds)
        runs += 1
    compute = (time.perf_counter() - start) / runs
    jobs = [types.SimpleNamespace(inputs=r, rows=1) for r in inputs]
    outcomes = [{k: v[i:i + 1] for k, v in out.items()} for i in range(rows)]
    batch = Batch(name, manifest.latest, "cpu", jobs, rows, time.time(),  # type: ignore[arg-type]
                  finished=time.time())
    observer = DriftObserver(manifest, connect(url), root, sample=0.1, reference_rows=5000,
                             flush_s=3600, idle_flush=False)
    for _ in range(3):  # find the reference (profile.json), adopt it
        observer.batch_done(batch, outcomes)
        work = observer.handoff()
        if work is not None:
            work()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(200):
            observer.batch_done(batch, outcomes)
        best = min(best, (time.perf_counter() - start) / 200)
    return {"batch_rows": rows, "compute_ms_per_batch": round(compute * 1000, 3),
            "drift_us_per_batch": round(best * 1e6, 1),
            "drift_share_of_compute": round(best / compute, 4)}


def drift_phase(url: str, root: Path, redis_pid: int, models: Sequence[str], workers: int,
                gpus: Sequence[int] | None, logs: Path, say: Callable[[str], None],
                quick: bool = False) -> dict[str, Any]:
    """:func:`drift_model` for each of ``models`` that is ``mlp`` or ``cnn``."""
    return {name: drift_model(url, root, name, redis_pid, workers, gpus, logs, say, quick)
            for name in models if name in LOADS}


def format_drift(report: dict[str, Any]) -> str:
    return "\n".join(
        f"  {name} with drift on: {r['on_jobs_per_s']:,.0f} jobs/s vs {r['off_jobs_per_s']:,.0f}"
        f" off ({r['ratio_on_off']:.1%}; target >= 97%); one at a time p50 "
        f"{r['on_low_load_p50_ms']:.2f} vs {r['off_low_load_p50_ms']:.2f} ms "
        f"({r['ratio_p50_on_off']:.1%}); worker CPU {r['on_worker_cpu_ms_per_job']:.3f} vs "
        f"{r['off_worker_cpu_ms_per_job']:.3f} ms/job ({r['ratio_cpu_on_off']:.1%}); "
        f"{r['rows_binned']:,} rows binned; binning {r['observer']['drift_us_per_batch']:.0f}"
        f" us per batch of {r['observer']['batch_rows']} rows = "
        f"{r['observer']['drift_share_of_compute']:.2%} of its compute"
        for name, r in report.items())
