"""Celery task events per job, so Flower shows each job as an ``inferq.infer`` task.

An observer of the serving loop: events are recorded on the model thread and sent, as one
buffered publish, by the result writer once the batch's results are stored. Above
``max_rate`` jobs per second (0: no limit) only a sample of jobs gets events, so
monitoring never costs more than a fixed share of a busy worker.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from producer import wire
from producer.errors import JobFailed
from workers.serving.observers import Batch, Observer, Outcome

Event = tuple[str, dict[str, Any]]


class Sampler:
    """Token bucket: whether the next job gets events, at most ``max_rate`` per second."""

    def __init__(self, max_rate: float) -> None:
        self.max_rate = max_rate
        # At least one whole token, so a rate below one job a second still admits some.
        self._capacity = max(1.0, max_rate)
        self._tokens = self._capacity
        self._refilled = time.monotonic()

    def admit(self) -> bool:
        if self.max_rate <= 0:
            return True
        now = time.monotonic()
        self._tokens = min(self._capacity,
                           self._tokens + (now - self._refilled) * self.max_rate)
        self._refilled = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False


def received(job_id: str, model: str, retries: int) -> Event:
    return ("task-received", {
        "uuid": job_id, "name": wire.TASK_NAME, "args": f"({model!r}, ...)",
        "kwargs": "{}", "retries": retries, "eta": None, "expires": None,
        "root_id": job_id, "parent_id": None,
    })


def started(job_id: str) -> Event:
    return ("task-started", {"uuid": job_id})


def succeeded(job_id: str, summary: str, runtime: float) -> Event:
    return ("task-succeeded", {"uuid": job_id, "result": summary, "runtime": runtime})


def failed(job_id: str, error: str) -> Event:
    return ("task-failed", {"uuid": job_id, "exception": error, "traceback": None})


class TaskEvents(Observer):
    """Records the task events of one model server's jobs and sends them after each store.

    ``send`` publishes a list of events (a Celery event dispatcher's send + flush).
    """

    def __init__(self, model: str, send: Callable[[Sequence[Event]], None],
                 max_rate: float = 0.0) -> None:
        self.model = model
        self.sampler = Sampler(max_rate)
        self._send = send
        self._events: list[Event] = []
        #: Jobs picked for events (all of them below the rate limit).
        self._sampled: set[str] = set()

    def received(self, job_ids: Sequence[str], redelivered: bool) -> None:
        retries = int(redelivered)
        for job_id in job_ids:
            if self.sampler.admit():
                self._sampled.add(job_id)
                self._events.append(received(job_id, self.model, retries))

    def batch_started(self, batch: Batch) -> None:
        sampled = self._sampled
        self._events += [started(p.job.id) for p in batch.jobs if p.job.id in sampled]

    def batch_done(self, batch: Batch, outcomes: Sequence[Outcome]) -> None:
        sampled = self._sampled
        summary = f"v{batch.version} batch {batch.rows}"
        runtime = batch.finished - batch.started
        for pending, outcome in zip(batch.jobs, outcomes, strict=True):
            job_id = pending.job.id
            if job_id in sampled and not isinstance(outcome, JobFailed):
                sampled.discard(job_id)
                self._events.append(succeeded(job_id, summary, runtime))

    def job_failed(self, job_id: str, error: JobFailed, version: int | None) -> None:
        if job_id in self._sampled:
            self._sampled.discard(job_id)
            self._events.append(failed(job_id, str(error)))
        elif self.sampler.admit():
            self._events += [received(job_id, self.model, 0), failed(job_id, str(error))]

    def handoff(self) -> Callable[[], None] | None:
        if not self._events:
            return None
        events, self._events = self._events, []
        return lambda: self._send(events)


class Dispatcher:
    """Sends events through the worker's Celery app, buffered into one publish per call."""

    def __init__(self, app: Any, hostname: str) -> None:
        self._connection = app.connection_for_write()
        self._dispatcher = app.events.Dispatcher(
            self._connection, hostname=hostname, buffer_group=["task"], buffer_limit=100_000)

    def send(self, events: Sequence[Event]) -> None:
        for kind, fields in events:
            self._dispatcher.send(kind, **fields)
        self._dispatcher.flush()

    def close(self) -> None:
        self._dispatcher.close()
        self._connection.release()
