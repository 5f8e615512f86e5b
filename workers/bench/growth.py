"""How cost grows: Redis bytes per queued job, payload size, and a long soak for RSS."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from producer import InferenceClient, wire
from producer.wire.connect import connect
from workers.bench import measure
from workers.bench.refmodels import _finish, _onnx, write_model
from workers.launch.demo import percentiles
from workers.repository import load_manifest

#: Row sizes for the payload sweep: 4 KB, 48 KB and 1 MB of float32.
PAYLOAD_FLOATS = {"4KB": 1024, "48KB": 12_288, "1MB": 262_144}

def write_payload_models(root: Path) -> list[str]:
    """``echo_4KB``, ``echo_48KB``, ``echo_1MB``: the mean of one row, so cost is all transport."""
    onnx = _onnx()
    h = onnx.helper
    names = []
    for label, floats in PAYLOAD_FLOATS.items():
        graph = h.make_graph(
            [h.make_node("ReduceMean", ["x"], ["mean"], axes=[1], keepdims=1)], "echo",
            [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", floats])],
            [h.make_tensor_value_info("mean", onnx.TensorProto.FLOAT, ["N", 1])],
        )
        name = f"echo_{label}"
        write_model(root, name, _finish(graph), max_rows=16, input_name="x",
                    input_shape=[-1, floats], output_name="mean", output_shape=[-1, 1],
                    description=f"benchmark payload model: mean of a row of {floats} float32")
        names.append(name)
    return names


def redis_bytes_per_job(url: str, model_dir: Path, model: str, jobs: int = 2000,
                        bulk: bool = True) -> dict[str, float]:
    """Redis memory per queued (not yet consumed) job, against the job's tensor bytes.

    No worker may consume ``model`` while this runs; the queue is emptied afterwards.
    """
    client = connect(url, timeout=60)
    manifest = load_manifest(model_dir / model)
    inputs = measure.make_inputs(manifest, 64)
    tensor_bytes = sum(a.nbytes for a in inputs[0].values())
    queue = wire.queue_name(model)
    with InferenceClient(url, validate=False) as producer:
        client.delete(queue)
        before = int(client.info("memory")["used_memory"])
        items = [inputs[i % len(inputs)] for i in range(jobs)]
        if bulk:
            producer.submit_many(model, items)
        else:
            for item in items:
                producer.submit(model, item)
        after = int(client.info("memory")["used_memory"])
    client.delete(queue)
    for key in client.scan_iter(wire.BLOB_KEY_PREFIX + "*", count=1000):
        client.unlink(key)
    per_job = (after - before) / jobs
    return {"tensor_bytes": tensor_bytes, "redis_bytes_per_job": round(per_job, 1),
            "ratio": round(per_job / tensor_bytes, 3)}


def payload_sweep(client: InferenceClient, names: Sequence[str], model_dir: Path,
                  jobs: int = 400) -> dict[str, Any]:
    """Jobs/s and one-at-a-time latency for each payload size (workers already running)."""
    out = {}
    for name in names:
        inputs = measure.make_inputs(load_manifest(model_dir / name), 16)
        client.results([h.id for h in client.submit_many(name, inputs)], timeout=120)
        chunk = min(32, measure.submit_chunk(inputs))
        start = time.perf_counter()
        handles = [h for i in range(0, jobs, chunk) for h in client.submit_many(
            name, [inputs[j % 16] for j in range(i, min(jobs, i + chunk))])]
        client.results([h.id for h in handles], timeout=600)
        rate = jobs / (time.perf_counter() - start)
        low = percentiles(measure.inferq_one_at_a_time(client, name, inputs, 50))
        row_bytes = sum(a.nbytes for a in inputs[0].values())
        out[name] = {"row_bytes": row_bytes, "jobs_per_s": round(rate, 1),
                     "MB_per_s": round(rate * row_bytes / 1e6, 1),
                     "one_at_a_time_p50_ms": low["p50"], "one_at_a_time_p99_ms": low["p99"]}
    return out


def soak(client: InferenceClient, model: str, inputs: Sequence[dict[str, np.ndarray[Any, Any]]],
         jobs: int, worker_pid: int, redis_url: str, say: Callable[[str], None],
         chunk: int = 2048) -> dict[str, Any]:
    """Run ``jobs`` jobs in waves, sampling worker RSS and Redis memory as it goes."""
    r = connect(redis_url, timeout=60)
    samples: list[dict[str, Any]] = []
    done, start = 0, time.perf_counter()
    while done < jobs:
        handles = client.submit_many(model, [inputs[(done + i) % len(inputs)]
                                             for i in range(min(chunk, jobs - done))])
        client.results([h.id for h in handles], timeout=600)
        done += len(handles)
        if not samples or done - samples[-1]["jobs"] >= jobs // 50:
            samples.append({"jobs": done, "seconds": round(time.perf_counter() - start, 1),
                            "worker_rss_mb": round(measure.rss_bytes(worker_pid) / 2**20, 1),
                            "redis_used_mb": round(int(r.info("memory")["used_memory"]) / 2**20,
                                                   1)})
            say(f"  soak {done:,}/{jobs:,}: worker RSS {samples[-1]['worker_rss_mb']} MB, "
                f"Redis {samples[-1]['redis_used_mb']} MB")
    # Growth over the second half: warm-up allocations are not a leak.
    half = [s for s in samples if s["jobs"] >= jobs // 2]
    return {"jobs": jobs, "jobs_per_s": round(jobs / (time.perf_counter() - start), 1),
            "worker_rss_growth_mb_second_half": round(
                half[-1]["worker_rss_mb"] - half[0]["worker_rss_mb"], 1),
            "samples": samples}
