"""Job handles and result types returned to services."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson

from producer.contract import decode_tensor
from producer.errors import JobFailed

if TYPE_CHECKING:
    from producer.client import InferenceClient

__all__ = ["JobHandle", "JobResult", "JobStatus", "parse_result"]


class JobStatus(str, enum.Enum):
    """Where a job stands, as far as its result key tells."""

    PENDING = "PENDING"  # queued, running, or unknown: Celery does not tell these apart
    SUCCESS = "SUCCESS"
    FAILURE = "FAILURE"


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

    def __getitem__(self, name: str) -> np.ndarray[Any, Any]:
        return self.outputs[name]


def parse_result(job_id: str, raw: bytes | str) -> JobResult | JobFailed:
    """Turn a stored result document into a :class:`JobResult` or a :class:`JobFailed`."""
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
        )
    error = doc.get("error")
    if isinstance(error, dict):
        return JobFailed(job_id, str(error.get("code")), str(error.get("message")))
    # A result written by something other than an inferq worker (a plain Celery failure).
    exc = doc.get("result") or {}
    return JobFailed(job_id, "INTERNAL", f"{exc.get('exc_type')}: {exc.get('exc_message')}")


class JobHandle:
    """A submitted job: its ID, and ways to read its status and result."""

    def __init__(
        self, client: InferenceClient, job_id: str, model: str, *, fresh: bool = False
    ) -> None:
        self._client = client
        self.id = job_id
        self.model = model
        self._fresh = fresh  # submitted by this client a moment ago, not yet waited on

    def __repr__(self) -> str:
        return f"JobHandle(id={self.id!r}, model={self.model!r})"

    def status(self) -> JobStatus:
        """PENDING until the job's result is stored, then SUCCESS or FAILURE."""
        return self._client.status(self.id)

    def result(self, timeout: float = 60.0) -> JobResult:
        """Wait up to ``timeout`` seconds; raise JobFailed or JobTimeout."""
        fresh, self._fresh = self._fresh, False
        for _, outcome in self._client.as_completed([self.id], timeout, just_submitted=fresh):
            if isinstance(outcome, JobFailed):
                raise outcome
            return outcome
        raise AssertionError("as_completed ended without the job")  # pragma: no cover
