"""``inferq bench``: direct ONNX Runtime vs naive Celery vs inferq, in one run."""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from producer import InferenceClient
from producer.wire.connect import connect
from workers.bench import growth, measure
from workers.bench.fleet import INSTANCES, inferq_workers, naive_worker
from workers.bench.refmodels import write_repository
from workers.launch.demo import percentiles
from workers.launch.redisproc import RedisServer
from workers.repository import load_manifest
from workers.settings import default_model_dir, usable_cores


@dataclass(frozen=True)
class Load:
    """How many jobs each phase sends for one model."""

    inferq: int
    naive: int
    one_at_a_time: int = 200


DEFAULT_LOADS = {
    "mlp": Load(inferq=30_000, naive=3_000),
    "cnn": Load(inferq=3_000, naive=600),
    "digits": Load(inferq=30_000, naive=3_000),
}
QUICK_LOADS = {
    "mlp": Load(inferq=3_000, naive=300, one_at_a_time=50),
    "cnn": Load(inferq=150, naive=60, one_at_a_time=20),
    "digits": Load(inferq=3_000, naive=300, one_at_a_time=50),
}


class Bar:
    """A one-line progress bar on stderr."""

    def __init__(self, label: str, total: int) -> None:
        self.label, self.total, self.done, self._last = label, total, 0, 0.0

    def __call__(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last > 0.2 or self.done >= self.total:
            self._last = now
            filled = int(30 * self.done / max(1, self.total))
            sys.stderr.write(f"\r  {self.label:<28} [{'#' * filled}{'.' * (30 - filled)}] "
                             f"{self.done}/{self.total}")
            if self.done >= self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    import celery
    import onnxruntime

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__, "celery": celery.__version__,
        "command": " ".join(["inferq", "bench", *sys.argv[2:]]),
        "inferq_instances_per_worker": INSTANCES,
    }


def bench_model(name: str, model_dir: Path, url: str, redis_pid: int, load: Load,
                workers: int, gpus: Sequence[int] | None, logs: Path,
                say: Callable[[str], None]) -> dict[str, Any]:
    """Every figure for one model."""
    manifest = load_manifest(model_dir / name)
    threads = max(1, usable_cores() // workers)  # as the launcher gives each worker
    inputs = measure.make_inputs(manifest, 256)
    device = "cuda" if gpus else "cpu"
    say(f"{name}: direct ONNX Runtime ({device}, {threads} threads)")
    direct = measure.direct(manifest, threads, device=device)
    out: dict[str, Any] = {
        "direct_jobs_per_s_by_batch": {str(k): round(v, 1) for k, v in direct.items()},
        "direct_best_jobs_per_s": round(max(direct.values()), 1),
    }
    from celery import Celery

    app = Celery(broker=url, backend=url)
    app.conf.update(task_serializer="msgpack", result_serializer="json",
                    accept_content=["msgpack", "json"])
    with naive_worker(url, model_dir, threads, logs / "naive.log", gpus) as pid:
        measure.naive_one_at_a_time(app, name, inputs, 20)  # warm
        meter = measure.CpuMeter({"redis": redis_pid, "worker": pid})
        naive = measure.naive_saturation(app, name, inputs, load.naive, meter,
                                         Bar(f"{name} naive Celery", load.naive))
        naive_low = measure.naive_one_at_a_time(app, name, inputs, load.one_at_a_time)
    memory = growth.redis_bytes_per_job(url, model_dir, name)
    with inferq_workers(url, model_dir, name, workers, gpus, logs / "inferq.log") as pids, \
            InferenceClient(url) as client:
        client.results([h.id for h in client.submit_many(name, inputs)], timeout=120)  # warm
        meter = measure.CpuMeter({"redis": redis_pid,
                                  **{f"worker{i}": p for i, p in enumerate(pids)}})
        fast = measure.inferq_saturation(client, name, inputs, load.inferq, meter,
                                         Bar(f"{name} inferq", load.inferq))
        with connect(url) as pinger:
            fast_low, stages = measure.one_at_a_time_stages(client, name, inputs,
                                                            load.one_at_a_time, pinger.ping)
    low, naive_low_p = percentiles(fast_low), percentiles(naive_low)
    say(f"  {name} one at a time, medians (ms): " + ", ".join(
        f"{k} {v:.3f}" for k, v in stages.items()))
    out.update({
        "naive_jobs_per_s": round(naive.jobs_per_s, 1),
        "inferq_jobs_per_s": round(fast.jobs_per_s, 1),
        "inferq_low_load_p50_ms": low["p50"],
        "inferq_low_load_p95_ms": low["p95"],
        "inferq_low_load_p99_ms": low["p99"],
        "inferq_low_load_stages_ms": stages,
        "naive_low_load_p50_ms": naive_low_p["p50"],
        "naive_low_load_p99_ms": naive_low_p["p99"],
        "inferq_sat_p50_ms": fast.summary()["latency_ms"]["p50"],
        "inferq_sat_p95_ms": fast.summary()["latency_ms"]["p95"],
        "inferq_sat_p99_ms": fast.summary()["latency_ms"]["p99"],
        "mean_batch_rows": fast.summary()["mean_batch_rows"],
        "ratio_inferq_naive": round(fast.jobs_per_s / naive.jobs_per_s, 2),
        "ratio_inferq_direct_best": round(fast.jobs_per_s / max(direct.values()), 3),
        "redis_bytes_per_queued_job": memory["redis_bytes_per_job"],
        "redis_bytes_per_tensor_byte": memory["ratio"],
        "inferq": fast.summary(),
        "naive": naive.summary(),
    })
    return out


def run(models: Sequence[str], *, workers: int = 1, gpus: Sequence[int] | None = None,
        quick: bool = False, json_path: Path | None = None, plot_path: Path | None = None,
        sweep: bool = False, payloads: bool = False, soak_jobs: int = 0,
        batch_rows: int = 0, isolate: bool = False, profile_s: float = 0.0,
        gateway: bool = False, shadow: bool = False, drift: bool = False,
        say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the benchmark on a private Redis and return (and optionally write) the figures."""
    loads = QUICK_LOADS if quick else DEFAULT_LOADS
    with tempfile.TemporaryDirectory(prefix="inferq-bench-") as tmp:
        root = write_repository(Path(tmp) / "models", default_model_dir() / "digits")
        logs = Path(tmp)
        report: dict[str, Any] = {"machine": machine()}
        with RedisServer(appendonly=True) as server:
            assert server.pid is not None
            for name in models:
                report[name] = bench_model(name, root, server.url, server.pid, loads[name],
                                           workers, gpus, logs, say)
                say(format_row(name, report[name]))
            if isolate or profile_s:
                from workers.bench.isolate import isolate_phase

                report["isolated"] = {
                    name: isolate_phase(server.url, server.pid, root, name, loads[name].inferq,
                                        loads[name].one_at_a_time, logs, say, profile_s)
                    for name in models}
            if payloads:
                names = growth.write_payload_models(root)
                say("payload sizes: " + ", ".join(names))
                with inferq_workers(server.url, root, ",".join(names), workers, gpus,
                                    logs / "payloads.log"), InferenceClient(server.url) as c:
                    report["payloads"] = growth.payload_sweep(c, names, root)
                for name in names:
                    report["payloads"][name].update(
                        growth.redis_bytes_per_job(server.url, root, name, jobs=200))
                    say(f"  {name}: {report['payloads'][name]}")
            if soak_jobs:
                manifest = load_manifest(root / "mlp")
                with inferq_workers(server.url, root, "mlp", 1, gpus, logs / "soak.log") as pids, \
                        InferenceClient(server.url) as c:
                    report["soak"] = growth.soak(c, "mlp", measure.make_inputs(manifest, 256),
                                                 soak_jobs, pids[0], server.url, say)
            if batch_rows:
                from workers.bench.batch import batch_phase

                report["batch"] = batch_phase(
                    server.url, root, batch_rows, gpus, logs,
                    report.get("mlp", {}).get("inferq_jobs_per_s"), say)
                if isolate and not gpus:
                    # Again as a fleet runs it; saturation is then the isolated worker's.
                    isolated = report.get("isolated", {}).get("mlp", {})
                    report["batch_isolated"] = batch_phase(
                        server.url, root, batch_rows, gpus, logs,
                        isolated.get("inferq_jobs_per_s"), say,
                        isolate_redis_pid=server.pid)
            if gateway:
                from workers.bench.gateway import format_gateway, gateway_phase

                report["gateway"] = gateway_phase(server.url, root, workers, gpus, logs, say,
                                                  quick=quick)
                say(format_gateway(report["gateway"]))
            if shadow:
                from workers.bench.shadow import format_shadow, shadow_phase

                report["shadow"] = shadow_phase(server.url, Path(tmp), server.pid, workers,
                                                gpus, logs, say, quick=quick)
                say(format_shadow(report["shadow"]))
            if drift:
                from workers.bench.drift import drift_phase, format_drift

                report["drift"] = drift_phase(server.url, root, server.pid, models, workers,
                                              gpus, logs, say, quick=quick)
                say(format_drift(report["drift"]))
            if sweep or plot_path:
                from workers.bench.sweep import sweep as run_sweep

                report["sweep"] = run_sweep(server.url, root, "mlp", workers, gpus, logs,
                                            report.get("mlp", {}).get("inferq_jobs_per_s"), say)
    if json_path:
        json_path.write_text(json.dumps(report, indent=2))
    if plot_path and "sweep" in report:
        from workers.bench.sweep import plot

        plot(report, plot_path)
    say(format_table(report, models))
    return report


def format_row(name: str, r: dict[str, Any]) -> str:
    return (f"  {name}: inferq {r['inferq_jobs_per_s']:,.0f} jobs/s, naive "
            f"{r['naive_jobs_per_s']:,.0f}, direct best {r['direct_best_jobs_per_s']:,.0f}")


def format_table(report: dict[str, Any], models: Sequence[str]) -> str:
    """The Markdown table the README shows."""
    head = ("| model | direct best jobs/s | naive Celery jobs/s | inferq jobs/s | "
            "inferq / naive | inferq / direct | mean batch rows | inferq p50 / p99 one at a "
            "time (ms) | naive p50 one at a time (ms) | inferq p99 saturated (ms) | "
            "CPU ms/job inferq (producer / redis / worker) | CPU ms/job naive |")
    lines = [head, "|" + "---|" * 12]
    for name in models:
        r = report[name]
        fc, nc = r["inferq"]["cpu_ms_per_job"], r["naive"]["cpu_ms_per_job"]
        wk = sum(v for k, v in fc.items() if k.startswith("worker"))
        lines.append(
            f"| {name} | {r['direct_best_jobs_per_s']:,.0f} | {r['naive_jobs_per_s']:,.0f} | "
            f"{r['inferq_jobs_per_s']:,.0f} | {r['ratio_inferq_naive']:.1f}x | "
            f"{r['ratio_inferq_direct_best']:.0%} | {r['mean_batch_rows']:.1f} | "
            f"{r['inferq_low_load_p50_ms']:.2f} / {r['inferq_low_load_p99_ms']:.2f} | "
            f"{r['naive_low_load_p50_ms']:.2f} | {r['inferq_sat_p99_ms']:,.0f} | "
            f"{fc['producer']:.3f} / {fc['redis']:.3f} / {wk:.3f} | "
            f"{nc['producer']:.3f} / {nc['redis']:.3f} / {nc['worker']:.3f} |")
    return "\n".join(lines)
