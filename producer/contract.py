"""The wire contract between producers, Redis and workers.

Everything another language needs to talk to inferq is here: task and queue names, the
tensor encoding, the Celery message envelope as the kombu Redis transport stores it, the
result document and the Redis keys. Both sides import this module; nothing else defines a
name that crosses the wire.
"""

from __future__ import annotations

import base64
import json
import math
import os
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import msgpack
import numpy as np
import orjson

from producer.errors import InferqError, InvalidInput

#: Celery task name of a job: ``args=[model, inputs]``, ``kwargs={"version": int | None}``.
TASK_NAME = "inferq.infer"
#: Celery task name of a bulk message: ``args=[model, [job, ...]]``; each job keeps its own ID.
BULK_TASK_NAME = "inferq.infer_many"
#: Celery's Redis result backend key of a job's result document.
RESULT_KEY_PREFIX = "celery-task-meta-"
#: Hash of model name -> JSON signature, written by workers once a model is loaded and warm.
MODELS_KEY = "inferq:models"
#: Per-worker liveness key prefix (``inferq:worker:<hostname>``), refreshed while consuming.
WORKER_KEY_PREFIX = "inferq:worker:"
#: List a worker pushes finished job IDs to, so an inferq producer waits without polling.
NOTIFY_KEY_PREFIX = "inferq:notify:"
#: Prefix of the Redis keys holding large tensors sent by reference (``{"ref": key}``).
BLOB_KEY_PREFIX = "inferq:blob:"
#: Header stamps set by inferq producers (optional for other clients).
HEADER_ENQUEUED_AT = "inferq_enqueued_at"
HEADER_NOTIFY = "inferq_notify"
HEADER_JOB_IDS = "inferq_job_ids"

CONTENT_TYPES = {"msgpack": "application/x-msgpack", "json": "application/json"}
#: Numeric dtypes a tensor may carry; anything else (object, structured, strings) is refused.
DTYPES = frozenset(
    ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
     "float16", "float32", "float64"]
)
MAX_RANK = 8
# numpy's dtype.name is computed in Python on every access; a dict lookup is not.
_NAMES = {np.dtype(n): n for n in DTYPES} | {np.dtype(n).newbyteorder(">"): n for n in DTYPES}


def dtype_name(dtype: np.dtype[Any]) -> str | None:
    """The contract name of a numpy dtype, or None when the contract does not carry it."""
    return _NAMES.get(dtype)


def new_id() -> str:
    """A random job ID in UUID text form (faster than uuid.uuid4 in bulk)."""
    h = os.urandom(16).hex()
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{h[16:20]}-{h[20:]}"
#: Largest single dimension accepted; anything bigger cannot be a real tensor.
MAX_DIM = 2**31

Tensor = dict[str, Any]


def queue_name(model: str) -> str:
    """Redis list (Celery queue) that carries the jobs of ``model``."""
    return f"inferq.{model}"


def result_key(job_id: str) -> str:
    """Redis key of a job's result document."""
    return RESULT_KEY_PREFIX + job_id


def blob_key(job_id: str, input_name: str) -> str:
    """Redis key of a tensor's raw bytes when a job sends it by reference."""
    return f"{BLOB_KEY_PREFIX}{job_id}:{input_name}"


def tensor_ref(array: np.ndarray[Any, Any], key: str) -> Tensor:
    """A tensor sent by reference: dtype and shape inline, the raw bytes under ``key``."""
    return {"dtype": dtype_name(array.dtype), "shape": list(array.shape), "ref": key}


def tensor_buffer(array: np.ndarray[Any, Any]) -> bytes | memoryview:
    """The contract's raw bytes of ``array``, without a copy when it is already laid out so."""
    if array.dtype.byteorder != ">" and array.flags.c_contiguous:
        return array.data.cast("B")
    return tensor_bytes(array)


def tensor_bytes(array: np.ndarray[Any, Any]) -> bytes:
    """The raw little-endian bytes the contract carries for ``array``."""
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return array.tobytes()  # C order, whatever the array's layout


# --- tensors -------------------------------------------------------------------------


def encode_tensor(array: np.ndarray[Any, Any], *, text: bool = False) -> Tensor:
    """Encode an array as ``{"dtype", "shape", "data"}``; ``text`` base64-encodes ``data``."""
    name = dtype_name(array.dtype)
    if name is None:
        raise InvalidInput(f"dtype {array.dtype} is not supported; use one of {sorted(DTYPES)}")
    data = tensor_bytes(array)
    return {
        "dtype": name,
        "shape": list(array.shape),
        "data": base64.b64encode(data).decode("ascii") if text else data,
    }


def _tensor_bytes(data: Any) -> bytes:
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    if isinstance(data, str):
        return base64.b64decode(data, validate=True)
    # kombu's JSON encoder writes bytes as {"__type__": "bytes", "__value__": <utf-8 text>}
    # when they decode as UTF-8, else as {"__type__": "base64", ...}.
    if isinstance(data, Mapping) and isinstance(data.get("__value__"), str):
        if data.get("__type__") == "bytes":
            return str(data["__value__"]).encode("utf-8")
        if data.get("__type__") == "base64":
            return base64.b64decode(data["__value__"], validate=True)
    raise InvalidInput("data must be bytes or a base64 string")


def decode_tensor(obj: Any, name: str = "tensor") -> np.ndarray[Any, Any]:
    """Decode ``{"dtype", "shape", "data"}`` into a read-only array, checking every field."""
    if not isinstance(obj, Mapping):
        raise InvalidInput(f"{name}: expected a mapping with dtype, shape and data")
    dtype, shape = obj.get("dtype"), obj.get("shape")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise InvalidInput(f"{name}: dtype {dtype!r} is not one of {sorted(DTYPES)}")
    if (
        not isinstance(shape, (list, tuple))
        or len(shape) > MAX_RANK
        or not all(
            isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_DIM for d in shape
        )
    ):
        raise InvalidInput(
            f"{name}: shape must be a list of at most {MAX_RANK} ints in [0, {MAX_DIM}]"
        )
    try:
        data = _tensor_bytes(obj.get("data"))
    except ValueError as exc:
        raise InvalidInput(f"{name}: data is not valid base64") from exc
    except InvalidInput as exc:
        raise InvalidInput(f"{name}: {exc.message}") from None
    np_dtype = np.dtype(dtype).newbyteorder("<")
    expected = math.prod(shape) * np_dtype.itemsize
    if len(data) != expected:
        raise InvalidInput(
            f"{name}: shape {list(shape)} of {dtype} needs {expected} bytes, got {len(data)}"
        )
    try:
        return np.frombuffer(data, dtype=np_dtype).reshape(shape)
    except ValueError as exc:
        raise InvalidInput(f"{name}: shape {list(shape)} is not usable: {exc}") from None


# --- signatures ------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype and shape of a model input or output; -1 marks a free dimension."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> TensorSpec:
        shape = obj["shape"]
        if not isinstance(shape, (list, tuple)) or not all(
            isinstance(d, int) and not isinstance(d, bool) for d in shape
        ):
            raise ValueError(f"shape must be a list of integers, got {shape!r}")
        return cls(str(obj["name"]), str(obj["dtype"]), tuple(shape))


def check_inputs(
    specs: Sequence[TensorSpec], inputs: Mapping[str, np.ndarray[Any, Any]]
) -> int:
    """Check ``inputs`` against ``specs``; return the job's row count (batch axis length)."""
    names = {s.name for s in specs}
    missing = sorted(names - inputs.keys())
    extra = sorted(inputs.keys() - names)
    if missing or extra:
        raise InvalidInput(
            f"inputs {sorted(inputs)} do not match the model's {sorted(names)}"
            + (f"; missing {missing}" if missing else "")
            + (f"; unknown {extra}" if extra else "")
        )
    rows: int | None = None
    for spec in specs:
        arr = inputs[spec.name]
        if dtype_name(arr.dtype) != spec.dtype:
            raise InvalidInput(f"input '{spec.name}': expected {spec.dtype}, got {arr.dtype}")
        if arr.ndim != len(spec.shape):
            raise InvalidInput(
                f"input '{spec.name}': expected rank {len(spec.shape)} {list(spec.shape)}, "
                f"got shape {list(arr.shape)}"
            )
        for axis, (want, got) in enumerate(zip(spec.shape, arr.shape, strict=True)):
            if want != -1 and want != got:
                raise InvalidInput(
                    f"input '{spec.name}': dimension {axis} must be {want}, got {got} "
                    f"(shape {list(arr.shape)}, expected {list(spec.shape)})"
                )
        if spec.shape and spec.shape[0] == -1:
            if arr.shape[0] == 0:
                raise InvalidInput(f"input '{spec.name}': empty batch (0 rows)")
            if rows is not None and arr.shape[0] != rows:
                raise InvalidInput("inputs disagree on the number of rows (batch axis)")
            rows = arr.shape[0]
    return rows or 1


# --- messages --------------------------------------------------------------------------

_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def pack_body(payload: Any, serializer: str) -> bytes:
    """Serialize a protocol-2 body with ``serializer`` ("msgpack" or "json")."""
    if serializer == "msgpack":
        return msgpack.packb(payload, use_bin_type=True)  # type: ignore[no-any-return]
    return json.dumps(payload, separators=(",", ":")).encode()


def build_message(
    *,
    task: str,
    task_id: str,
    args: list[Any],
    kwargs: dict[str, Any],
    queue: str,
    serializer: str = "msgpack",
    headers: Mapping[str, Any] | None = None,
    reply_to: str = "",
    expires: datetime | None = None,
    argsrepr: str = "",
) -> bytes:
    """Build a Celery protocol-2 message exactly as kombu's Redis transport stores it."""
    body = pack_body([args, kwargs, _EMBED], serializer)
    envelope = {
        "body": base64.b64encode(body).decode("ascii"),
        "content-encoding": "binary" if serializer == "msgpack" else "utf-8",
        "content-type": CONTENT_TYPES[serializer],
        "headers": {
            "lang": "py",
            "task": task,
            "id": task_id,
            "root_id": task_id,
            "parent_id": None,
            "group": None,
            "retries": 0,
            "eta": None,
            "expires": expires.isoformat() if expires else None,
            "timelimit": [None, None],
            "argsrepr": argsrepr,
            "kwargsrepr": repr(kwargs),
            **(headers or {}),
        },
        "properties": {
            "correlation_id": task_id,
            "reply_to": reply_to,
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }
    return json.dumps(envelope, separators=(",", ":")).encode()


@dataclass
class JobRequest:
    """One job as a worker sees it after decoding (inputs not yet checked)."""

    id: str
    model: str
    version: int | None
    inputs: Any
    enqueued_at: float | None = None
    deadline: float | None = None


@dataclass
class Delivery:
    """One Redis message: the jobs it carries and the jobs that failed to decode."""

    queue: str
    jobs: list[JobRequest] = field(default_factory=list)
    failed: list[tuple[str, InferqError]] = field(default_factory=list)
    notify: str | None = None
    redelivered: bool = False
    #: Blob key holding a bulk message's entries (msgpack); see :func:`attach_entries`.
    entries_ref: str | None = None
    ids: list[str] = field(default_factory=list)
    model: Any = None
    deadline: float | None = None
    enqueued_at: Any = None


def _loads_body(body: bytes, content_type: str) -> Any:
    if content_type == CONTENT_TYPES["msgpack"]:
        # Limits default to the buffer length, so a small message cannot claim huge containers.
        return msgpack.unpackb(body, raw=False, strict_map_key=True)
    if content_type == CONTENT_TYPES["json"]:
        return json.loads(body)
    raise InvalidInput(f"content type {content_type!r} is refused; send msgpack or json")


def _parse_time(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    moment = datetime.fromisoformat(str(value))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def _job(job_id: Any, model: Any, inputs: Any, version: Any) -> JobRequest:
    if not isinstance(job_id, str) or not job_id:
        raise InvalidInput("job id must be a non-empty string")
    if not isinstance(model, str):
        raise InvalidInput("model name must be a string")
    if version is not None and (not isinstance(version, int) or isinstance(version, bool)):
        raise InvalidInput(f"version must be an integer or null, got {version!r}")
    return JobRequest(id=job_id, model=model, version=version, inputs=inputs)


def parse_message(raw: bytes | str, queue: str) -> Delivery:
    """Decode a stored message into jobs; a job that cannot be decoded fails on its own.

    Raises :class:`InvalidInput` only when not even a job ID can be recovered.
    """
    try:
        envelope = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise InvalidInput(f"message is not a JSON envelope: {exc}") from None
    if not isinstance(envelope, dict):
        raise InvalidInput("message envelope must be a JSON object")
    headers = envelope.get("headers") or {}
    props = envelope.get("properties") or {}
    if not isinstance(headers, dict) or not isinstance(props, dict):
        raise InvalidInput("message headers and properties must be objects")
    task, msg_id = headers.get("task"), headers.get("id")
    ids = headers.get(HEADER_JOB_IDS) if task == BULK_TASK_NAME else [msg_id]
    if not isinstance(ids, list) or not all(isinstance(i, str) and i for i in ids):
        raise InvalidInput("message carries no usable job id")
    notify = headers.get(HEADER_NOTIFY)
    delivery = Delivery(
        queue=queue,
        notify=notify if isinstance(notify, str) and notify else None,
        redelivered=bool(headers.get("redelivered") or props.get("redelivered")),
        ids=ids,
        enqueued_at=headers.get(HEADER_ENQUEUED_AT),
    )
    try:
        delivery.deadline = _parse_time(headers.get("expires"))
        if task not in (TASK_NAME, BULK_TASK_NAME):
            raise InvalidInput(f"unknown task {task!r}; expected {TASK_NAME!r}")
        body: Any = envelope.get("body", b"")
        if props.get("body_encoding") == "base64":
            body = base64.b64decode(body)
        elif isinstance(body, str):
            body = body.encode()
        decoded = _loads_body(body, envelope.get("content-type", ""))
        if not isinstance(decoded, (list, tuple)) or len(decoded) < 2:
            raise InvalidInput("body must be a Celery protocol-2 [args, kwargs, embed] list")
        args, kwargs = decoded[0], decoded[1] or {}
        if not isinstance(args, (list, tuple)) or len(args) != 2 or not isinstance(kwargs, dict):
            raise InvalidInput("args must be [model, inputs] and kwargs a mapping")
    except (InvalidInput, ValueError, TypeError, RecursionError, msgpack.UnpackException) as exc:
        err = exc if isinstance(exc, InvalidInput) else InvalidInput(f"undecodable message: {exc}")
        delivery.failed = [(i, err) for i in ids]
        return delivery
    delivery.model = args[0]
    if task == TASK_NAME:
        _add_jobs(delivery, [{"id": msg_id, "inputs": args[1], "version": kwargs.get("version")}])
    elif isinstance(args[1], dict) and "ref" in args[1]:
        ref = args[1]["ref"]
        if isinstance(ref, str) and ref.startswith(BLOB_KEY_PREFIX):
            delivery.entries_ref = ref
        else:
            delivery.failed = [(i, InvalidInput(f"entries ref must be under {BLOB_KEY_PREFIX!r}"))
                               for i in ids]
    else:
        _add_jobs(delivery, args[1])
    return delivery


def attach_entries(delivery: Delivery, blob: bytes | None) -> None:
    """Decode the entries of a bulk message whose body travelled by reference."""
    try:
        if blob is None:
            raise InvalidInput(f"bulk entries under {delivery.entries_ref!r} are gone "
                               "(expired or never written)")
        entries = msgpack.unpackb(blob, raw=False, strict_map_key=True)
    except (InvalidInput, ValueError, TypeError, RecursionError, msgpack.UnpackException) as exc:
        err = exc if isinstance(exc, InvalidInput) else InvalidInput(f"undecodable entries: {exc}")
        delivery.failed = [(i, err) for i in delivery.ids]
        return
    _add_jobs(delivery, entries)


def _add_jobs(delivery: Delivery, entries: Any) -> None:
    ids = delivery.ids
    if not isinstance(entries, list) or len(entries) != len(ids):
        delivery.failed = [(i, InvalidInput("bulk message body does not match its job ids"))
                           for i in ids]
        return
    for job_id, entry in zip(ids, entries, strict=True):
        try:
            if not isinstance(entry, dict) or entry.get("id") != job_id:
                raise InvalidInput("bulk entry does not match its job id")
            job = _job(job_id, delivery.model, entry.get("inputs"), entry.get("version"))
            job.enqueued_at = _parse_time(entry.get("enqueued_at", delivery.enqueued_at))
            job.deadline = delivery.deadline
            delivery.jobs.append(job)
        except (InvalidInput, ValueError, TypeError) as exc:
            err = exc if isinstance(exc, InvalidInput) else InvalidInput(str(exc))
            delivery.failed.append((job_id, err))


# --- results ---------------------------------------------------------------------------


def _meta(job_id: str, status: str, result: Any, **extra: Any) -> dict[str, Any]:
    return {
        "status": status,
        "result": result,
        "traceback": None,
        "children": [],
        "date_done": datetime.now(timezone.utc).isoformat(),
        "task_id": job_id,
        **extra,
    }


def success_document(job_id: str, result: Mapping[str, Any], date_done: str | None = None
                     ) -> bytes:
    """The JSON result document of a successful job (Celery SUCCESS meta)."""
    meta = _meta(job_id, "SUCCESS", result)
    if date_done is not None:
        meta["date_done"] = date_done
    # orjson: this runs once per job on the worker's hot path, several times faster than json.
    return orjson.dumps(meta)


def failure_document(job_id: str, error: InferqError) -> bytes:
    """The JSON result document of a failed job (Celery FAILURE meta plus ``error``)."""
    exc = {
        "exc_type": type(error).__name__,
        "exc_module": type(error).__module__,
        "exc_message": [error.message],
    }
    detail = {"code": error.code, "type": type(error).__name__, "message": error.message}
    return orjson.dumps(_meta(job_id, "FAILURE", exc, error=detail))


def now() -> float:
    """Wall-clock seconds since the epoch; the clock every timing stamp uses."""
    return time.time()
