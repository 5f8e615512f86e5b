"""From drained messages to jobs ready to batch: parse, fetch what travelled by reference,
skip jobs already done before a redelivery, check each job on its own.

Every job of a readable message gets an outcome: it waits for a batch, or fails here with
a typed error for that job only. A message without even a job ID is dead-lettered.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis
import structlog

from producer import wire
from producer.errors import InvalidInput, JobFailed, ModelNotFound
from producer.wire import Delivery, JobRequest, TensorSpec
from producer.wire.routes import choose
from workers.ops import deadletter
from workers.serving import validation
from workers.serving.batching import Arrays, rows_per_message
from workers.serving.inflight import InFlight, Message
from workers.serving.observers import Observer
from workers.serving.reader import Drained
from workers.serving.routing import RouteBook

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class Pending:
    """A decoded, checked job waiting for its batch."""

    job: JobRequest
    version: int
    inputs: Arrays
    rows: int
    message: Message
    picked_at: float
    #: Non-batch dimensions per input, in signature order: jobs batch only with equal ones.
    shape: tuple[tuple[int, ...], ...] = ()
    #: How the version was chosen (``pinned``, ``alias:canary``, ``split:<rev>``, ``latest``).
    route: str = "latest"
    #: Redelivered after a crash: run alone, and counted, so a poison job is isolated.
    suspect: bool = False


#: A job that failed before reaching a batch, the message that carried it, and the version
#: it resolved to (None when it failed before that).
Failure = tuple[str, JobFailed, Message, int | None]


@dataclass(frozen=True)
class Checks:
    """What a job is checked against: the model's queue, versions and signature.

    Replaced whole (never changed in place) when versions are loaded or unloaded while
    serving, so a job is checked against one consistent set.
    """

    model: str
    versions: frozenset[int]
    inputs: Sequence[TensorSpec]
    max_tensor_bytes: int
    reject_nonfinite: bool
    #: Version of the jobs that name none and no route places (None: the highest loaded).
    #: Lower than the highest while a version removed from the repository is still loaded.
    latest: int | None = None


class Intake:
    """Turns drained messages into pending jobs and early failures for one model server."""

    def __init__(self, checks: Checks, broker: redis.Redis, results: redis.Redis,
                 inflight: InFlight, observer: Observer, routes: RouteBook | None = None,
                 pin_ttl_s: int = 86_400,
                 background: Callable[[str], bool] = lambda tag: False) -> None:
        self.checks = checks
        #: Whether a delivery tag names a message of the lowest-priority list (batch runs).
        self.background = background
        self.routes = routes
        self.pin_ttl_s = pin_ttl_s
        self.broker, self.results = broker, results
        self.inflight = inflight
        self.observer = observer
        #: When a job for each version was last taken (epoch seconds): a version removed from
        #: the repository stays loaded while jobs still come for it.
        self.seen: dict[int, float] = {}
        #: Running average, for sizing the next drain to the room left in a batch.
        self.rows_per_message = 8.0

    def take(self, drained: Sequence[Drained], picked_at: float
             ) -> tuple[list[Pending], list[Failure]]:
        """Parse and check ``drained`` messages picked up at ``picked_at``."""
        parsed = []
        known: dict[str, bytes | None] = {}
        for tag, raw, brought in drained:
            if brought:
                known.update(brought)
            try:
                parsed.append((tag, wire.parse_message(raw, self.broker_queue)))
            except Exception as exc:
                # Without a job ID there is nobody to report to: keep it for people to read.
                log.error("message_dead_lettered", model=self.checks.model, reason=str(exc),
                          head=raw[:200].decode("latin-1"))
                deadletter.dead_letter_message(self.broker, tag, self.broker_queue, raw,
                                               str(exc))
        deliveries = [d for _, d in parsed]
        self._attach_entries(deliveries, known)
        blobs = self._fetch_blobs(deliveries, known)
        pending: list[Pending] = []
        failures: list[Failure] = []
        for tag, delivery in parsed:
            self._accept(tag, delivery, picked_at, blobs, pending, failures)
        return pending, failures

    @property
    def broker_queue(self) -> str:
        return wire.queue_name(self.checks.model)

    def _attach_entries(self, deliveries: list[Delivery], known: Mapping[str, bytes | None]
                        ) -> None:
        """Attach the entries of bulk messages that carry them by reference: those the
        drain brought (``known``), the others read in one round trip."""
        by_ref = [d for d in deliveries if d.entries_ref is not None]
        if not by_ref:
            return
        known = self._read([str(d.entries_ref) for d in by_ref], known)
        for delivery in by_ref:
            wire.attach_entries(delivery, known[str(delivery.entries_ref)])

    def _fetch_blobs(self, deliveries: list[Delivery], known: Mapping[str, bytes | None]
                     ) -> Mapping[str, bytes | None]:
        """Every by-reference tensor of these messages: those the drain brought
        (``known``), the others read in one round trip."""
        return self._read([key for d in deliveries if d.columns is None for job in d.jobs
                           for key in job.refs], known)

    def _read(self, keys: list[str], known: Mapping[str, bytes | None]
              ) -> Mapping[str, bytes | None]:
        """``known`` with the values of ``keys`` it lacks, read in one round trip."""
        missing = [key for key in keys if key not in known]
        if not missing:
            return known
        values: list[Any] = self.broker.mget(missing)
        return {**known, **dict(zip(missing, values, strict=True))}

    def _accept(self, tag: str, delivery: Delivery, picked_at: float,
                blobs: Mapping[str, bytes | None], pending: list[Pending],
                failures: list[Failure]) -> None:
        message = self.inflight.add(tag, delivery.notify_to,
                                    len(delivery.jobs) + len(delivery.failed),
                                    delivery.owned_blobs(), self.background(tag))
        for job_id, error in delivery.failed:
            failures.append((job_id, _job_failed(error), message, None))
        jobs = delivery.jobs
        if delivery.redelivered:
            done = self._already_done(jobs)
            for _ in done:  # finished before the crash that redelivered its message
                self.inflight.close(message)
            jobs = [j for j in jobs if j.id not in done]
        if jobs:
            self.observer.received([j.id for j in jobs], delivery.redelivered)
        routed = self._route(jobs, delivery.redelivered)
        checks = self.checks
        alike: Sequence[tuple[Arrays, int] | InvalidInput] | None = None
        if delivery.columns is not None:
            alike = validation.decode_columns(
                delivery.columns, [j.column_row or 0 for j in jobs], checks.inputs,
                max_tensor_bytes=checks.max_tensor_bytes,
                reject_nonfinite=checks.reject_nonfinite)
        elif len(jobs) > 1:
            alike = validation.decode_uniform(
                [j.inputs for j in jobs], checks.inputs,
                max_tensor_bytes=checks.max_tensor_bytes,
                reject_nonfinite=checks.reject_nonfinite)
        # Jobs decoded together share their non-batch dimensions: worked out once.
        shape = None
        rows = 0
        for i, job in enumerate(jobs):
            try:
                checked = self._check(job, message, picked_at, blobs, routed.get(job.id),
                                      None if alike is None else alike[i], shape)
            except _Refused as refused:
                failures.append((job.id, refused.error, message, refused.version))
                continue
            checked.suspect = delivery.redelivered
            if alike is not None:
                shape = checked.shape
            pending.append(checked)
            self.seen[checked.version] = picked_at
            rows += checked.rows
        if delivery.jobs:
            self.rows_per_message = rows_per_message(self.rows_per_message, rows)

    def _route(self, jobs: list[JobRequest], redelivered: bool
               ) -> dict[str, tuple[int, str]]:
        """Versions the model's split gives jobs that name none, pinned in Redis so that a
        redelivery runs the same version even if the route changed meanwhile."""
        route = self.routes.get(self.checks.model) if self.routes is not None else None
        unnamed = [j for j in jobs if j.version is None]
        if route is None or not route.split or not unnamed:
            return {}
        pins: list[Any] = (self.results.mget([wire.pin_key(j.id) for j in unnamed])
                           if redelivered else [None] * len(unnamed))
        out, pipe = {}, self.results.pipeline(transaction=False)
        for job, pin in zip(unnamed, pins, strict=True):
            if pin is not None:
                out[job.id] = (int(pin), f"split:{route.rev}")
                continue
            version = choose(route.split, job.id)
            out[job.id] = (version, f"split:{route.rev}")
            pipe.set(wire.pin_key(job.id), version, ex=self.pin_ttl_s)
        pipe.execute()
        return out

    def _already_done(self, jobs: list[JobRequest]) -> set[str]:
        pipe = self.results.pipeline(transaction=False)
        for job in jobs:
            pipe.exists(wire.result_key(job.id))
        return {j.id for j, found in zip(jobs, pipe.execute(), strict=True) if found}

    def _check(self, job: JobRequest, message: Message, picked_at: float,
               blobs: Mapping[str, bytes | None], routed: tuple[int, str] | None = None,
               decoded: tuple[Arrays, int] | InvalidInput | None = None,
               shape: tuple[tuple[int, ...], ...] | None = None) -> Pending:
        """Check ``job``; ``decoded``: its inputs, decoded and checked with its message's
        other jobs (:func:`validation.decode_uniform`, :func:`validation.decode_columns`),
        or why they failed; ``shape``: their non-batch dimensions, when known."""
        checks = self.checks
        version: int | None = None
        try:
            chosen = routed[0] if routed else checks.latest
            if job.version is None and chosen is None and not checks.versions:
                raise ModelNotFound(f"model {checks.model!r} has no version loaded")
            version = validation.resolve_version(job, checks.model, checks.versions, chosen)
            validation.check_deadline(job, picked_at)
            if isinstance(decoded, InvalidInput):
                raise decoded
            arrays, rows = decoded or validation.decode_inputs(
                job.inputs, checks.inputs, blobs, max_tensor_bytes=checks.max_tensor_bytes,
                reject_nonfinite=checks.reject_nonfinite)
        except JobFailed as exc:
            raise _Refused(exc, version) from None
        except Exception as exc:
            # Whatever a hostile payload triggers fails that job, never the worker.
            raise _Refused(InvalidInput(f"malformed job: {exc!r}"), version) from None
        if shape is None:
            shape = tuple(arrays[s.name].shape[1:] for s in checks.inputs)
        route = job.route or (routed[1] if routed else
                              "pinned" if job.version is not None else "latest")
        return Pending(job, version, arrays, rows, message, picked_at, shape, route)


class _Refused(Exception):
    """A job that failed its checks, with the version it had resolved to by then."""

    def __init__(self, error: JobFailed, version: int | None) -> None:
        super().__init__(error.message)
        self.error, self.version = error, version


def _job_failed(error: Exception) -> JobFailed:
    return error if isinstance(error, JobFailed) else InvalidInput(str(error))
