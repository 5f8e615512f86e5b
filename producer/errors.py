"""Typed errors shared by producers and workers.

Every error has a stable ``code`` that crosses the wire inside a FAILURE result and is
re-raised on the reading side as :class:`JobFailed`.
"""

from __future__ import annotations

__all__ = [
    "CODES",
    "DeadlineExceeded",
    "InferqError",
    "InternalError",
    "InvalidInput",
    "JobFailed",
    "JobTimeout",
    "ModelNotFound",
    "Poisoned",
    "ResourceExhausted",
    "Unavailable",
    "error_for_code",
]


class InferqError(Exception):
    """Root of every inferq error; ``code`` is the stable wire code."""

    code = "INTERNAL"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class InvalidInput(InferqError):
    """The job's inputs do not match the model's signature or cannot be decoded."""

    code = "INVALID_ARGUMENT"


class ModelNotFound(InferqError):
    """The model, or the pinned version of it, is not served."""

    code = "NOT_FOUND"


class DeadlineExceeded(InferqError):
    """The job's deadline passed before it could run."""

    code = "DEADLINE_EXCEEDED"


class ResourceExhausted(InferqError):
    """A queue or memory limit refused the job."""

    code = "RESOURCE_EXHAUSTED"


class Unavailable(InferqError):
    """Redis or the workers could not be reached in time."""

    code = "UNAVAILABLE"


class Poisoned(InferqError):
    """The job crashed its worker too many times and was dead-lettered."""

    code = "POISONED"


class InternalError(InferqError):
    """An unexpected failure inside the worker."""

    code = "INTERNAL"


class JobFailed(InferqError):
    """A job ended in FAILURE; ``code`` and ``message`` come from the worker."""

    def __init__(self, job_id: str, code: str, message: str) -> None:
        super().__init__(message)
        self.job_id = job_id
        self.code = code

    def __str__(self) -> str:
        return f"job {self.job_id} failed: {self.code}: {self.message}"


class JobTimeout(InferqError):
    """Waiting for a result took longer than the caller's timeout."""

    code = "DEADLINE_EXCEEDED"


_BY_CODE: dict[str, type[InferqError]] = {
    cls.code: cls
    for cls in (
        InvalidInput,
        ModelNotFound,
        DeadlineExceeded,
        ResourceExhausted,
        Unavailable,
        Poisoned,
        InternalError,
    )
}

#: Every code a FAILURE result may carry.
CODES: frozenset[str] = frozenset(_BY_CODE)


def error_for_code(code: str, message: str) -> InferqError:
    """Build the error class that owns ``code`` (INTERNAL for unknown codes)."""
    return _BY_CODE.get(code, InternalError)(message)
