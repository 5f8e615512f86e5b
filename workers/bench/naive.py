"""The baseline: plain Celery, one task per job, the model loaded once per worker process.

Run as ``celery -A workers.bench.naive worker -P solo``; same Redis, same tensor encoding
and JSON results as inferq, so the comparison isolates the data path.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from celery import Celery

from producer import wire
from producer.wire.connect import broker_url, result_url
from workers import repository
from workers.serving import runtime

TASK = "bench.naive_infer"

app = Celery(
    "naive",
    broker=broker_url(),
    backend=result_url(),
)
app.conf.update(
    task_serializer="msgpack",
    result_serializer="json",
    accept_content=["msgpack", "json"],
    result_accept_content=["json"],
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    worker_hijack_root_logger=False,
)
_models: dict[str, runtime.LoadedModel] = {}


def _model(name: str) -> runtime.LoadedModel:
    if name not in _models:
        root = Path(os.environ["INFERQ_MODEL_DIR"])
        manifest = repository.load_manifest(root / name)
        threads = int(os.environ.get("INFERQ_INTRA_OP_THREADS", "0"))
        device = os.environ.get("INFERQ_DEVICE", "cpu")
        _models[name] = runtime.load(manifest, manifest.latest, device, threads)
    return _models[name]


@app.task(name=TASK)  # type: ignore[untyped-decorator]
def infer(model: str, inputs: dict[str, Any]) -> dict[str, Any]:
    """Decode, run and encode one job."""
    loaded = _model(model)
    feeds = {name: wire.decode_tensor(t, name) for name, t in inputs.items()}
    outputs = loaded.run(feeds)
    return {"outputs": {k: wire.encode_tensor(v, text=True) for k, v in outputs.items()}}
