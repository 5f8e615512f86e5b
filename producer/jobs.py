"""Job handles and result types returned to services."""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

from producer.errors import JobFailed
from producer.wire.results import JobResult

if TYPE_CHECKING:
    from producer.client import InferenceClient

__all__ = ["JobHandle", "JobResult", "JobStatus"]


class JobStatus(str, enum.Enum):
    """Where a job stands, as far as its result key tells."""

    PENDING = "PENDING"  # accepted: queued or running
    SUCCESS = "SUCCESS"
    FAILURE = "FAILURE"
    #: No result and no record of acceptance: a wrong ID, an expired one, or a job sent by a
    #: plain Celery client (those are PENDING to Celery, UNKNOWN here, until answered).
    UNKNOWN = "UNKNOWN"


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
                if outcome.model is None:
                    outcome.model = self.model
                raise outcome
            return outcome
        raise AssertionError("as_completed ended without the job")  # pragma: no cover
