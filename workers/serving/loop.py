"""The serving loop: wait -> drain -> batch -> run -> results -> hand off to the writer.

One :class:`ModelServer` per model instance runs in its own thread of the worker process.
It reads its model's queue in bulk (:mod:`~workers.serving.reader`), turns messages into
checked jobs (:mod:`~workers.serving.intake`), forms batches across jobs
(:mod:`~workers.serving.batching`), runs them, and hands every job's result document and
the acks of finished messages to the writer (:mod:`~workers.serving.writer`). Whatever
watches it (metrics, Flower events, logs) is an :class:`~workers.serving.observers.Observer`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping

import redis
import structlog

from producer import wire
from producer.errors import InternalError, JobFailed
from workers.serving.batching import (
    Arrays,
    BatchPolicy,
    collate,
    drain_size,
    join,
    parts,
    pick,
    split,
)
from workers.serving.inflight import InFlight, Message
from workers.serving.intake import Intake, Pending
from workers.serving.observers import Batch, Observer, Outcome
from workers.serving.outage import Outage
from workers.serving.poison import PoisonGuard
from workers.serving.reader import QueueReader
from workers.serving.runtime import LoadedModel
from workers.serving.writer import Completed, ResultWriter

log = structlog.get_logger(__name__)


class ModelServer:
    """Serves every loaded version of one model from its queue."""

    def __init__(self, name: str, versions: Mapping[int, LoadedModel], *, reader: QueueReader,
                 intake: Intake, writer: ResultWriter, poison: PoisonGuard,
                 observer: Observer, policy: BatchPolicy, worker: str, instance: int = 0,
                 redis_url: str = "") -> None:
        self.name = name
        self.versions = dict(versions)
        self.reader, self.intake, self.writer = reader, intake, writer
        self.inflight: InFlight = intake.inflight
        self.poison = poison
        self.observer = observer
        self.policy = policy
        self.worker = worker
        self.input_names = [s.name for s in intake.checks.inputs]
        #: Set while a batch runs (time.monotonic()), for the time-limit watchdog.
        self.batch_started: float | None = None
        self.jobs_done = 0
        self._waiting: list[Pending] = []
        #: The last drain left messages in the queue: drain again without waiting (waiting
        #: would move the oldest message behind the others).
        self._backlog = False
        self._docs: list[tuple[str, bytes, str | None]] = []
        self._runs: list[int] = []
        self.log = log.bind(model=name, worker=worker, instance=instance)
        self.outage = Outage(self.log, "queue", redis_url)

    def serve(self, stop: threading.Event, block_s: float = 1.0, grace_s: float = 10.0
              ) -> None:
        """Run batches until ``stop`` is set, then finish the jobs already taken and store
        their results (giving up after ``grace_s`` if Redis is unreachable: those jobs stay
        unacknowledged and are delivered again)."""
        while not stop.is_set():
            try:
                self.cycle(block_s)
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
                # Taken jobs stay in memory and in kombu's unacked set; retry until Redis is back.
                stop.wait(self.outage.failed(exc))
                continue
            if self.outage.ongoing:
                self.outage.recovered()
        self.writer.give_up_after(grace_s)
        try:
            while self._waiting:
                self._run_batch()
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            self.log.warning("jobs_left_at_shutdown", jobs=len(self._waiting), error=str(exc))
        self._hand_off()
        self.writer.close()

    def cycle(self, block_s: float) -> int:
        """Wait for work (up to ``block_s``), form one batch and run it; return its jobs."""
        if not self._waiting and not self._backlog and not self.reader.wait(block_s):
            return 0
        empty = self._fill()
        while self._waiting and not self.policy.should_flush(
            sum(p.rows for p in self._waiting), wire.now() - self._waiting[0].picked_at, empty
        ):
            empty = self._fill()
        done = self._run_batch() if self._waiting else 0
        # Nothing else waiting: write on this thread and save the hand-off to the writer.
        self._hand_off(inline=empty and not self._waiting)
        return done

    def _fill(self) -> bool:
        """Drain messages into the waiting jobs; True when the queue had nothing more."""
        want = drain_size(self.policy.max_rows - sum(p.rows for p in self._waiting),
                          self.intake.rows_per_message)
        if not want:
            return False
        drained, left = self.reader.drain(want)
        self._backlog = left > 0
        pending, failures = self.intake.take(drained, wire.now())
        self._waiting += pending
        for job_id, error, message, version in failures:
            self._fail(job_id, error, message, version)
        return left == 0

    def _run_batch(self) -> int:
        jobs, self._waiting = pick(self._waiting, self.policy.max_rows)
        head = jobs[0]
        if head.suspect and (error := self.poison.check(
                head.job.id, self.name, head.version, head.inputs)) is not None:
            self.log.error("job_poisoned", job_id=head.job.id, message=error.message)
            self._fail(head.job.id, error, head.message, head.version)
            return 1
        model = self.versions[head.version]
        batch = Batch(self.name, head.version, model.provider, jobs,
                      sum(p.rows for p in jobs), started=wire.now())
        self.observer.batch_started(batch)
        self.batch_started = time.monotonic()
        self._runs = []
        try:
            ran = self._infer(model, jobs)
        finally:
            self.batch_started = None
        batch.finished = wire.now()
        batch.runs = self._runs or [batch.rows]
        self.jobs_done += len(jobs)
        batch.stored = wire.now()
        done = wire.date_done()
        for pending, (outcome, rows) in zip(jobs, ran, strict=True):
            if isinstance(outcome, JobFailed):
                self._fail(pending.job.id, outcome, pending.message, batch.version)
            else:
                self._succeed(pending, outcome, batch, rows, done)
        self.observer.batch_done(batch, [outcome for outcome, _ in ran])
        return len(jobs)

    def _infer(self, model: LoadedModel, jobs: list[Pending]) -> list[tuple[Outcome, int]]:
        """Each job's outcome, and the rows of the model run that produced it."""
        rows = sum(p.rows for p in jobs)
        limit = self.policy.max_rows
        try:
            if rows > limit and len(jobs) == 1:
                # A job larger than a batch runs as several, its outputs joined in order.
                pieces = parts(jobs[0].inputs, limit)
                outputs = join([model.run(part) for part in pieces])
                self._runs = [len(next(iter(p.values()))) for p in pieces]
                return [(outputs, limit)]
            outputs = model.run(collate([p.inputs for p in jobs], self.input_names))
            return [(o, rows) for o in split(outputs, [p.rows for p in jobs])]
        except Exception as exc:
            if len(jobs) > 1:
                # Run each job alone so one job the model rejects fails by itself.
                self.log.warning("batch_failed_running_jobs_alone", jobs=len(jobs), rows=rows,
                                 error=str(exc))
                return [r for p in jobs for r in self._infer(model, [p])]
            self.log.warning("job_run_failed", job_id=jobs[0].job.id, error=str(exc))
            return [(InternalError(f"the model failed on this job: {exc}",
                                   job_id=jobs[0].job.id, model=self.name), rows)]

    def _succeed(self, pending: Pending, outputs: Arrays, batch: Batch, rows: int,
                 date_done: str) -> None:
        job = pending.job
        timings = wire.timings_ms(enqueued_at=job.enqueued_at, picked_at=pending.picked_at,
                                  started=batch.started, finished=batch.finished,
                                  stored=batch.stored)
        result = wire.success_result(outputs, model=self.name, version=batch.version,
                                     worker=self.worker, batch_size=rows, timings=timings,
                                     route=pending.route)
        self._docs.append((job.id, wire.success_document(job.id, result, date_done),
                           pending.message.notify))
        self.inflight.close(pending.message)

    def _fail(self, job_id: str, error: JobFailed, message: Message, version: int | None
              ) -> None:
        self.observer.job_failed(job_id, error, version)
        # The model named is this server's, never the client's: no unbounded labels or text.
        self._docs.append((job_id, wire.failure_document(job_id, error, self.name),
                           message.notify))
        self.inflight.close(message)

    def _hand_off(self, inline: bool = False) -> None:
        """Hand finished documents, then the acks of messages with nothing left open, to the
        writer (or write them here when ``inline`` and the writer has nothing pending)."""
        acks, blobs = self.inflight.take_done()
        after = self.observer.handoff()
        if self._docs or acks or after is not None:
            item = Completed(self._docs, acks, blobs, [] if after is None else [after])
            if not (inline and self.writer.write_if_idle(item)):
                self.writer.submit(item)
            self._docs = []
