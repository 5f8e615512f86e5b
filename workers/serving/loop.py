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
from dataclasses import dataclass, field, replace

import redis
import structlog

from producer import wire
from producer.errors import InternalError, JobFailed, ModelNotFound
from workers.serving.batching import (
    MAX_DRAIN,
    Arrays,
    BackgroundCap,
    BatchPolicy,
    collate,
    drain_size,
    join,
    online_first,
    parts,
    pick,
    rows_per_message,
    split,
)
from workers.serving.inflight import InFlight, Message
from workers.serving.intake import Intake, Pending
from workers.serving.observers import Batch, Observer, Outcome
from workers.serving.outage import Outage
from workers.serving.poison import PoisonGuard
from workers.serving.reader import Drained, QueueReader
from workers.serving.runtime import LoadedModel
from workers.serving.writer import Completed, Doc, ResultWriter

log = structlog.get_logger(__name__)


@dataclass
class _Slices:
    """A background job run a slice at a time, so online jobs can go between its slices."""

    job: Pending
    started: float
    done: int = 0
    outputs: list[Arrays] = field(default_factory=list)
    runs: list[int] = field(default_factory=list)


class ModelServer:
    """Serves every loaded version of one model from its queue."""

    def __init__(self, name: str, versions: Mapping[int, LoadedModel], *, reader: QueueReader,
                 intake: Intake, writer: ResultWriter, poison: PoisonGuard,
                 observer: Observer, policy: BatchPolicy, worker: str, instance: int = 0,
                 redis_url: str = "") -> None:
        self.name = name
        #: Loaded versions. Replaced whole, never changed in place, when versions are loaded or
        #: unloaded while serving: this thread reads it without a lock.
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
        self._docs: list[Doc] = []
        #: Batches run whose observers have not heard of them yet (see :meth:`_observe`).
        self._observed: list[tuple[Batch, list[Outcome]]] = []
        self._runs: list[int] = []
        #: Background (lowest-priority) rows per run while online jobs are about.
        self._cap = BackgroundCap(policy)
        self._sliced: _Slices | None = None
        #: Background rows of the run under way, for the cap to learn how long a row takes.
        self._background_rows = 0
        #: Running average of the rows of a background job (batch chunks are large): how
        #: many to drain for the room left in a background run. Starts at one per drain.
        self._background_job_rows = float(policy.max_rows)
        #: Background messages drained with online ones, read after the online batch ran
        #: (in the same cycle: none is left over).
        self._deferred: list[Drained] = []
        #: The look sent with the last background run found online jobs and nothing more.
        self._looked = False
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
            self._take_deferred()
            while self._waiting:
                self._run_batch()
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            self.log.warning("jobs_left_at_shutdown", jobs=len(self._waiting), error=str(exc))
        self._hand_off()
        self.writer.close()

    def cycle(self, block_s: float) -> int:
        """Wait for work (up to ``block_s``), form one batch and run it; return the jobs it
        finished. Online jobs go first, in batches of their own; a background job larger than
        the background cap (:class:`~workers.serving.batching.BackgroundCap`) runs one slice
        per cycle, so online jobs go between its slices."""
        if not self._waiting and not self._backlog:
            # Idle: the wait and the first drain are one round trip.
            found = self.reader.wait_drain(block_s, *self._idle_drain())
            if found is None:
                return 0
            drained, left = found
            self._backlog = left > 0
            self._take(drained)
            empty = left == 0
        else:
            # The look sent with the last run found online jobs and left none behind: they
            # run now, without a second look first.
            empty = True if self._looked else self._fill()
        self._looked = False
        while self._waiting and not self.policy.should_flush(
            sum(p.rows for p in self._waiting), wire.now() - self._waiting[0].picked_at, empty
        ):
            empty = self._fill()
        done = 0
        try:
            if self._waiting:
                self._look_ahead()
                self._background_rows = 0
                started = time.monotonic()
                done = self._run_batch()
                if self._background_rows:
                    # The whole step, outputs encoded included: what an online job waits
                    # behind.
                    self._cap.observe(self._background_rows, time.monotonic() - started)
        finally:
            if self.reader.drain_in_flight:
                drained, left = self.reader.read_drain()
                self._backlog = self._backlog or left > 0
                self._take(drained)
                self._looked = bool(drained) and not left and self._online_waiting()
        # Nothing else waiting: write on this thread and save the hand-off to the writer.
        self._hand_off(inline=empty and not self._waiting and not self._deferred)
        if self._deferred and not self._online_waiting():
            # Background messages drained beside online jobs are read (their tensors
            # fetched: one more round trip) once no online job waits behind the read.
            self._take_deferred()
        return done

    def _take_deferred(self) -> None:
        if self._deferred:
            drained, self._deferred = self._deferred, []
            self._take(drained)

    def _look_ahead(self) -> None:
        """With a full batch of online jobs about to run and more waiting in the queue, send
        the drain for the next batch now and read it once the run is over: a deep queue's
        drain (hundreds of messages recorded as unacknowledged, their bytes sent) then
        overlaps the model run instead of leaving the worker idle. At most one batch is
        taken ahead, so other workers on the queue still find work."""
        if self.reader.drain_in_flight or not self._backlog:
            return
        rows = 0
        for p in self._waiting:
            if self._background(p):
                return  # background runs have their own look (see _fill)
            rows += p.rows
        room = 2 * self.policy.max_rows - rows
        if rows < self.policy.max_rows or room <= 0:
            return
        self.reader.send_drain(drain_size(room, self.intake.rows_per_message),
                               max_background=0)

    def _idle_drain(self) -> tuple[int, int]:
        """What :meth:`_fill` drains when nothing waits: (messages, background messages)."""
        want = drain_size(self.policy.max_rows, self.intake.rows_per_message)
        cap = self._cap.rows(time.monotonic())
        return want, drain_size(cap, self._background_job_rows)

    def _fill(self) -> bool:
        """Drain messages into the waiting jobs; True when the queue had nothing more (or
        nothing more that the next batch could take)."""
        waiting = background = 0
        for p in self._waiting:
            waiting += p.rows
            if p.message.background:
                background += p.rows
        want = drain_size(self.policy.max_rows - waiting, self.intake.rows_per_message)
        now = time.monotonic()
        cap = self._cap.rows(now)
        room = cap - background
        online = background < waiting
        if online or (background and room <= 0):
            # The next batch is online jobs, or background jobs already fill it: take only
            # online jobs (those that arrived meanwhile run next, not after the background
            # ones), and leave the other background jobs to whichever worker is free first.
            if not want and online:
                return False
            most = want or min(MAX_DRAIN, self.policy.max_rows)
            if not online and self._cap.online_recent(now):
                # Background rows fill the next run, one of the short ones while online
                # jobs are about: the look for online jobs is sent now and read once that
                # run is over, so its round trip costs the run nothing (an online job
                # waits at most the run under way and this one). When that run takes the
                # last background rows waiting, the look brings the next ones too.
                unrun = background - (self._sliced.done if self._sliced is not None else 0)
                more = drain_size(cap, self._background_job_rows) if unrun <= cap else 0
                self.reader.send_drain(most + more, max_background=more)
                return True
            drained, left = self.reader.drain(most, max_background=0)
            self._backlog = self._backlog or left > 0
            self._take(drained)
            return left == 0 or not online
        # No more background jobs than their next run takes (online jobs: as many as fit).
        drained, left = self.reader.drain(want, drain_size(room, self._background_job_rows))
        self._backlog = left > 0
        self._take(drained)
        return left == 0

    def _take(self, drained: list[Drained]) -> None:
        if not drained:
            return
        background = [m for m in drained if self.reader.background(m[0])]
        if background and len(background) < len(drained):
            # Online and background messages in one drain: the background ones are read
            # (decoded, checked) once the online batch has run, not before it.
            self._deferred += background
            drained = [m for m in drained if not self.reader.background(m[0])]
        pending, failures = self.intake.take(drained, wire.now())
        self._waiting += pending
        online = False
        for p in pending:
            if self._background(p):
                self._background_job_rows = rows_per_message(self._background_job_rows, p.rows)
            else:
                online = True
        if online:
            self._cap.saw_online(time.monotonic())
        for job_id, error, message, version in failures:
            self._fail(job_id, error, message, version)

    @staticmethod
    def _background(pending: Pending) -> bool:
        return pending.message.background

    def _online_waiting(self) -> bool:
        return not all(self._background(p) for p in self._waiting)

    def _pick(self) -> tuple[list[Pending], list[Pending]]:
        """The next batch: online jobs alone when any wait; otherwise background jobs, up
        to the background cap."""
        candidates = online_first(self._waiting, self._background)
        limit = self.policy.max_rows
        if self._background(candidates[0]):
            limit = self._cap.rows(time.monotonic())
        jobs, rest = pick(candidates, limit)
        if len(candidates) == len(self._waiting):
            return jobs, rest
        chosen = {id(j) for j in jobs}
        return jobs, [w for w in self._waiting if id(w) not in chosen]

    def _run_slice(self) -> int | None:
        """Run the next slice of a background job larger than the background cap: 1 once
        its last slice ran, 0 before; None when the next batch is not such a slice."""
        if not self._waiting or self._online_waiting():
            return None
        head = self._waiting[0]
        sliced = self._sliced if self._sliced is not None and self._sliced.job is head else None
        limit = self._cap.rows(time.monotonic())
        if sliced is None and (head.rows <= limit or head.suspect):
            return None
        model = self.versions.get(head.version)
        if model is None:
            return None
        if sliced is None:
            sliced = self._sliced = _Slices(head, started=wire.now())
        first = sliced.done
        rows = min(limit, head.rows - first)
        part = replace(head, rows=rows,
                       inputs={n: a[first:first + rows] for n, a in head.inputs.items()})
        self._background_rows = rows
        self.batch_started = time.monotonic()
        try:
            [(outcome, _)] = self._infer(model, [part])
        finally:
            self.batch_started = None
        if not isinstance(outcome, JobFailed):
            sliced.outputs.append(outcome)
            sliced.runs.append(rows)
            sliced.done += rows
            if sliced.done < head.rows:
                return 0
            outcome = join(sliced.outputs)
        self._sliced = None
        self._waiting = self._waiting[1:]
        batch = Batch(self.name, head.version, model.provider, [head], head.rows,
                      started=sliced.started)
        self.observer.batch_started(batch)
        batch.finished = batch.stored = wire.now()
        batch.runs = sliced.runs or [rows]
        self.jobs_done += 1
        if isinstance(outcome, JobFailed):
            self._fail(head.job.id, outcome, head.message, head.version)
        else:
            self._succeed(head, outcome, max(batch.runs), self._documents(batch))
        self._observed.append((batch, [outcome]))
        return 1

    def _run_batch(self) -> int:
        if (finished := self._run_slice()) is not None:
            return finished
        jobs, self._waiting = self._pick()
        if self._background(jobs[0]):
            self._background_rows = sum(p.rows for p in jobs)
        head = jobs[0]
        if head.suspect and (error := self.poison.check(
                head.job.id, self.name, head.version, head.inputs)) is not None:
            self.log.error("job_poisoned", job_id=head.job.id, message=error.message)
            self._fail(head.job.id, error, head.message, head.version)
            return 1
        model = self.versions.get(head.version)
        if model is None:
            # Unloaded while these jobs waited (removed from the repository, grace over).
            unloaded = ModelNotFound(f"model {self.name!r} has no version {head.version} any "
                                     f"more; served: {sorted(self.versions)}")
            for pending in jobs:
                self._fail(pending.job.id, unloaded, pending.message, head.version)
            return len(jobs)
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
        documents = self._documents(batch)
        for pending, (outcome, rows) in zip(jobs, ran, strict=True):
            if isinstance(outcome, JobFailed):
                self._fail(pending.job.id, outcome, pending.message, batch.version)
            else:
                self._succeed(pending, outcome, rows, documents)
        self._observed.append((batch, [outcome for outcome, _ in ran]))
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

    def _documents(self, batch: Batch) -> wire.SuccessDocuments:
        return wire.SuccessDocuments(
            model=self.name, version=batch.version, worker=self.worker, started=batch.started,
            finished=batch.finished, stored=batch.stored, date_done=wire.date_done())

    def _succeed(self, pending: Pending, outputs: Arrays, rows: int,
                 documents: wire.SuccessDocuments) -> None:
        job = pending.job
        self._docs.append((job.id, documents.document(
            job.id, outputs, batch_size=rows, enqueued_at=job.enqueued_at,
            picked_at=pending.picked_at, route=pending.route), pending.message.notify))
        self.inflight.close(pending.message)

    def _fail(self, job_id: str, error: JobFailed, message: Message, version: int | None
              ) -> None:
        self.observer.job_failed(job_id, error, version)
        # The model named is this server's, never the client's: no unbounded labels or text.
        self._docs.append((job_id, wire.failure_document(job_id, error, self.name),
                           message.notify))
        self.inflight.close(message)

    def _observe(self) -> None:
        """Tell the observers of the batches run since the last hand-off (what they hand
        off, such as Flower's events, goes with the next write, after the results)."""
        observed, self._observed = self._observed, []
        for batch, outcomes in observed:
            self.observer.batch_done(batch, outcomes)

    def _hand_off(self, inline: bool = False) -> None:
        """Hand finished documents, then the acks of messages with nothing left open, to the
        writer (or write them here when ``inline`` and the writer has nothing pending),
        once the observers heard of the batches run since the last hand-off."""
        if inline and self._observed and self._docs:
            # A lone batch's results are stored before its observers hear of it (its log
            # line, metrics, Flower's events): they cost its callers' latency nothing.
            self._write(Completed(self._docs, *self.inflight.take_done()), inline)
            self._docs = []
        self._observe()
        acks, blobs = self.inflight.take_done()
        after = self.observer.handoff()
        if self._docs or acks or after is not None:
            self._write(Completed(self._docs, acks, blobs, [] if after is None else [after]),
                        inline)
            self._docs = []

    def _write(self, item: Completed, inline: bool) -> None:
        if not (inline and self.writer.write_if_idle(item)):
            self.writer.submit(item)
