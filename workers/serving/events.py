"""Celery task events per job, so Flower shows each job as an ``inferq.infer`` task.

An observer of the serving loop: events are recorded on the model thread and sent, as one
buffered publish, by the result writer once the batch's results are stored. Above
``max_rate`` jobs per second (0: no limit) only a sample of jobs gets events, so
monitoring never costs more than a fixed share of a busy worker.

What Flower shows of a job:

- ``args`` ``('digits',)`` and ``kwargs`` ``{'version': 2}``: the model, and the version
  the job ran on (``None`` when it failed before one was resolved). The task name stays
  ``inferq.infer``, the wire's. A job's ``task-received`` is therefore sent once its
  version is known, when its batch starts (or when it fails), stamped with the moment it
  was picked up.
- Received, Started: the moment the job was picked up, and its batch's start.
- ``runtime`` (task-succeeded): the job's own time in the worker, pick-up to its outputs
  ready = ``batch_wait`` + ``inference`` of its result's ``timings_ms``; the batch's model
  time alone is ``inference``. Queue time before pick-up is not in it (Flower's Received
  is the pick-up).
- ``result``: ``v<version> batch <rows>``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import orjson
import structlog
from celery.utils.time import utcoffset

from producer import wire
from producer.errors import JobFailed
from workers.serving.observers import Batch, Observer, Outcome

log = structlog.get_logger(__name__)

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
        return self.admit_many(1) == 1

    def admit_many(self, n: int) -> int:
        """How many of the next ``n`` jobs get events (the first ones)."""
        if self.max_rate <= 0:
            return n
        now = time.monotonic()
        self._tokens = min(self._capacity,
                           self._tokens + (now - self._refilled) * self.max_rate)
        self._refilled = now
        admitted = min(n, int(self._tokens))
        self._tokens -= admitted
        return admitted


def received(job_id: str, model: str, version: int | None, retries: int,
             timestamp: float | None = None) -> Event:
    """``timestamp`` (epoch seconds) of the pick-up; None: when the event is sent."""
    fields: dict[str, Any] = {
        "uuid": job_id, "name": wire.TASK_NAME, "args": repr((model,)),
        "kwargs": repr({"version": version}), "retries": retries, "eta": None,
        "expires": None, "root_id": job_id, "parent_id": None,
    }
    if timestamp is not None:
        fields["timestamp"] = timestamp
    return ("task-received", fields)


def started(job_id: str, timestamp: float) -> Event:
    return ("task-started", {"uuid": job_id, "timestamp": timestamp})


def succeeded(job_id: str, summary: str, runtime: float, timestamp: float) -> Event:
    return ("task-succeeded", {"uuid": job_id, "result": summary, "runtime": runtime,
                               "timestamp": timestamp})


def failed(job_id: str, error: str, timestamp: float) -> Event:
    return ("task-failed", {"uuid": job_id, "exception": error, "traceback": None,
                            "timestamp": timestamp})


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
        #: Jobs picked for events (all of them below the rate limit) whose task-received is
        #: not sent yet (it waits for the version), with their retries.
        self._admitted: dict[str, int] = {}
        #: Sampled jobs in a batch: received and started, outcome not yet recorded.
        self._running: set[str] = set()

    def received(self, job_ids: Sequence[str], redelivered: bool) -> None:
        retries = int(redelivered)
        admitted = self.sampler.admit_many(len(job_ids))
        self._admitted.update((job_id, retries) for job_id in job_ids[:admitted])

    def batch_started(self, batch: Batch) -> None:
        admitted, model = self._admitted, self.model
        sampled = [(p, admitted.pop(p.job.id)) for p in batch.jobs if p.job.id in admitted]
        if not sampled:
            return
        self._events += [received(p.job.id, model, p.version, retries, p.picked_at)
                         for p, retries in sampled]
        self._events += [started(p.job.id, batch.started) for p, _ in sampled]
        self._running.update(p.job.id for p, _ in sampled)

    def batch_done(self, batch: Batch, outcomes: Sequence[Outcome]) -> None:
        running = self._running
        if not running:
            return
        summary = f"v{batch.version} batch {batch.rows}"
        for pending, outcome in zip(batch.jobs, outcomes, strict=True):
            job_id = pending.job.id
            if job_id in running and not isinstance(outcome, JobFailed):
                running.discard(job_id)
                self._events.append(
                    succeeded(job_id, summary, batch.finished - pending.picked_at,
                              batch.finished))

    def job_failed(self, job_id: str, error: JobFailed, version: int | None) -> None:
        if job_id in self._running:
            self._running.discard(job_id)
            self._events.append(failed(job_id, str(error), wire.now()))
            return
        retries = self._admitted.pop(job_id, None)
        if retries is None:
            if not self.sampler.admit():
                return
            retries = 0
        now = wire.now()
        self._events += [received(job_id, self.model, version, retries, now),
                         failed(job_id, str(error), now)]

    def handoff(self) -> Callable[[], None] | None:
        if not self._events:
            return None
        events, self._events = self._events, []
        return lambda: self._send(events)


class Dispatcher:
    """Sends events through the worker's Celery app from a thread of its own: one publish
    for everything handed to it, or, when the last publish was less than
    ``min_interval_s`` ago, with the next one (at most that much later). A busy worker
    publishes a few times a second instead of once per batch; a lone job's events go out at
    once, and neither the model thread nor the result writer waits for Redis to take them.
    Handed over after results are stored, so an event never announces a result that cannot
    be read yet."""

    def __init__(self, app: Any, hostname: str, min_interval_s: float = 0.2) -> None:
        self._connection = app.connection_for_write()
        self._dispatcher = app.events.Dispatcher(
            self._connection, hostname=hostname, buffer_group=["task"], buffer_limit=100_000)
        self.min_interval_s = min_interval_s
        self._held: list[Event] = []
        self._sent_at = -1e9
        self._closing = False
        self._wake = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="inferq-events", daemon=True)
        self._thread.start()

    def send(self, events: Sequence[Event]) -> None:
        with self._wake:
            self._held += events
            self._wake.notify()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._held and not self._closing:
                    self._wake.wait()
                if not self._held:
                    return  # closing, nothing left
                wait = self._sent_at + self.min_interval_s - time.monotonic()
                if wait > 0 and not self._closing:
                    self._wake.wait(wait)
                    continue
                events, self._held = self._held, []
                self._sent_at = time.monotonic()
            try:
                self._publish(events)
            except Exception as exc:  # Flower misses these; results and metrics do not
                log.warning("task_events_not_sent", events=len(events), error=str(exc))

    def _publish(self, events: Sequence[Event]) -> None:
        # What Celery's dispatcher sends for a buffered group (its Event fields, one
        # ``task.multi`` message), encoded once with orjson rather than an Event dict and
        # the json module per event.
        dispatcher = self._dispatcher
        if not dispatcher.enabled or dispatcher.producer is None:
            return
        common = {"hostname": dispatcher.hostname, "utcoffset": utcoffset(),
                  "pid": dispatcher.pid}
        now = time.time()
        forward = dispatcher.clock.forward
        body = orjson.dumps([
            {"timestamp": now, **fields, **common, "clock": forward(), "type": kind}
            for kind, fields in events])
        with dispatcher.mutex:
            dispatcher.producer.publish(
                body, routing_key="task.multi", exchange=dispatcher.exchange.name,
                declare=[dispatcher.exchange], content_type="application/json",
                content_encoding="utf-8", headers=dispatcher.headers,
                delivery_mode=dispatcher.delivery_mode)

    def close(self) -> None:
        """Publish what is held, then stop."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join(timeout=10)
        self._dispatcher.close()
        self._connection.release()
