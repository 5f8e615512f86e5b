"""Result documents: written by workers, read by producers (and any Celery client).

A result is Celery's SUCCESS or FAILURE meta as JSON under ``celery-task-meta-<job id>``,
readable with a plain ``GET`` + ``JSON.parse``. A FAILURE carries a structured ``error``
(code, type, message, and the model when known), read back as the error class of its code.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import orjson

from producer.errors import InferqError, JobFailed, error_for_code
from producer.wire.tensors import decode_tensor, dtype_name, encode_tensor, tensor_bytes

Arrays = Mapping[str, np.ndarray[Any, Any]]


# --- writing (workers) ---------------------------------------------------------------


def date_done() -> str:
    """Celery's ``date_done`` stamp for a result written now."""
    return datetime.now(timezone.utc).isoformat()


def timings_ms(*, enqueued_at: float | None, picked_at: float, started: float,
               finished: float, stored: float) -> dict[str, float | None]:
    """A job's latency breakdown from its epoch-second stamps (``queued`` is None without
    an enqueue stamp; ``total`` then starts at pick-up)."""
    origin = picked_at if enqueued_at is None else enqueued_at
    return {
        "queued": None if enqueued_at is None else _ms(picked_at - enqueued_at),
        "batch_wait": _ms(started - picked_at),
        "inference": _ms(finished - started),
        "total": _ms(stored - origin),
    }


def success_result(outputs: Arrays, *, model: str, version: int, worker: str,
                   batch_size: int, timings: Mapping[str, float | None],
                   route: str | None = None) -> dict[str, Any]:
    """The ``result`` body of a successful job: its outputs and how it was served (``route``:
    how its version was chosen)."""
    body = {
        "outputs": {k: encode_tensor(v, text=True) for k, v in outputs.items()},
        "model": model,
        "version": version,
        "worker": worker,
        "batch_size": batch_size,
        "timings_ms": timings,
    }
    if route is not None:
        body["route"] = route
    return body


def _meta(job_id: str, status: str, result: Any, done: str | None, **extra: Any
          ) -> dict[str, Any]:
    return {
        "status": status,
        "result": result,
        "traceback": None,
        "children": [],
        "date_done": date_done() if done is None else done,
        "task_id": job_id,
        **extra,
    }


def success_document(job_id: str, result: Mapping[str, Any], date_done: str | None = None
                     ) -> bytes:
    """The JSON result document of a successful job (Celery SUCCESS meta)."""
    # orjson: this runs once per job on the worker's hot path, several times faster than json.
    return orjson.dumps(_meta(job_id, "SUCCESS", result, date_done))


class SuccessDocuments:
    """The result documents of one batch's successful jobs, byte for byte what
    :func:`success_document` of :func:`success_result` writes, built from parts: what every
    job of the batch shares (model, version, worker, stamps, the outputs' names and dtypes) is
    encoded once, and each job adds only its ID, outputs, row count and timings."""

    def __init__(self, *, model: str, version: int, worker: str, started: float,
                 finished: float, stored: float, date_done: str) -> None:
        self.started, self.finished, self.stored = started, finished, stored
        self._middle = (b'"model":' + orjson.dumps(model) + b',"version":'
                        + orjson.dumps(version) + b',"worker":' + orjson.dumps(worker)
                        + b',"batch_size":')
        self._tail = (b',"traceback":null,"children":[],"date_done":'
                      + orjson.dumps(date_done) + b',"task_id":')
        self._heads: dict[tuple[str, Any], bytes] = {}
        self._shapes: dict[tuple[int, ...], bytes] = {}
        self._timings: dict[tuple[float | None, float], bytes] = {}
        self._routes: dict[str | None, bytes] = {}

    def document(self, job_id: str, outputs: Arrays, *, batch_size: int,
                 enqueued_at: float | None, picked_at: float, route: str | None) -> bytes:
        """The document of one job of the batch (as :func:`timings_ms` times it)."""
        parts = [b'{"status":"SUCCESS","result":{"outputs":{']
        for i, (name, array) in enumerate(outputs.items()):
            head = self._heads.get((name, array.dtype))
            if head is None:
                head = self._head(name, array)
            shape = self._shapes.get(array.shape)
            if shape is None:
                shape = self._shapes[array.shape] = orjson.dumps(list(array.shape))
            parts += [head if i == 0 else b"," + head, shape, b',"data":"',
                      base64.b64encode(tensor_bytes(array)), b'"}']
        timings = self._timings.get((enqueued_at, picked_at))
        if timings is None:  # jobs of one message share their stamps
            timings = self._timings[(enqueued_at, picked_at)] = b',"timings_ms":' + orjson.dumps(
                timings_ms(enqueued_at=enqueued_at, picked_at=picked_at, started=self.started,
                           finished=self.finished, stored=self.stored))
        parts += [b"},", self._middle, b"%d" % batch_size, timings, self._route(route), b"}",
                  self._tail, orjson.dumps(job_id), b"}"]
        return b"".join(parts)

    def _head(self, name: str, array: np.ndarray[Any, Any]) -> bytes:
        dtype = dtype_name(array.dtype)
        if dtype is None:  # what encode_tensor says of an output it cannot carry
            encode_tensor(array, text=True)
        head = orjson.dumps(name) + b':{"dtype":' + orjson.dumps(dtype) + b',"shape":'
        self._heads[(name, array.dtype)] = head
        return head

    def _route(self, route: str | None) -> bytes:
        part = self._routes.get(route)
        if part is None:
            part = self._routes[route] = (b"" if route is None
                                          else b',"route":' + orjson.dumps(route))
        return part


def failure_document(job_id: str, error: InferqError, model: str | None = None) -> bytes:
    """The JSON result document of a failed job (Celery FAILURE meta plus ``error``)."""
    exc = {
        "exc_type": type(error).__name__,
        "exc_module": type(error).__module__,
        "exc_message": [error.message],
    }
    detail = {"code": error.code, "type": type(error).__name__, "message": error.message}
    model = model if model is not None else getattr(error, "model", None)
    if model is not None:
        detail["model"] = model
    return orjson.dumps(_meta(job_id, "FAILURE", exc, None, error=detail))


def _ms(seconds: float) -> float:
    # Microsecond resolution; int() is cheaper than round() on this per-job path.
    return int(seconds * 1e6) / 1000.0 if seconds > 0 else 0.0


# --- reading (producers) -------------------------------------------------------------


@dataclass
class JobResult:
    """The outputs of one successful job and how it was served."""

    id: str
    outputs: dict[str, np.ndarray[Any, Any]]
    model: str
    version: int
    worker: str
    batch_size: int
    timings_ms: dict[str, float | None] = field(default_factory=dict)
    #: How the version was chosen: ``pinned``, ``alias:<name>``, ``split:<rev>``, ``latest``.
    route: str | None = None

    def __getitem__(self, name: str) -> np.ndarray[Any, Any]:
        return self.outputs[name]


#: Celery states that end a job; any other (STARTED, RETRY, ...) is still pending.
TERMINAL = frozenset({"SUCCESS", "FAILURE"})


def read_status(raw: bytes | str | None) -> str:
    """``PENDING``, ``SUCCESS`` or ``FAILURE`` from a stored document (None: no result yet)."""
    if raw is None:
        return "PENDING"
    state = orjson.loads(raw).get("status")
    return state if state in TERMINAL else "PENDING"


def read_result(job_id: str, raw: bytes | str) -> JobResult | JobFailed:
    """A stored result document as a :class:`JobResult`, or the typed error of its code."""
    doc = orjson.loads(raw)
    if doc.get("status") == "SUCCESS":
        res = doc["result"]
        return JobResult(
            id=job_id,
            outputs={k: decode_tensor(v, k) for k, v in res["outputs"].items()},
            model=res["model"],
            version=int(res["version"]),
            worker=res["worker"],
            batch_size=int(res["batch_size"]),
            timings_ms=dict(res.get("timings_ms") or {}),
            route=res.get("route"),
        )
    error = doc.get("error")
    if isinstance(error, dict):
        code, message, model = error.get("code"), error.get("message"), error.get("model")
        return error_for_code(code if isinstance(code, str) and code else "INTERNAL",
                              str(message) if message is not None else "",
                              job_id=job_id, model=model if isinstance(model, str) else None)
    # A result written by something other than an inferq worker (a plain Celery failure).
    exc = doc.get("result") or {}
    return error_for_code("INTERNAL", f"{exc.get('exc_type')}: {exc.get('exc_message')}",
                          job_id=job_id)
