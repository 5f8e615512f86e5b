"""Open-loop arrival-rate sweep and the plot of throughput and latency against offered load."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from producer import InferenceClient
from workers.bench import measure
from workers.bench.fleet import inferq_workers
from workers.repository import load_manifest

FRACTIONS = (0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0, 1.25)


def sweep(url: str, model_dir: Path, model: str, workers: int, gpus: Sequence[int] | None,
          logs: Path, saturation: float | None, say: Callable[[str], None],
          seconds: float = 2.0) -> dict[str, Any]:
    """Offer a rising rate of jobs (fractions of the saturation throughput) to ``model``."""

    manifest = load_manifest(model_dir / model)
    inputs = measure.make_inputs(manifest, 256)
    top = saturation or 10_000.0
    points = []
    with inferq_workers(url, model_dir, model, workers, gpus, logs / "sweep.log"), \
            InferenceClient(url) as client:
        client.results([h.id for h in client.submit_many(model, inputs)], timeout=120)
        for fraction in FRACTIONS:
            point = measure.open_loop(client, model, inputs, top * fraction, seconds)
            say(f"  sweep {model}: offered {point['offered_jobs_per_s']:,.0f}/s -> "
                f"{point['achieved_jobs_per_s']:,.0f}/s, p50 {point['p50_ms']:.2f} ms, "
                f"p99 {point['p99_ms']:.2f} ms, batch {point['mean_batch_rows']:.1f}")
            points.append(point)
    return {"model": model, "seconds_per_point": seconds, "points": points}


def plot(report: dict[str, Any], path: Path) -> None:
    """Throughput and latency (p50/p99) against offered load, naive Celery for reference."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install matplotlib") from None
    data = report["sweep"]
    pts = data["points"]
    offered = [p["offered_jobs_per_s"] for p in pts]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    left.plot(offered, [p["achieved_jobs_per_s"] for p in pts], "o-", label="inferq")
    left.plot(offered, offered, ":", color="grey", label="offered")
    naive = report.get(data["model"], {}).get("naive_jobs_per_s")
    if naive:
        left.axhline(naive, color="tab:red", linestyle="--", label="naive Celery (saturated)")
    left.set_xlabel("offered load (jobs/s)")
    left.set_ylabel("completed (jobs/s)")
    left.set_title(f"{data['model']}: throughput")
    left.legend()
    right.plot(offered, [p["p50_ms"] for p in pts], "o-", label="p50")
    right.plot(offered, [p["p99_ms"] for p in pts], "s-", label="p99")
    right.set_yscale("log")
    right.set_xlabel("offered load (jobs/s)")
    right.set_ylabel("enqueue -> result stored (ms)")
    right.set_title(f"{data['model']}: latency")
    right.legend()
    machine = report.get("machine", {})
    fig.suptitle(f"inferq bench, {machine.get('cpus')} CPUs, {machine.get('date', '')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
