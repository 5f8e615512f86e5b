"""inferq producer: submit ONNX inference jobs to Redis and read their results.

Importing this package never imports the workers or onnxruntime.
"""

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

__all__ = [
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
