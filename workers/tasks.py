"""The spine of a worker: decode -> batch -> run -> split -> store -> ack.

One :class:`ModelServer` per model runs in its own thread of the worker process, reads its
model's queue in bulk, forms batches across jobs and gives every job its own result.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import redis
import structlog

from producer import contract
from producer.contract import Delivery, JobRequest
from producer.errors import (
    InferqError,
    InternalError,
    InvalidInput,
    Poisoned,
)
from workers import deadletter, validation
from workers.batching import Arrays, BatchPolicy, collate, split, take
from workers.consumer import QueueReader
from workers.metrics import WorkerMetrics
from workers.results import Completed, Event, ResultWriter, TaskEvents
from workers.runtime import LoadedModel
from workers.settings import Settings

log = structlog.get_logger(__name__)

#: Most messages taken in one round trip, whatever their size.
_MAX_DRAIN = 256


@dataclass
class _Message:
    """A drained message; acked once ``open_jobs`` reaches zero."""

    tag: str
    notify: str | None
    open_jobs: int
    blobs: list[str]


@dataclass
class _BatchInfo:
    """What every job of one batch shares in its result."""

    model: LoadedModel
    rows: int
    started: float
    finished: float
    stored: float
    date_done: str


@dataclass
class _Pending:
    """A decoded, checked job waiting for its batch."""

    job: JobRequest
    inputs: Arrays
    rows: int
    message: _Message
    picked_at: float
    #: Redelivered after a crash: run alone, and counted, so a poison job is isolated.
    suspect: bool = False


class ModelServer:
    """Serves every loaded version of one model from its queue."""

    def __init__(
        self,
        name: str,
        versions: Mapping[int, LoadedModel],
        reader: QueueReader,
        writer: ResultWriter,
        *,
        worker: str,
        settings: Settings,
        metrics: WorkerMetrics | None = None,
        instance: int = 0,
    ) -> None:
        self.name = name
        self.versions = dict(versions)
        self.latest = max(self.versions)
        manifest = self.versions[self.latest].manifest
        self.inputs = manifest.inputs
        self.input_names = [s.name for s in manifest.inputs]
        self.policy = BatchPolicy(manifest.max_batch_rows, manifest.max_wait_ms / 1000.0)
        self.reader = reader
        self.writer = writer
        self.events = writer.events
        self.worker = worker
        self.settings = settings
        self.metrics = metrics
        #: Set while a batch runs (time.monotonic()), for the time-limit watchdog.
        self.batch_started: float | None = None
        self.jobs_done = 0
        self._buffer: list[_Pending] = []
        self._docs: list[tuple[str, bytes, str | None]] = []
        self._events: list[Event] = []
        #: Jobs picked for task events (all of them below the events rate limit).
        self._sampled: set[str] = set()
        self._touched: list[_Message] = []
        self._rows_per_message = 8.0
        self.log = log.bind(model=name, worker=worker, instance=instance)

    # --- the loop ----------------------------------------------------------------------

    def serve(self, stop: threading.Event, block_s: float = 1.0) -> None:
        """Run batches until ``stop`` is set, then finish the jobs already taken."""
        while not stop.is_set():
            try:
                self.cycle(block_s)
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
                # Taken jobs stay in memory and in kombu's unacked set; retry until Redis is back.
                self.log.warning("redis_unavailable", error=str(exc))
                stop.wait(0.5)
        while self._buffer:
            self._run_batch()
        self._complete()
        self.writer.close()

    def cycle(self, block_s: float) -> int:
        """Wait for work (up to ``block_s``), form one batch and run it; return its jobs."""
        if not self._buffer and not self.reader.wait(block_s):
            return 0
        empty = self._fill()
        while self._buffer and not self.policy.should_flush(
            sum(p.rows for p in self._buffer), time.time() - self._buffer[0].picked_at, empty
        ):
            empty = self._fill()
        done = self._run_batch() if self._buffer else 0
        # Nothing else waiting: write on this thread and save the hand-off to the writer.
        self._complete(inline=empty and not self._buffer)
        return done

    # --- decode and check --------------------------------------------------------------

    def _fill(self) -> bool:
        """Drain messages into the buffer; True when the queue had nothing more."""
        room = self.policy.max_rows - sum(p.rows for p in self._buffer)
        if room <= 0:
            # The next batch is full already: taking more would hoard messages that another
            # instance or worker is waiting for.
            return False
        want = min(_MAX_DRAIN, max(1, int(room / self._rows_per_message)))
        drained, left = self.reader.drain(want)
        picked_at = time.time()
        parsed = []
        for tag, raw in drained:
            try:
                parsed.append((tag, contract.parse_message(raw, self.reader.queue)))
            except Exception as exc:
                # Without a job ID there is nobody to report to: keep it for people to read.
                self.log.error("message_dead_lettered", reason=str(exc),
                               head=raw[:200].decode("latin-1"))
                self.reader.dead_letter(tag, raw, str(exc))
        self._attach_entries([d for _, d in parsed])
        blobs = self._fetch_blobs([d for _, d in parsed])
        for tag, delivery in parsed:
            self._accept(tag, delivery, picked_at, blobs)
        return left == 0

    def _attach_entries(self, deliveries: list[Delivery]) -> None:
        """Read the entries of bulk messages that carry them by reference, in one round trip."""
        pending = [d for d in deliveries if d.entries_ref is not None]
        if pending:
            keys = [str(d.entries_ref) for d in pending]
            values: list[Any] = self.reader.client.mget(keys)
            for delivery, blob in zip(pending, values, strict=True):
                contract.attach_entries(delivery, blob)

    def _fetch_blobs(self, deliveries: list[Delivery]) -> dict[str, bytes | None]:
        """Every by-reference tensor of these messages, in one round trip."""
        keys = [
            t["ref"] for d in deliveries for job in d.jobs
            if isinstance(job.inputs, Mapping)
            for t in job.inputs.values()
            if isinstance(t, Mapping) and isinstance(t.get("ref"), str)
            and t["ref"].startswith(contract.BLOB_KEY_PREFIX)
        ]
        if not keys:
            return {}
        values: list[Any] = self.reader.client.mget(keys)
        return dict(zip(keys, values, strict=True))

    def _accept(
        self, tag: str, delivery: Delivery, picked_at: float, blobs: dict[str, bytes | None]
    ) -> None:
        ids = {j.id for j in delivery.jobs}
        owned = [k for k in blobs
                 if k[len(contract.BLOB_KEY_PREFIX):].split(":", 1)[0] in ids]
        if delivery.entries_ref is not None:
            owned.append(delivery.entries_ref)
        message = _Message(tag, delivery.notify, len(delivery.jobs) + len(delivery.failed),
                           owned)
        self._touched.append(message)
        rows = 0
        for job_id, error in delivery.failed:
            self._fail(job_id, error, message)
        done = self._already_done(delivery) if delivery.redelivered else set()
        for job in delivery.jobs:
            if job.id in done:  # finished before the crash that redelivered its message
                message.open_jobs -= 1
                continue
            if self.events.admit():
                self._sampled.add(job.id)
                self._events.append(
                    TaskEvents.received(job.id, self.name, int(delivery.redelivered)))
            try:
                pending = self._check(job, message, picked_at, blobs)
            except InferqError as exc:
                self._fail(job.id, exc, message)
                continue
            except Exception as exc:
                # Whatever a hostile payload triggers fails that job, never the worker.
                self._fail(job.id, InvalidInput(f"malformed job: {exc!r}"), message)
                continue
            pending.suspect = delivery.redelivered
            self._buffer.append(pending)
            rows += pending.rows
        if delivery.jobs:
            self._rows_per_message = 0.8 * self._rows_per_message + 0.2 * max(1, rows)

    def _already_done(self, delivery: Delivery) -> set[str]:
        pipe = self.writer.store.client.pipeline(transaction=False)
        for job in delivery.jobs:
            pipe.exists(contract.result_key(job.id))
        return {j.id for j, found in zip(delivery.jobs, pipe.execute(), strict=True) if found}

    def _check(
        self, job: JobRequest, message: _Message, picked_at: float,
        blobs: dict[str, bytes | None],
    ) -> _Pending:
        job.version = validation.resolve_version(job, self.name, self.versions)
        validation.check_deadline(job, picked_at)
        arrays, rows = validation.decode_inputs(
            job.inputs, self.inputs, blobs, max_tensor_bytes=self.settings.max_tensor_bytes,
            reject_nonfinite=self.settings.reject_nonfinite)
        return _Pending(job, arrays, rows, message, picked_at)

    # --- run -------------------------------------------------------------------------

    def _run_batch(self) -> int:
        head = self._buffer[0]
        version = head.job.version
        if head.suspect:
            batch = [head]
        else:
            group = [p for p in self._buffer if p.job.version == version and not p.suspect]
            batch = group[: take([p.rows for p in group], self.policy.max_rows)]
        chosen = {id(p) for p in batch}
        self._buffer = [p for p in self._buffer if id(p) not in chosen]
        if head.suspect and self._poisoned(head):
            return 1
        assert version is not None
        model = self.versions[version]
        self._events += [TaskEvents.started(p.job.id) for p in batch if p.job.id in self._sampled]
        started = time.time()
        self.batch_started = time.monotonic()
        try:
            parts = self._infer(model, batch)
        finally:
            self.batch_started = None
        finished = time.time()
        self.jobs_done += len(batch)
        rows = sum(p.rows for p in batch)
        shared = _BatchInfo(model, rows, started, finished, time.time(),
                            datetime.now(timezone.utc).isoformat())
        for pending, outputs in zip(batch, parts, strict=True):
            if isinstance(outputs, InferqError):
                self._fail(pending.job.id, outputs, pending.message, version)
            else:
                self._succeed(pending, outputs, shared)
        if self.metrics is not None:
            self._observe(batch, parts, shared, version)
        self.log.info(
            "batch", version=version, device=model.provider, jobs=len(batch), rows=rows,
            oldest_wait_ms=round((started - min(p.picked_at for p in batch)) * 1000, 3),
            compute_ms=round((finished - started) * 1000, 3),
        )
        return len(batch)

    def _poisoned(self, pending: _Pending) -> bool:
        """Count a redelivered job's execution; dead-letter it once it has had its share."""
        job = pending.job
        pipe = self.writer.store.client.pipeline(transaction=False)
        pipe.incr(deadletter.attempts_key(job.id))
        pipe.expire(deadletter.attempts_key(job.id), self.settings.result_ttl_s)
        # The first execution (in a normal batch) is not counted: it cost no round trip.
        executions = int(pipe.execute()[0]) + 1
        if executions <= self.settings.max_executions:
            return False
        error = Poisoned(
            f"the job was started {executions - 1} times and its worker died each time; "
            "it is in the dead-letter list (inferq dlq show)")
        deadletter.add(self.writer.store.client, deadletter.job_entry(
            job.id, self.name, job.version, pending.inputs, error.code, error.message))
        self.log.error("job_poisoned", job_id=job.id, executions=executions - 1)
        self._fail(job.id, error, pending.message)
        return True

    def _infer(self, model: LoadedModel, batch: list[_Pending]) -> list[Arrays | InferqError]:
        try:
            outputs = model.run(collate([p.inputs for p in batch], self.input_names))
            return list(split(outputs, [p.rows for p in batch]))
        except Exception as exc:
            if len(batch) > 1:
                # Run each job alone so one job the model rejects fails by itself.
                return [r for p in batch for r in self._infer(model, [p])]
            self.log.warning("job_run_failed", job_id=batch[0].job.id, error=str(exc))
            return [InternalError(f"the model failed on this job: {exc}")]

    # --- results ---------------------------------------------------------------------

    def _succeed(self, pending: _Pending, outputs: Arrays, batch: _BatchInfo) -> None:
        job = pending.job
        origin = job.enqueued_at if job.enqueued_at is not None else pending.picked_at
        timings = {
            "queued": _ms(pending.picked_at - job.enqueued_at)
            if job.enqueued_at is not None else None,
            "batch_wait": _ms(batch.started - pending.picked_at),
            "inference": _ms(batch.finished - batch.started),
            "total": _ms(batch.stored - origin),
        }
        result = {
            "outputs": {k: contract.encode_tensor(v, text=True) for k, v in outputs.items()},
            "model": self.name,
            "version": batch.model.version,
            "worker": self.worker,
            "batch_size": batch.rows,
            "timings_ms": timings,
        }
        doc = contract.success_document(job.id, result, batch.date_done)
        self._docs.append((job.id, doc, pending.message.notify))
        if job.id in self._sampled:
            self._sampled.discard(job.id)
            self._events.append(TaskEvents.succeeded(
                job.id, f"v{batch.model.version} batch {batch.rows}",
                batch.finished - batch.started))
        pending.message.open_jobs -= 1

    def _observe(self, batch: list[_Pending], parts: list[Arrays | InferqError],
                 shared: _BatchInfo, version: int) -> None:
        assert self.metrics is not None
        self.metrics.batch_done(self.name, version, shared.rows, shared.finished - shared.started)
        ok = [p for p, o in zip(batch, parts, strict=True) if not isinstance(o, InferqError)]
        if ok:
            self.metrics.jobs_done_bulk(
                self.name, version, "OK",
                queue_s=[p.picked_at - p.job.enqueued_at for p in ok
                         if p.job.enqueued_at is not None],
                batch_wait_s=[shared.started - p.picked_at for p in ok],
                latency_s=[shared.stored - (p.picked_at if p.job.enqueued_at is None
                                            else p.job.enqueued_at) for p in ok])

    def _fail(self, job_id: str, error: InferqError, message: _Message,
              version: int | None = None) -> None:
        # The model label is this server's name, never the client's: no unbounded labels.
        if self.metrics is not None:
            self.metrics.job_done(self.name, version, error.code, None, None, None)
        self.log.info("job_failed", job_id=job_id, code=error.code, message=error.message)
        self._docs.append((job_id, contract.failure_document(job_id, error), message.notify))
        if job_id in self._sampled:
            self._sampled.discard(job_id)
            self._events.append(TaskEvents.failed(job_id, str(error)))
        elif self.events.admit():
            self._events += [TaskEvents.received(job_id, self.name, 0),
                             TaskEvents.failed(job_id, str(error))]
        message.open_jobs -= 1

    def _complete(self, inline: bool = False) -> None:
        """Hand finished documents, then the acks of messages with nothing left open, to the
        writer (or write them here when ``inline`` and the writer has nothing pending)."""
        done = [m for m in self._touched if m.open_jobs <= 0]
        if self._docs or done or self._events:
            item = Completed(self._docs, [m.tag for m in done], [b for m in done for b in m.blobs],
                             self._events)
            if not (inline and self.writer.write_if_idle(item)):
                self.writer.submit(item)
            self._docs, self._events = [], []
            self._touched = [m for m in self._touched if m.open_jobs > 0]


def _ms(seconds: float) -> float:
    # Microsecond resolution; int() is cheaper than round() on this per-job path.
    return int(seconds * 1e6) / 1000.0 if seconds > 0 else 0.0



