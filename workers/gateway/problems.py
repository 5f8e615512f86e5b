"""Errors as RFC 9457 problem details (``application/problem+json``) with inferq's codes.

Every error the gateway answers carries the stable ``code`` a Python caller would catch by
class (``INVALID_ARGUMENT`` … ``POISONED``), plus the gateway's own: ``UNAUTHENTICATED``
(401), ``PERMISSION_DENIED`` (403), ``ABORTED`` (409: an idempotent request still in
flight) and ``WAIT_TIMEOUT`` (504: the caller's wait passed, the job may still finish).
"""

from __future__ import annotations

from typing import Any

from producer.errors import InferqError, JobFailed, UnknownJob

PROBLEM_JSON = "application/problem+json"

#: HTTP status of each code.
STATUS: dict[str, int] = {
    "INVALID_ARGUMENT": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "ABORTED": 409,
    "RESOURCE_EXHAUSTED": 429,
    "INTERNAL": 500,
    "POISONED": 500,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
    "WAIT_TIMEOUT": 504,
}
TITLES: dict[str, str] = {
    "INVALID_ARGUMENT": "Invalid argument",
    "UNAUTHENTICATED": "Missing or invalid API key",
    "PERMISSION_DENIED": "Not allowed for this API key",
    "NOT_FOUND": "Not found",
    "ABORTED": "A request with this Idempotency-Key is still in progress",
    "RESOURCE_EXHAUSTED": "Resource exhausted",
    "INTERNAL": "Internal error",
    "POISONED": "The job crashed its worker too often",
    "UNAVAILABLE": "Unavailable",
    "DEADLINE_EXCEEDED": "The job's deadline passed before it ran",
    "WAIT_TIMEOUT": "No result within the wait",
}
#: Seconds a client is told to wait before retrying a refusal that may pass.
RETRY_AFTER_S = 1


class Problem(Exception):
    """An HTTP error answer: ``status``, a stable ``code`` and what to do (``detail``)."""

    def __init__(self, code: str, detail: str, *, status: int | None = None,
                 headers: dict[str, str] | None = None, **extra: Any) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.status = status if status is not None else STATUS.get(code, 500)
        self.headers = dict(headers or {})
        self.extra = {k: v for k, v in extra.items() if v is not None}
        if self.status in (429, 503) and "Retry-After" not in self.headers:
            self.headers["Retry-After"] = str(RETRY_AFTER_S)
        if self.status == 401:
            self.headers.setdefault("WWW-Authenticate", 'Bearer realm="inferq"')

    def document(self, instance: str | None = None) -> dict[str, Any]:
        """The problem+json body."""
        doc: dict[str, Any] = {
            "type": f"urn:inferq:problem:{self.code.lower().replace('_', '-')}",
            "title": TITLES.get(self.code, self.code),
            "status": self.status,
            "detail": self.detail,
            "code": self.code,
        }
        if instance is not None:
            doc["instance"] = instance
        return doc | self.extra


def from_error(error: InferqError) -> Problem:
    """The problem of an inferq error, keeping which job and model it concerns."""
    job_id = getattr(error, "job_id", None)
    model = getattr(error, "model", None)
    if isinstance(error, UnknownJob):
        return Problem("NOT_FOUND", f"no job {job_id}", job_id=job_id)
    if isinstance(error, JobFailed):
        return Problem(error.code, error.message, job_id=job_id, model=model)
    return Problem(error.code, error.message)


def failure(error: JobFailed) -> dict[str, Any]:
    """The ``error`` member of a FAILURE job document."""
    return {"code": error.code, "type": type(error).__name__, "message": error.message}
