"""Tensors over HTTP: KServe v2 style JSON and inferq's msgpack form, to arrays and back.

JSON (``application/json``)::

    {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64],
                 "data": [0.0, 1.0, ...]}],            # flat (or nested) row-major values
     "version": 2, "deadline_s": 5, "priority": 0}

``"parameters": {"binary": true}`` makes ``data`` the base64 text of the raw little-endian
bytes instead (no float formatting, a third the size). msgpack
(``application/x-msgpack``) carries the wire's own tensor form, raw bytes and all::

    {"inputs": {"pixels": {"dtype": "float32", "shape": [1, 64], "data": <bytes>}}, ...}

Every tensor is checked here (datatype allow-list, shape, element count, byte length)
before the producer checks it against the model's signature.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from producer import wire
from producer.errors import InvalidInput
from producer.jobs import JobResult

#: KServe v2 datatypes and the wire dtypes they carry (BYTES and BF16 are not carried).
DATATYPES: dict[str, str] = {
    "BOOL": "bool", "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32",
    "UINT64": "uint64", "INT8": "int8", "INT16": "int16", "INT32": "int32", "INT64": "int64",
    "FP16": "float16", "FP32": "float32", "FP64": "float64",
}
DTYPES_TO_DATATYPE = {v: k for k, v in DATATYPES.items()}
MSGPACK = "application/x-msgpack"
#: Most jobs one ``jobs:batch`` request may carry.
MAX_BATCH_JOBS = 10_000


def datatype(dtype: str) -> str:
    """The KServe datatype of a wire dtype name (``float32`` → ``FP32``)."""
    return DTYPES_TO_DATATYPE[dtype]


@dataclass
class JobInputs:
    """One job as an HTTP body describes it."""

    inputs: dict[str, np.ndarray[Any, Any]]
    #: A version number, "latest" or an alias name (resolved by the gateway), None: the
    #: model's route decides.
    version: int | str | None = None
    deadline_s: float | None = None
    priority: int = 0


def _shape(value: Any, name: str) -> list[int]:
    if (not isinstance(value, list) or len(value) > wire.MAX_RANK
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= wire.MAX_DIM
                       for d in value)):
        raise InvalidInput(f"input {name!r}: shape must be a list of at most {wire.MAX_RANK} "
                           "non-negative integers")
    return value


def json_tensor(obj: Any) -> tuple[str, np.ndarray[Any, Any]]:
    """One KServe v2 input (``name``, ``datatype``, ``shape``, ``data``) as an array."""
    if not isinstance(obj, Mapping):
        raise InvalidInput("each input must be an object with name, datatype, shape and data")
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidInput("each input needs a non-empty string 'name'")
    kind = obj.get("datatype")
    dtype = DATATYPES.get(kind) if isinstance(kind, str) else None
    if dtype is None:
        raise InvalidInput(f"input {name!r}: datatype {kind!r} is not one of "
                           f"{sorted(DATATYPES)}")
    shape = _shape(obj.get("shape"), name)
    data = obj.get("data")
    parameters = obj.get("parameters") or {}
    if not isinstance(parameters, Mapping):
        raise InvalidInput(f"input {name!r}: parameters must be an object")
    np_dtype = np.dtype(dtype).newbyteorder("<")
    count = math.prod(shape)
    if parameters.get("binary"):
        if not isinstance(data, str):
            raise InvalidInput(f"input {name!r}: with binary: true, data is the base64 text "
                               "of the raw little-endian bytes")
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidInput(f"input {name!r}: data is not valid base64") from None
        if len(raw) != count * np_dtype.itemsize:
            raise InvalidInput(f"input {name!r}: shape {shape} of {kind} needs "
                               f"{count * np_dtype.itemsize} bytes, got {len(raw)}")
        return name, np.frombuffer(raw, np_dtype).reshape(shape)
    if not isinstance(data, list):
        raise InvalidInput(f"input {name!r}: data must be a list of values (row-major), or "
                           "base64 text with parameters.binary = true")
    try:
        arr = np.asarray(data, dtype=np_dtype)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidInput(f"input {name!r}: data is not a list of {kind} values: "
                           f"{exc}") from None
    if arr.size != count:
        raise InvalidInput(f"input {name!r}: shape {shape} holds {count} values, data has "
                           f"{arr.size}")
    return name, arr.reshape(shape)


def _options(body: Mapping[str, Any]) -> tuple[int | str | None, float | None, int]:
    version = body.get("version")
    if isinstance(version, str):
        # A number ("2"), "latest", or an alias (inferq alias ...): the gateway resolves it.
        if not 0 < len(version) <= 128 or not version.isprintable():
            raise InvalidInput(f"version must be an integer, 'latest' or an alias, "
                               f"got {version!r}")
        version = int(version) if version.isdigit() else version
    elif version is not None and (not isinstance(version, int) or isinstance(version, bool)):
        raise InvalidInput(f"version must be an integer, 'latest', an alias or null, "
                           f"got {version!r}")
    deadline = body.get("deadline_s")
    if deadline is not None and (isinstance(deadline, bool)
                                 or not isinstance(deadline, int | float) or deadline <= 0):
        raise InvalidInput(f"deadline_s must be a positive number of seconds, got {deadline!r}")
    priority = body.get("priority", 0)
    if isinstance(priority, bool) or not isinstance(priority, int) or not 0 <= priority <= 9:
        raise InvalidInput(f"priority must be an integer from 0 (first) to 9 (last), "
                           f"got {priority!r}")
    return version, None if deadline is None else float(deadline), priority


def json_job(body: Any) -> JobInputs:
    """A KServe v2 style job body (``inputs`` a list of tensors) as arrays and options."""
    if not isinstance(body, Mapping):
        raise InvalidInput("the body must be a JSON object with 'inputs'")
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidInput("'inputs' must be a non-empty list of tensors")
    arrays: dict[str, np.ndarray[Any, Any]] = {}
    for tensor in inputs:
        name, arr = json_tensor(tensor)
        if name in arrays:
            raise InvalidInput(f"input {name!r} is given twice")
        arrays[name] = arr
    return JobInputs(arrays, *_options(body))


def msgpack_job(body: Any) -> JobInputs:
    """A msgpack job body (``inputs`` a map of wire tensors) as arrays and options."""
    if not isinstance(body, Mapping):
        raise InvalidInput("the msgpack body must be a map with 'inputs'")
    inputs = body.get("inputs")
    if not isinstance(inputs, Mapping) or not inputs:
        raise InvalidInput("'inputs' must be a non-empty map of name to "
                           "{dtype, shape, data}")
    arrays = {}
    for name, tensor in inputs.items():
        if not isinstance(name, str):
            raise InvalidInput("input names must be strings")
        arrays[name] = wire.decode_tensor(tensor, f"input {name!r}")
    return JobInputs(arrays, *_options(body))


def unpack(raw: bytes) -> Any:
    """A msgpack body; containers are bounded by its length (no small-message bombs)."""
    try:
        return msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise InvalidInput(f"the body is not valid msgpack: {exc}") from None


def job(body: Any, content_type: str) -> JobInputs:
    """One job from a decoded body of ``content_type`` (JSON or msgpack)."""
    return msgpack_job(body) if content_type == MSGPACK else json_job(body)


def batch(body: Any, content_type: str) -> tuple[list[dict[str, np.ndarray[Any, Any]]],
                                                 JobInputs]:
    """A ``jobs:batch`` body: ``{"jobs": [{"inputs": ...}, ...], "version", "deadline_s",
    "priority"}`` (options shared by every job) as each job's arrays, and the options."""
    if not isinstance(body, Mapping):
        raise InvalidInput("the body must be an object with 'jobs'")
    jobs = body.get("jobs")
    if not isinstance(jobs, list) or not jobs:
        raise InvalidInput("'jobs' must be a non-empty list of {\"inputs\": ...}")
    if len(jobs) > MAX_BATCH_JOBS:
        raise InvalidInput(f"at most {MAX_BATCH_JOBS} jobs per request, got {len(jobs)}")
    arrays = [job(j, content_type).inputs for j in jobs]
    return arrays, JobInputs({}, *_options(body))


# --- outputs ---------------------------------------------------------------------------


def json_outputs(result: JobResult) -> list[dict[str, Any]]:
    """A result's outputs as KServe v2 output tensors (flat row-major ``data``)."""
    out = []
    for name, arr in result.outputs.items():
        kind = wire.dtype_name(arr.dtype)
        assert kind is not None  # decoded from the wire: always a carried dtype
        out.append({"name": name, "datatype": datatype(kind), "shape": list(arr.shape),
                    "data": arr.reshape(-1).tolist()})
    return out


def msgpack_outputs(result: JobResult) -> dict[str, Any]:
    """A result's outputs in the wire's tensor form (raw little-endian bytes)."""
    return {name: wire.encode_tensor(arr) for name, arr in result.outputs.items()}


def pack(doc: Any) -> bytes:
    """A response body as msgpack."""
    return msgpack.packb(doc, use_bin_type=True)  # type: ignore[no-any-return]


def example(spec: wire.TensorSpec, rows: int = 1) -> dict[str, Any]:
    """A KServe v2 input of zeros fitting ``spec`` (free dimensions: ``rows`` on the batch
    axis, 1 elsewhere), for the API docs."""
    shape = [rows if i == 0 and d == -1 else (1 if d == -1 else d)
             for i, d in enumerate(spec.shape)]
    zero: Any = False if spec.dtype == "bool" else (0.0 if "float" in spec.dtype else 0)
    return {"name": spec.name, "datatype": datatype(spec.dtype), "shape": shape,
            "data": [zero] * math.prod(shape)}
