"""Reading results back: the decisions every client makes the same way.

How often a waiter re-reads every pending key, what a job with neither a result nor an
acceptance record is, what a caller's timeout raises, whether Redis restarted and lost the
jobs, and what a failed Redis call means. The synchronous client and the asyncio client
differ only in how they call Redis.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import redis

from producer.errors import InferqError, JobTimeout, ResourceExhausted, Unavailable, UnknownJob

#: How often a waiting caller re-reads every pending key, in case a notification was
#: missed (another client took it, or a worker that does not notify wrote the result).
FULL_RECHECK_S = 0.1
#: Keys per MGET when reading many results.
MGET_CHUNK = 1000
#: Notifications taken per LPOP after a wake-up; an entry may carry its result (up to
#: ``wire.NOTIFY_INLINE_MAX`` bytes), so this bounds one reply to about 20 MB.
NOTIFY_POP = 10_000
#: Environment variable that lets producers queue for a model no live worker serves.
QUEUE_WITHOUT_WORKERS_ENV = "INFERQ_QUEUE_WITHOUT_WORKERS"


def queue_without_workers(value: bool | None) -> bool:
    """``value``, else ``$INFERQ_QUEUE_WITHOUT_WORKERS`` (1, true or yes)."""
    if value is not None:
        return value
    return os.environ.get(QUEUE_WITHOUT_WORKERS_ENV, "").lower() in ("1", "true", "yes")


def chunks(ids: Sequence[str], size: int = MGET_CHUNK) -> Iterator[list[str]]:
    """``ids`` in slices of at most ``size`` (one MGET each)."""
    for start in range(0, len(ids), size):
        yield list(ids[start:start + size])


def unknown_job(job_id: str) -> UnknownJob:
    """The outcome of an ID with no result and no record of being accepted."""
    return UnknownJob(
        "no such job: no result and no record of it being accepted (a wrong ID, one whose "
        "result expired, or a job sent without inferq's client, which becomes known only "
        "when answered)", job_id=job_id)


def timed_out(pending: Sequence[str], total: int, timeout: float) -> JobTimeout:
    """What a caller whose ``timeout`` passed with ``pending`` of ``total`` jobs unanswered
    gets: the jobs may still finish."""
    waiting = sorted(pending)
    shown = ", ".join(waiting[:5]) + (" ..." if len(waiting) > 5 else "")
    return JobTimeout(
        f"{len(waiting)} of {total} jobs have no result after {timeout}s (still waiting: "
        f"{shown}); they may still finish: read them later", waiting)


class RestartWatch:
    """Notices a Redis restart by its ``run_id`` (INFO server) changing between reads."""

    def __init__(self) -> None:
        self.run_id: str | None = None

    @property
    def started(self) -> bool:
        """Whether a first run ID was taken (before the first submit)."""
        return self.run_id is not None

    def restarted(self, run_id: str) -> bool:
        """Record ``run_id``; True when it differs from the one seen before."""
        before, self.run_id = self.run_id, run_id
        return before is not None and before != run_id

    @staticmethod
    def lost(pending: int, aof_enabled: bool) -> Unavailable | None:
        """After a restart: the error of ``pending`` waiting jobs when Redis kept no
        append-only file (their messages and results are gone); None when it did."""
        if aof_enabled:
            return None
        return Unavailable(
            f"Redis restarted without append-only persistence while {pending} jobs were "
            "pending: their messages and results are lost; submit them again")


def run_id_of(info: dict[str, object]) -> str:
    """The ``run_id`` of an ``INFO server`` reply ("" when absent)."""
    return str(info.get("run_id", ""))


def redis_failure(exc: BaseException) -> InferqError | None:
    """The inferq error a failed Redis call stands for; None when it stands for none (a
    bug to raise as it is).

    A refused write (``noeviction``: redis-py's OutOfMemoryError, or inside a pipeline a
    ResponseError quoting maxmemory) is RESOURCE_EXHAUSTED; a connection that failed or
    timed out is UNAVAILABLE.
    """
    if isinstance(exc, redis.exceptions.ResponseError):
        if isinstance(exc, redis.exceptions.OutOfMemoryError) or "maxmemory" in str(exc):
            return ResourceExhausted(f"Redis is full and refused the write: {exc}")
        return None
    if isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
        return Unavailable(f"Redis did not answer: {exc}")
    return None
