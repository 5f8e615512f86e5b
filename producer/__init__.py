"""inferq producer: submit ONNX inference jobs to Redis and read their results.

Importing this package never imports the workers or onnxruntime; the asyncio client
(``AsyncInferenceClient``, ``AsyncJobHandle``) is imported on first use.
"""

from typing import TYPE_CHECKING, Any

from producer.client import InferenceClient, ModelInfo
from producer.errors import (
    DeadlineExceeded,
    InferqError,
    InternalError,
    InvalidInput,
    JobFailed,
    JobTimeout,
    ModelNotFound,
    Poisoned,
    ResourceExhausted,
    Unavailable,
    UnknownJob,
)
from producer.jobs import JobHandle, JobResult, JobStatus

if TYPE_CHECKING:
    from producer.aio import AsyncInferenceClient, AsyncJobHandle

_LAZY = ("AsyncInferenceClient", "AsyncJobHandle")

__all__ = [
    "AsyncInferenceClient",
    "AsyncJobHandle",
    "DeadlineExceeded",
    "InferenceClient",
    "InferqError",
    "InternalError",
    "InvalidInput",
    "JobFailed",
    "JobHandle",
    "JobResult",
    "JobStatus",
    "JobTimeout",
    "ModelInfo",
    "ModelNotFound",
    "Poisoned",
    "ResourceExhausted",
    "Unavailable",
    "UnknownJob",
]


def __getattr__(name: str) -> Any:
    # The asyncio client only when asked for: ``import producer`` stays as light as the
    # sync client needs.
    if name in _LAZY:
        from producer import aio

        return getattr(aio, name)
    raise AttributeError(f"module 'producer' has no attribute {name!r}")
