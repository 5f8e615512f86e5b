"""What the serving loop tells the rest of the worker: jobs received, a batch started or
done, a job failed. Metrics, Flower's task events and the batch log lines are observers;
the loop knows only this interface.

Hooks run on the model thread, once per batch or per message (``received`` and
``job_failed`` once per job), so each must cost little. :meth:`Observer.handoff` returns
work to run on the result writer's thread once the batch's results are stored.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog

from producer.errors import JobFailed
from workers.serving.batching import Arrays

if TYPE_CHECKING:
    from workers.serving.intake import Pending


@dataclass
class Batch:
    """One batch that ran through a model version, with its epoch-second stamps."""

    model: str
    version: int
    provider: str
    jobs: Sequence[Pending]
    rows: int
    started: float
    finished: float = 0.0
    stored: float = 0.0
    #: Rows of each model run: one run, or a job larger than a batch run in parts.
    runs: Sequence[int] = ()


#: A job's outcome in a batch: its outputs, or the error it failed with.
Outcome = Arrays | JobFailed


class Observer:
    """Hooks of the serving loop; each does nothing unless overridden."""

    def received(self, job_ids: Sequence[str], redelivered: bool) -> None:
        """Jobs of one message were taken from the queue and are about to be checked."""

    def batch_started(self, batch: Batch) -> None:
        """``batch`` is about to run."""

    def batch_done(self, batch: Batch, outcomes: Sequence[Outcome]) -> None:
        """``batch`` ran; ``outcomes`` line up with ``batch.jobs``. Failed jobs are also
        reported one by one to :meth:`job_failed`."""

    def job_failed(self, job_id: str, error: JobFailed, version: int | None) -> None:
        """A job failed, in a batch or before reaching one."""

    def handoff(self) -> Callable[[], None] | None:
        """Work to run once the results handed off so far are stored, or None."""
        return None


class Observers(Observer):
    """Several observers behind one, called in order."""

    def __init__(self, observers: Sequence[Observer]) -> None:
        self.observers = list(observers)

    def received(self, job_ids: Sequence[str], redelivered: bool) -> None:
        for o in self.observers:
            o.received(job_ids, redelivered)

    def batch_started(self, batch: Batch) -> None:
        for o in self.observers:
            o.batch_started(batch)

    def batch_done(self, batch: Batch, outcomes: Sequence[Outcome]) -> None:
        for o in self.observers:
            o.batch_done(batch, outcomes)

    def job_failed(self, job_id: str, error: JobFailed, version: int | None) -> None:
        for o in self.observers:
            o.job_failed(job_id, error, version)

    def handoff(self) -> Callable[[], None] | None:
        work = [w for o in self.observers if (w := o.handoff()) is not None]
        if not work:
            return None
        if len(work) == 1:
            return work[0]

        def run_all() -> None:
            for w in work:
                w()

        return run_all


class BatchLog(Observer):
    """One INFO line per batch and one per failed job, as structured log records."""

    def __init__(self, log: structlog.stdlib.BoundLogger) -> None:
        self.log = log

    def batch_done(self, batch: Batch, outcomes: Sequence[Outcome]) -> None:
        self.log.info(
            "batch", version=batch.version, device=batch.provider, jobs=len(batch.jobs),
            rows=batch.rows, runs=len(batch.runs) or 1,
            oldest_wait_ms=round((batch.started - min(p.picked_at for p in batch.jobs)) * 1000,
                                 3),
            compute_ms=round((batch.finished - batch.started) * 1000, 3),
        )

    def job_failed(self, job_id: str, error: JobFailed, version: int | None) -> None:
        self.log.info("job_failed", job_id=job_id, code=error.code, message=error.message)
