"""``inferq bench --shadow``: what a 10% shadow costs the answers.

The benchmark MLP in two versions (same shape, other seeded weights), every unpinned job
routed to v1; saturation throughput and one-at-a-time latency with the shadow off and with
v2 shadowing 10% of the jobs, in alternating rounds of the same run (so a slow spell of a
shared machine hits both). Target: throughput with the shadow >= 88% of without (the
shadow's own compute, about 10%, plus at most 2%), one-at-a-time p50 within 5%.
"""

from __future__ import annotations

import hashlib
import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from producer import InferenceClient
from producer.wire.connect import connect
from workers.bench import measure
from workers.bench.fleet import inferq_workers
from workers.bench.refmodels import SPECS, build_mlp, write_model
from workers.launch.demo import percentiles
from workers.ops import routes
from workers.repository import load_manifest
from workers.serving.shadow import read_report

SAMPLE = 0.1
#: Seconds to let a route change reach every worker (it takes under one).
SETTLE_S = 1.5


def write_two_versions(root: Path) -> Path:
    """``root/mlp`` with versions 1 and 2 of the benchmark MLP."""
    spec = SPECS["mlp"]
    shutil.rmtree(root / "mlp", ignore_errors=True)
    write_model(root, "mlp", build_mlp(0), description=spec["description"],
                max_rows=spec["max_rows"], max_wait_ms=spec["max_wait"],
                input_name=spec["input"], input_shape=spec["shape"])
    second = build_mlp(1)
    (root / "mlp" / "2").mkdir()
    (root / "mlp" / "2" / "model.onnx").write_bytes(second)
    with open(root / "mlp" / "model.toml", "a") as manifest:
        manifest.write(f'\n[versions.2]\nsha256 = "{hashlib.sha256(second).hexdigest()}"\n')
    return root


def shadow_phase(url: str, tmp: Path, redis_pid: int, workers: int,
                 gpus: Sequence[int] | None, logs: Path, say: Callable[[str], None],
                 quick: bool = False) -> dict[str, Any]:
    """Throughput and one-at-a-time latency of ``mlp`` with a 10% shadow and without."""
    root = write_two_versions(tmp / "shadow-models")
    inputs = measure.make_inputs(load_manifest(root / "mlp"), 256)
    jobs, low_jobs, rounds = (3_000, 50, 1) if quick else (20_000, 200, 2)
    control = connect(url)
    figures: dict[str, list[float]] = {"off": [], "on": []}
    p50s: dict[str, list[float]] = {"off": [], "on": []}
    with inferq_workers(url, root, "mlp", workers, gpus, logs / "shadow.log") as pids, \
            InferenceClient(url) as client:
        routes.set_split(control, "mlp", {1: 1.0}, by="bench")
        client.results([h.id for h in client.submit_many("mlp", inputs)], timeout=120)  # warm
        meter = measure.CpuMeter({"redis": redis_pid,
                                  **{f"worker{i}": p for i, p in enumerate(pids)}})
        for _ in range(rounds):
            for mode in ("off", "on"):
                routes.set_shadow(control, "mlp", 2 if mode == "on" else None, SAMPLE,
                                  by="bench")
                time.sleep(SETTLE_S)
                say(f"mlp shadow {mode}: {jobs} jobs at saturation, {low_jobs} one at a time")
                run = measure.inferq_saturation(client, "mlp", inputs, jobs, meter,
                                                lambda n: None)
                figures[mode].append(run.jobs_per_s)
                low = measure.inferq_one_at_a_time(client, "mlp", inputs, low_jobs)
                p50s[mode].append(percentiles(low)["p50"])
        routes.set_shadow(control, "mlp", None, by="bench")
        counts = read_report(control, "mlp", 2, 1).counts
    off, on = statistics.mean(figures["off"]), statistics.mean(figures["on"])
    p50_off, p50_on = statistics.mean(p50s["off"]), statistics.mean(p50s["on"])
    return {
        "sample": SAMPLE, "jobs_per_round": jobs, "rounds": rounds,
        "off_jobs_per_s": round(off, 1), "on_jobs_per_s": round(on, 1),
        "ratio_on_off": round(on / off, 3),
        "off_low_load_p50_ms": round(p50_off, 3), "on_low_load_p50_ms": round(p50_on, 3),
        "ratio_p50_on_off": round(p50_on / p50_off, 3),
        "shadow_compared": int(counts.get("compared", 0)),
        "shadow_dropped": int(counts.get("dropped", 0)),
        "shadow_failed": int(counts.get("failed", 0)),
    }


def format_shadow(r: dict[str, Any]) -> str:
    return (f"  mlp with a {r['sample']:.0%} shadow: {r['on_jobs_per_s']:,.0f} jobs/s vs "
            f"{r['off_jobs_per_s']:,.0f} off ({r['ratio_on_off']:.0%}; target >= 88%); "
            f"one at a time p50 {r['on_low_load_p50_ms']:.2f} vs {r['off_low_load_p50_ms']:.2f}"
            f" ms; shadow compared {r['shadow_compared']:,}, dropped "
            f"{r['shadow_dropped']:,}, failed {r['shadow_failed']}")
