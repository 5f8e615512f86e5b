"""Typed errors shared by producers and workers.

Every error that can end a job has a stable ``code`` that crosses the wire inside a FAILURE
result, and is raised again by type on the reading side: ``except Poisoned:`` catches a
poisoned job, ``except JobFailed:`` catches every failed job. The same classes refuse a job
at submit (``InvalidInput``, ``ModelNotFound``, ``ResourceExhausted``, ``Unavailable``),
before it has a result. :class:`JobTimeout` is not a failure of the job: the caller stopped
waiting for it.
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
    "UnknownJob",
    "error_for_code",
]


class InferqError(Exception):
    """Root of every inferq error; ``code`` names the condition."""

    code = "INTERNAL"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class JobFailed(InferqError):
    """A job ended in FAILURE, or was refused at submit; ``code`` is its wire code.

    ``job_id`` and ``model`` say which job, when it had been accepted (None for a job
    refused at submit).
    """

    def __init__(self, message: str, *, job_id: str | None = None, model: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.job_id = job_id
        self.model = model
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        if self.job_id is None:
            return f"{self.code}: {self.message}"
        return f"job {self.job_id} failed: {self.code}: {self.message}"


class InvalidInput(JobFailed):
    """The job's inputs do not match the model's signature or cannot be decoded."""

    code = "INVALID_ARGUMENT"


class ModelNotFound(JobFailed):
    """The model, or the pinned version of it, is not served."""

    code = "NOT_FOUND"


class DeadlineExceeded(JobFailed):
    """The job's own deadline passed before it could run."""

    code = "DEADLINE_EXCEEDED"


class ResourceExhausted(JobFailed):
    """A queue or memory limit refused the job."""

    code = "RESOURCE_EXHAUSTED"


class Unavailable(JobFailed):
    """Redis or the workers could not be reached in time."""

    code = "UNAVAILABLE"


class Poisoned(JobFailed):
    """The job crashed its worker too many times and was dead-lettered."""

    code = "POISONED"


class InternalError(JobFailed):
    """An unexpected failure inside the worker, or the model failed on the job."""

    code = "INTERNAL"


class UnknownJob(JobFailed):
    """No result and no record of the job being accepted: never submitted (a wrong ID),
    expired, or sent by a client that records no acceptance (plain Celery)."""

    code = "NOT_FOUND"


class JobTimeout(InferqError):
    """The caller's timeout passed while the jobs in ``job_ids`` had no result yet.

    The jobs are not failed: they may still finish, and their results can be read later.
    """

    code = "WAIT_TIMEOUT"

    def __init__(self, message: str, job_ids: list[str] | None = None) -> None:
        super().__init__(message)
        self.job_ids = list(job_ids or [])


_BY_CODE: dict[str, type[JobFailed]] = {
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


def error_for_code(code: str, message: str, *, job_id: str | None = None,
                   model: str | None = None) -> JobFailed:
    """The error of the class that owns ``code``; an unknown code keeps its text on a plain
    :class:`JobFailed`."""
    cls = _BY_CODE.get(code)
    if cls is None:
        return JobFailed(message, job_id=job_id, model=model, code=code)
    return cls(message, job_id=job_id, model=model)
