"""Checking one decoded job against the model it asks for, before it may join a batch.

Pure functions: a job that fails here fails alone, with a typed error for that job only.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np

from producer import wire
from producer.errors import DeadlineExceeded, InvalidInput, ModelNotFound
from producer.wire import JobRequest, TensorSpec
from workers.serving.batching import Arrays


def resolve_version(job: JobRequest, model: str, versions: Collection[int],
                    routed: int | None = None) -> int:
    """The version that serves ``job``: its pin, else ``routed`` (the model's route chose
    it), else the latest; NOT_FOUND otherwise."""
    if job.model != model:
        raise ModelNotFound(f"job for model {job.model!r} arrived on the queue of {model!r}")
    version = job.version if job.version is not None else (
        routed if routed is not None else max(versions))
    if version not in versions:
        raise ModelNotFound(f"model {model!r} has no version {version}; served: "
                            f"{sorted(versions)}")
    return version


def check_deadline(job: JobRequest, picked_at: float) -> None:
    """DEADLINE_EXCEEDED for a job picked up after its deadline: it never reaches the model."""
    if job.deadline is not None and picked_at > job.deadline:
        raise DeadlineExceeded(
            f"deadline passed {picked_at - job.deadline:.3f}s before the job was picked up")


def decode_inputs(
    inputs: Any,
    specs: Sequence[TensorSpec],
    blobs: Mapping[str, bytes | None],
    *,
    max_tensor_bytes: int,
    reject_nonfinite: bool,
) -> tuple[Arrays, int]:
    """Decode and check a job's tensors; return them and the job's row count."""
    if not isinstance(inputs, Mapping):
        raise InvalidInput("inputs must map input names to tensors")
    arrays: Arrays = {}
    for name, tensor in inputs.items():
        if isinstance(tensor, Mapping) and "ref" in tensor:
            tensor = wire.dereference(tensor, f"input {str(name)!r}", blobs)
        arr = wire.decode_tensor(tensor, f"input {name!r}")
        if arr.nbytes > max_tensor_bytes:
            raise InvalidInput(
                f"input {name!r} is {arr.nbytes} bytes; the limit is {max_tensor_bytes}")
        if reject_nonfinite and arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise InvalidInput(
                f"input {name!r} contains NaN or Inf (refused: INFERQ_NONFINITE=reject)")
        arrays[str(name)] = arr
    return arrays, wire.check_inputs(specs, arrays)


def decode_uniform(
    jobs_inputs: Sequence[Any],
    specs: Sequence[TensorSpec],
    *,
    max_tensor_bytes: int,
    reject_nonfinite: bool,
) -> list[tuple[Arrays, int]] | None:
    """Decode and check the jobs of one message at once when they are alike, the usual
    bulk message: every job's tensors inline as bytes, with one dtype and shape per input.

    Each input of all the jobs becomes one array (one ``frombuffer``, one NaN check, one
    signature check) and each job gets its rows as a view of it. None when the jobs are not
    alike or one of them fails a check: then each is decoded alone (:func:`decode_inputs`),
    so a bad job still fails by itself with its own error.
    """
    first = jobs_inputs[0]
    if not isinstance(first, Mapping) or len(first) != len(specs):
        return None
    stacked: dict[str, np.ndarray[Any, Any]] = {}
    for spec in specs:
        head = first.get(spec.name)
        if not isinstance(head, Mapping) or not isinstance(head.get("data"), bytes):
            return None
        dtype, shape = head.get("dtype"), head.get("shape")
        datas = []
        for inputs in jobs_inputs:
            tensor = inputs.get(spec.name) if isinstance(inputs, Mapping) else None
            if (not isinstance(tensor, Mapping) or len(inputs) != len(specs)
                    or tensor.get("dtype") != dtype or tensor.get("shape") != shape
                    or not isinstance(data := tensor.get("data"), bytes)
                    or len(data) != len(head["data"])):
                return None
            datas.append(data)
        try:
            one = wire.decode_tensor(head, f"input {spec.name!r}")
        except InvalidInput:
            return None
        if one.nbytes > max_tensor_bytes:
            return None
        arr = np.frombuffer(b"".join(datas), dtype=one.dtype).reshape(
            (len(datas), *one.shape))
        if reject_nonfinite and arr.dtype.kind == "f" and not np.isfinite(arr).all():
            return None
        stacked[spec.name] = arr
    try:
        rows = wire.check_inputs(specs, {n: a[0] for n, a in stacked.items()})
    except InvalidInput:
        return None
    return [({n: a[i] for n, a in stacked.items()}, rows) for i in range(len(jobs_inputs))]


def decode_columns(
    columns: Mapping[str, np.ndarray[Any, Any]],
    rows: Sequence[int],
    specs: Sequence[TensorSpec],
    *,
    max_tensor_bytes: int,
    reject_nonfinite: bool,
) -> list[tuple[Arrays, int] | InvalidInput]:
    """Check a bulk message sent as columns (every job alike: one array per input, jobs
    along its first axis) and cut out the jobs at ``rows`` of it: each its inputs (views)
    and its row count, or the error that fails it alone.

    The size and signature checks hold for every job once they hold for one; the NaN check
    runs once over the whole array and names the jobs it fails.
    """
    try:
        for name, arr in columns.items():
            size = arr[0].nbytes if len(arr) else 0
            if size > max_tensor_bytes:
                raise InvalidInput(
                    f"input {name!r} is {size} bytes; the limit is {max_tensor_bytes}")
        job_rows = wire.check_inputs(specs, {n: a[0] for n, a in columns.items()})
    except InvalidInput as exc:
        return [exc] * len(rows)
    refused: dict[int, InvalidInput] = {}
    if reject_nonfinite:
        for name, arr in columns.items():
            if arr.dtype.kind != "f":
                continue
            finite = np.isfinite(arr.reshape(len(arr), arr[0].size)).all(axis=1)
            if not finite.all():
                error = InvalidInput(f"input {name!r} contains NaN or Inf (refused: "
                                     "INFERQ_NONFINITE=reject)")
                for row in np.flatnonzero(~finite).tolist():
                    refused.setdefault(row, error)
    items = list(columns.items())
    return [refused[r] if r in refused else ({n: a[r] for n, a in items}, job_rows)
            for r in rows]
