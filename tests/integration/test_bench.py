"""``inferq bench --quick``: every phase runs against real processes and writes its figures."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import PY, ROOT, python_env

pytestmark = pytest.mark.integration


def test_quick_bench_writes_the_figures(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    # The isolated phase (worker on a core of its own) where there are cores to split.
    isolate = ["--isolate"] if len(os.sched_getaffinity(0)) >= 2 else []
    proc = subprocess.run(
        [PY, "-m", "workers.launch.cli", "bench", "--quick", "--models", "mlp", "--json", str(out),
         *isolate], cwd=ROOT, env=python_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    mlp = report["mlp"]
    for key in ("direct_best_jobs_per_s", "naive_jobs_per_s", "inferq_jobs_per_s",
                "inferq_low_load_p50_ms", "inferq_low_load_p99_ms", "inferq_sat_p99_ms",
                "mean_batch_rows"):
        assert mlp[key] > 0, key
    stages = mlp["inferq_low_load_stages_ms"]
    assert {"round_trip", "submit", "result", "queued", "batch_wait", "inference", "total",
            "redis_ping"} <= stages.keys()
    assert all(v > 0 for v in stages.values()), stages
    # The job's own stamps lie inside the caller's round trip.
    assert stages["inference"] < stages["total"] < stages["round_trip"], stages
    assert mlp["inferq"]["jobs"] == 3000 and sum(mlp["inferq"]["batch_rows_hist"].values()) > 0
    assert {"producer", "redis", "worker0"} <= mlp["inferq"]["cpu_ms_per_job"].keys()
    assert report["machine"]["cpus"] >= 1
    assert "| mlp |" in proc.stdout  # the Markdown table the README shows
    if isolate:
        alone = report["isolated"]["mlp"]
        assert alone["inferq_jobs_per_s"] > 0 and alone["worker_cpu_us_per_job"] > 0
        assert alone["backlog"]["jobs"] == 3000 and alone["backlog"]["jobs_per_s"] > 0
