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
