"""``inferq bench --batch``: a whole Parquet file of ``mlp`` rows through ``inferq batch``.

The bench writes the file (seeded rows, one fixed-size list column ``x`` and an ``id``),
runs ``inferq batch run`` as its own process (its RSS sampled), probes online latency with
one job at a time before and during the batch, and checks a sample of the output against
ONNX Runtime run directly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from producer import InferenceClient
from workers.bench import measure
from workers.bench.fleet import inferq_workers
from workers.launch.demo import percentiles
from workers.repository import load_manifest
from workers.serving import runtime

MODEL = "mlp"
#: Rows per row group of the input file, and per generation step (bounded memory).
GROUP_ROWS = 65_536
SAMPLE_ROWS = 1000


def _group(start: int, rows: int, width: int) -> np.ndarray:
    """Rows ``start`` .. ``start + rows`` of the input: seeded per row group."""
    rng = np.random.default_rng(start)
    return (rng.random((rows, width), dtype=np.float32) * 16).astype(np.float32)


def write_input(path: Path, rows: int, width: int) -> None:
    """The bench's input: ``id`` and ``x`` (fixed-size list of ``width`` float32)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("id", pa.int64()), ("x", pa.list_(pa.float32(), width))])
    with pq.ParquetWriter(path, schema, compression="none") as writer:
        for start in range(0, rows, GROUP_ROWS):
            n = min(GROUP_ROWS, rows - start)
            values = pa.array(_group(start, n, width).reshape(-1))
            writer.write_table(pa.table({
                "id": pa.array(np.arange(start, start + n)),
                "x": pa.FixedSizeListArray.from_arrays(values, width)}, schema=schema))


def _sample_check(model_dir: Path, output: Path, rows: int, width: int) -> dict[str, Any]:
    """Outputs of ``SAMPLE_ROWS`` random rows against ONNX Runtime run in this process."""
    import pyarrow.parquet as pq

    manifest = load_manifest(model_dir / MODEL)
    session = runtime.load(manifest, manifest.latest, "cpu", 1)
    picks = np.sort(np.random.default_rng(7).choice(rows, min(SAMPLE_ROWS, rows),
                                                    replace=False))
    x = np.concatenate([_group(g, min(GROUP_ROWS, rows - g), width)[picks[(picks >= g) & (
        picks < g + GROUP_ROWS)] - g] for g in range(0, rows, GROUP_ROWS)])
    table = pq.read_table(output, columns=["id", "logits"]).take(picks)
    got = np.array(table.column("logits").to_pylist(), np.float32)
    want = session.run({"x": x})["logits"]
    return {"rows": len(picks), "ids_match": table.column("id").to_pylist() == picks.tolist(),
            "max_abs_diff": float(np.abs(got - want).max()),
            "allclose": bool(np.allclose(got, want, rtol=1e-4, atol=1e-4))}


class _Online(threading.Thread):
    """One online job at a time (priority 0) until stopped; round-trip milliseconds."""

    def __init__(self, client: InferenceClient, inputs: Sequence[dict[str, Any]]) -> None:
        super().__init__(daemon=True)
        self.client, self.inputs = client, inputs
        self.stop, self.ms = threading.Event(), list[float]()

    def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            start = time.perf_counter()
            self.client.submit(MODEL, self.inputs[i % len(self.inputs)]).result(timeout=60)
            self.ms.append((time.perf_counter() - start) * 1000)
            i += 1
            self.stop.wait(0.02)  # about 50 online jobs a second: a light online load


def batch_phase(url: str, model_dir: Path, rows: int, gpus: Sequence[int] | None,
                logs: Path, saturation_rows_per_s: float | None,
                say: Callable[[str], None], options: Sequence[str] = ()) -> dict[str, Any]:
    """Every figure of the batch phase (``options``: more ``inferq batch run`` options)."""
    manifest = load_manifest(model_dir / MODEL)
    width = int(manifest.inputs[0].shape[1])
    data, output = logs / "batch-input.parquet", logs / "batch-output.parquet"
    say(f"batch: writing {rows:,} {MODEL} rows to {data.name}")
    start = time.perf_counter()
    write_input(data, rows, width)
    say(f"  {data.stat().st_size / 1e6:,.0f} MB in {time.perf_counter() - start:.1f} s")
    inputs = measure.make_inputs(manifest, 64)
    env = {**os.environ, "INFERQ_BROKER_URL": url, "INFERQ_RESULT_URL": url}
    argv = [sys.executable, "-m", "workers.launch.cli", "batch", "run", MODEL, "--input",
            str(data), "--output", str(output), "--columns", "x=x", "--id-column", "id",
            "--json", *options]
    with inferq_workers(url, model_dir, MODEL, 1, gpus, logs / "batch.log"), \
            InferenceClient(url) as client:
        client.results([h.id for h in client.submit_many(MODEL, inputs)], timeout=120)
        quiet = measure.inferq_one_at_a_time(client, MODEL, inputs, 300)
        probe = _Online(client, inputs)
        rss: list[int] = []
        with open(logs / "batch-command.log", "w") as err:
            proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=err)
            probe.start()
            while proc.poll() is None:
                try:
                    rss.append(measure.rss_bytes(proc.pid))
                except (OSError, ValueError):
                    break
                time.sleep(0.2)
            out, _ = proc.communicate()
        probe.stop.set()
        probe.join()
    if proc.returncode != 0:
        raise RuntimeError(f"inferq batch run exited {proc.returncode}: see "
                           f"{logs / 'batch-command.log'}")
    summary = json.loads(out)
    sample = _sample_check(model_dir, output, rows, width)
    busy, calm = percentiles(probe.ms or [0.0]), percentiles(quiet)
    result = {
        "rows": summary["rows"], "seconds": round(summary["seconds"], 2),
        "rows_per_s": summary["rows_per_s"], "jobs": summary["jobs_submitted"],
        "saturation_rows_per_s": saturation_rows_per_s,
        "ratio_to_saturation": None if not saturation_rows_per_s
        else round(summary["rows_per_s"] / saturation_rows_per_s, 3),
        "rss_max_mb": round(max(rss) / 1e6, 1) if rss else None,
        "rss_samples": len(rss),
        "input_mb": round(data.stat().st_size / 1e6, 1),
        "online_quiet_ms": calm, "online_during_batch_ms": busy,
        "online_jobs_during_batch": len(probe.ms),
        "online_p99_ratio": round(busy["p99"] / calm["p99"], 2) if probe.ms else None,
        "sample": sample, "command": " ".join(["inferq", *argv[3:]]),
    }
    say(f"  batch: {result['rows']:,} rows in {result['seconds']} s "
        f"({result['rows_per_s']:,.0f} rows/s, {result['ratio_to_saturation']} of saturation), "
        f"RSS max {result['rss_max_mb']} MB; online p99 {calm['p99']:.2f} ms quiet, "
        f"{busy.get('p99', 0):.2f} ms during the batch; sample {sample}")
    return result
