"""The producer: submit jobs to Redis and read their results in bulk."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import redis

from producer import submission, wire
from producer.errors import (
    InferqError,
    InvalidInput,
    JobFailed,
    JobTimeout,
    ResourceExhausted,
    Unavailable,
    UnknownJob,
)
from producer.jobs import JobHandle, JobResult, JobStatus
from producer.submission import ModelInfo
from producer.wire.connect import broker_url as env_broker_url
from producer.wire.connect import connect

__all__ = ["InferenceClient", "ModelInfo"]
#: How often a waiting caller re-reads every pending key, in case a notification was missed.
_FULL_RECHECK_S = 0.1
_MGET_CHUNK = 1000
_SIGNATURE_REFRESH_S = 1.0


def _redis(url: str, timeout: float) -> redis.Redis:
    # One quick retry for a dropped connection; never more, so a call is bounded by about
    # twice the socket timeout instead of redis-py's default backoff series.
    return connect(url, timeout=timeout, retries=1)


class InferenceClient:
    """Submit inference jobs and collect their results.

    ``broker_url`` and ``result_url`` default to ``$INFERQ_BROKER_URL`` and
    ``$INFERQ_RESULT_URL``, else ``redis://localhost:6379/0``. Every Redis call is bounded
    by ``socket_timeout`` seconds (2 s, one retry) and fails with :class:`Unavailable` past
    it.
    """

    def __init__(
        self,
        broker_url: str | None = None,
        result_url: str | None = None,
        *,
        serializer: str = "msgpack",
        socket_timeout: float = 2.0,
        validate: bool = True,
        queue_without_workers: bool | None = None,
        blob_threshold: int = submission.DEFAULT_BLOB_THRESHOLD,
        blob_ttl: int = 86_400,
    ) -> None:
        if serializer not in wire.CONTENT_TYPES:
            raise ValueError(f"serializer must be one of {sorted(wire.CONTENT_TYPES)}")
        self.broker_url = broker_url or env_broker_url()
        self.result_url = result_url or os.environ.get("INFERQ_RESULT_URL") or self.broker_url
        self.serializer = serializer
        self.validate = validate
        #: Accept jobs for a model no live worker serves (they wait for workers that scale
        #: from zero); by default such a submit fails at once with Unavailable.
        self.queue_without_workers = (
            os.environ.get("INFERQ_QUEUE_WITHOUT_WORKERS", "").lower() in ("1", "true", "yes")
            if queue_without_workers is None else queue_without_workers)
        self.blob_threshold = blob_threshold
        #: Seconds by-reference data lives at least; longer when the serving workers'
        #: visibility timeout needs it to outlive a redelivery (they advertise it).
        self.blob_ttl = blob_ttl
        self.client_id = uuid.uuid4().hex
        self._notify_key = wire.notify_key(self.client_id)
        self._broker = _redis(self.broker_url, socket_timeout)
        self._results = (
            self._broker
            if self.result_url == self.broker_url
            else _redis(self.result_url, socket_timeout)
        )
        self._push_script = self._broker.register_script(submission.PUSH_SCRIPT)
        self._server_run_id: str | None = None
        self._models: dict[str, ModelInfo] = {}
        self._known: dict[str, ModelInfo] = {}
        self._models_read_at = -1e9
        self._lock = threading.Lock()

    def close(self) -> None:
        """Close the Redis connections."""
        self._broker.close()
        if self._results is not self._broker:
            self._results.close()

    def __enter__(self) -> InferenceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- models --------------------------------------------------------------------

    def models(self, refresh: bool = True) -> dict[str, ModelInfo]:
        """Models that live workers serve, by name (a worker's heartbeat keeps its models
        advertised; they drop out within seconds of its last one)."""
        if refresh or time.monotonic() - self._models_read_at > _SIGNATURE_REFRESH_S:
            raw = self._call(self._broker.hgetall, wire.MODELS_KEY)
            known = {k.decode(): ModelInfo(k.decode(), json.loads(v)) for k, v in raw.items()}
            pipe = self._broker.pipeline(transaction=False)
            for name in known:
                pipe.zcount(wire.live_key(name), wire.now(), "+inf")
            counts = self._call(pipe.execute) if known else []
            with self._lock:
                self._known = known
                self._models = {n: i for (n, i), c in zip(known.items(), counts, strict=True)
                                if c}
                self._models_read_at = time.monotonic()
        return self._models

    def model(self, name: str, version: int | None = None) -> ModelInfo | None:
        """The signature a job for ``name`` is checked against, refusing as ``submit`` would
        (ModelNotFound, Unavailable); None when queueing for workers while none ever
        registered the model."""
        return self._model_info(name, version)

    def _model_info(self, model: str, version: int | None) -> ModelInfo | None:
        info = self._models.get(model)
        # Re-read at most once a second: a model whose last worker stopped is refused soon
        # after, not only when this cache misses.
        stale = time.monotonic() - self._models_read_at > _SIGNATURE_REFRESH_S
        if stale or info is None or (version is not None and version not in info.versions):
            live = self.models(refresh=False)
            return submission.lookup(live, self._known, model, version,
                                     queue_without_workers=self.queue_without_workers)
        return info

    # --- submitting ------------------------------------------------------------------

    def _prepare(
        self, model: str, inputs: Mapping[str, Any], version: int | None, job_id: str,
        blobs: submission.Blobs, text: bool,
    ) -> dict[str, wire.Tensor]:
        info = self._model_info(model, version) if self.validate else None
        return submission.prepare(info, inputs, job_id, blobs, text=text,
                                  blob_threshold=self.blob_threshold)

    def _push(
        self, target: str, model: str, messages: list[bytes], blobs: submission.Blobs,
        jobs: list[list[str]],
    ) -> None:
        """Blobs first, then the messages that name them (``jobs``: each message's job
        IDs), in one round trip; refuse with RESOURCE_EXHAUSTED (and take the blobs back)
        when the model's queue is full."""
        if self._server_run_id is None:
            self._server_run_id = self._run_id()
        # A model queued for while no worker is live still has its registered bound.
        info = self._models.get(model) or self._known.get(model)
        bound = info.max_queue if info is not None else 0
        ttl = self.blob_ttl if info is None else max(self.blob_ttl, 4 * info.visibility_timeout)
        queue = wire.queue_name(model)
        lists = [target, *wire.priority_queues(queue)]
        replies = self._transact(lists, bound, ttl, messages, blobs, jobs)
        if any(r == -1 for r in replies[len(blobs):]):
            # The transaction ran, blobs included: take them back before refusing.
            if blobs:
                with contextlib.suppress(InferqError, redis.exceptions.RedisError):
                    self._call(self._broker.unlink, *blobs)
            raise ResourceExhausted(f"queue {queue!r} is full ({bound} messages waiting); "
                                    "retry later or add workers")

    def _transact(self, lists: list[str], bound: int, ttl: int, messages: list[bytes],
                  blobs: submission.Blobs, jobs: list[list[str]]) -> list[Any]:
        try:
            return self._transaction(lists, bound, ttl, messages, blobs, jobs)
        except redis.exceptions.NoScriptError:
            # Redis lost its script cache (restart, SCRIPT FLUSH): nothing was pushed and the
            # blob writes repeat harmlessly, so load the script and run it all again.
            self._call(self._broker.script_load, submission.PUSH_SCRIPT)
            return self._transaction(lists, bound, ttl, messages, blobs, jobs)

    def _transaction(self, lists: list[str], bound: int, ttl: int, messages: list[bytes],
                     blobs: submission.Blobs, jobs: list[list[str]]) -> list[Any]:
        # MULTI/EXEC: a refused write (noeviction) aborts the whole call, so a caller told
        # "refused" never has half its jobs enqueued.
        pipe = self._broker.pipeline(transaction=True)
        for key, data in blobs.items():
            pipe.set(key, data, ex=ttl)
        for start in range(0, len(messages), submission.PUSH_CHUNK):
            # EVALSHA itself: a script object in a pipeline asks SCRIPT EXISTS first, one
            # more round trip on every submit.
            chunk = slice(start, start + submission.PUSH_CHUNK)
            ids = [i for message_ids in jobs[chunk] for i in message_ids]
            pipe.evalsha(self._push_script.sha, len(lists), *lists, bound, ttl, len(ids),
                         *ids, *messages[chunk])
        return list(self._call(pipe.execute))

    def _run_id(self) -> str:
        try:
            return str(self._call(self._results.info, "server").get("run_id", ""))
        except redis.exceptions.ResponseError:
            return ""  # INFO not allowed (ACL) or not served: restarts go undetected

    def _envelope(self, model: str, version: int | None, deadline: float | None,
                  priority: int) -> submission.Envelope:
        if not isinstance(priority, int) or not 0 <= priority <= 9:
            raise InvalidInput(f"priority must be an integer from 0 (first) to 9 (last), "
                               f"got {priority!r}")
        return submission.Envelope(model, self.client_id, self.serializer, version, deadline,
                                   priority)

    def submit(
        self,
        model: str,
        inputs: Mapping[str, Any],
        *,
        version: int | None = None,
        deadline: float | None = None,
        priority: int = 0,
    ) -> JobHandle:
        """Enqueue one job and return its handle at once.

        ``inputs`` maps input names to arrays (or nested lists). ``deadline`` is in seconds
        from now; a job still queued past it fails with DEADLINE_EXCEEDED. ``priority``: as
        in Celery on Redis, 0 (the default) is served first and 9 last; a worker always
        drains higher-priority messages first (batch jobs use 9).
        """
        job_id = wire.new_id()
        blobs: submission.Blobs = {}
        tensors = self._prepare(model, inputs, version, job_id, blobs,
                                text=self.serializer == "json")
        env = self._envelope(model, version, deadline, priority)
        message = submission.single_message(env, job_id, tensors)
        self._push(env.queue, model, [message], blobs, [[job_id]])
        return JobHandle(self, job_id, model, fresh=True)

    def submit_many(
        self,
        model: str,
        inputs: Iterable[Mapping[str, Any]],
        *,
        version: int | None = None,
        deadline: float | None = None,
        jobs_per_message: int = submission.DEFAULT_JOBS_PER_MESSAGE,
        priority: int = 0,
    ) -> list[JobHandle]:
        """Enqueue many jobs in one pipelined round trip; each job keeps its own ID.

        Jobs travel ``jobs_per_message`` to a message. The entries of a message are stored
        raw (msgpack) under a blob key the message names, so Redis holds tensor bytes once
        and without base64.
        """
        items = list(inputs)
        ids = [wire.new_id() for _ in items]
        blobs: submission.Blobs = {}
        prepared = [
            self._prepare(model, item, version, job_id, blobs, text=False)
            for job_id, item in zip(ids, items, strict=True)
        ]
        env = self._envelope(model, version, deadline, priority)
        messages = submission.bulk_messages(env, ids, prepared, blobs, jobs_per_message)
        if messages:
            per = [ids[s:s + jobs_per_message] for s in range(0, len(ids), jobs_per_message)]
            self._push(env.queue, model, messages, blobs, per)
        return [JobHandle(self, i, model, fresh=True) for i in ids]

    # --- reading ---------------------------------------------------------------------

    def status(self, job_id: str) -> JobStatus:
        """PENDING until the job's result is stored, then SUCCESS or FAILURE; UNKNOWN for an
        ID with neither a result nor a record of being accepted."""
        key = wire.result_key(job_id)
        state = wire.read_status(self._call(self._results.get, key))
        if state != "PENDING" or self._call(self._broker.exists, wire.accepted_key(job_id)):
            return JobStatus(state)
        # The result may have been stored (and the marker deleted) between the two reads.
        state = wire.read_status(self._call(self._results.get, key))
        return JobStatus.UNKNOWN if state == "PENDING" else JobStatus(state)

    def results(self, job_ids: Sequence[str], timeout: float = 60.0) -> list[JobResult]:
        """Wait for every job; return results in order, raising the first JobFailed."""
        out = self.outcomes(job_ids, timeout=timeout)
        for item in out:
            if isinstance(item, JobFailed):
                raise item
        return out  # type: ignore[return-value]

    def outcomes(
        self, job_ids: Sequence[str], timeout: float = 60.0
    ) -> list[JobResult | JobFailed]:
        """Wait for every job; return a JobResult or a JobFailed for each, in order.

        Raises :class:`JobTimeout` if some job has no result after ``timeout`` seconds.
        """
        found = dict(self.as_completed(job_ids, timeout=timeout))
        return [found[i] for i in job_ids]

    def as_completed(
        self, job_ids: Iterable[str], timeout: float = 60.0, *, just_submitted: bool = False
    ) -> Iterator[tuple[str, JobResult | JobFailed]]:
        """Yield ``(job_id, JobResult or JobFailed)`` as results arrive.

        ``just_submitted`` (jobs this client enqueued a moment ago) skips the first read,
        which would find nothing: the worker's notification comes first.
        Raises :class:`JobTimeout` if some job has no result after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        pending = set(job_ids)
        total = len(pending)
        check: list[str] = [] if just_submitted else list(pending)
        quiet_since = time.monotonic()
        # Jobs this client just enqueued were accepted; others are looked up once.
        unverified = not just_submitted
        while True:
            yield from self._read(pending, check)
            if not pending:
                return
            if unverified:
                unverified = False
                yield from self._unknown(pending)
                if not pending:
                    return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                waiting = sorted(pending)
                shown = ", ".join(waiting[:5]) + (" ..." if len(waiting) > 5 else "")
                raise JobTimeout(
                    f"{len(pending)} of {total} jobs have no result after {timeout}s (still "
                    f"waiting: {shown}); they may still finish: read them later", waiting)
            notified = self._wait_notified(min(remaining, _FULL_RECHECK_S), len(pending) > 1)
            now = time.monotonic()
            if notified:
                quiet_since = now
                check = [i for i in notified if i in pending]
            elif now - quiet_since >= _FULL_RECHECK_S:
                # No notification for a while (another thread took them, or a worker that
                # does not notify wrote the result): read every pending key once.
                check, quiet_since = list(pending), now
                self._check_server(len(pending))
            else:
                check = []

    def _check_server(self, pending: int) -> None:
        """Raise Unavailable when Redis restarted without persistence: jobs are gone."""
        if self._server_run_id is None:
            self._server_run_id = self._run_id()
            return
        run_id = self._run_id()
        if run_id == self._server_run_id:
            return
        self._server_run_id = run_id
        persistence = self._call(self._results.info, "persistence")
        if not int(persistence.get("aof_enabled", 0)):
            raise Unavailable(
                f"Redis restarted without append-only persistence while {pending} jobs were "
                "pending: their messages and results are lost; submit them again")

    def _unknown(self, pending: set[str]) -> Iterator[tuple[str, JobResult | JobFailed]]:
        """Jobs of ``pending`` with no record of acceptance: an UnknownJob each (after one
        more look for a result stored meanwhile)."""
        ids = list(pending)
        pipe = self._broker.pipeline(transaction=False)
        for job_id in ids:
            pipe.exists(wire.accepted_key(job_id))
        missing = [i for i, known in zip(ids, self._call(pipe.execute), strict=True)
                   if not known]
        yield from self._read(pending, missing)
        for job_id in missing:
            if job_id in pending:
                pending.discard(job_id)
                yield job_id, UnknownJob(
                    "no such job: no result and no record of it being accepted (a wrong ID, "
                    "one whose result expired, or a job sent without inferq's client, which "
                    "becomes known only when answered)", job_id=job_id)

    def _read(
        self, pending: set[str], ids: list[str]
    ) -> Iterator[tuple[str, JobResult | JobFailed]]:
        for start in range(0, len(ids), _MGET_CHUNK):
            chunk = ids[start : start + _MGET_CHUNK]
            docs = self._call(self._results.mget, [wire.result_key(i) for i in chunk])
            for job_id, raw in zip(chunk, docs, strict=True):
                if raw is not None and job_id in pending:
                    pending.discard(job_id)
                    yield job_id, wire.read_result(job_id, raw)

    def _wait_notified(self, timeout: float, drain: bool) -> list[str]:
        popped = self._call(self._results.blpop, [self._notify_key], timeout=max(timeout, 0.001))
        if popped is None:
            return []
        # One job waited for: its own notification is enough, skip the extra round trip.
        rest = self._call(self._results.lpop, self._notify_key, 100_000) if drain else None
        return [popped[1].decode(), *(r.decode() for r in rest or ())]

    # --- errors ----------------------------------------------------------------------

    @staticmethod
    def _call(fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except redis.exceptions.ResponseError as exc:
            # redis-py raises OutOfMemoryError, and inside a pipeline a ResponseError that
            # quotes the command; both mean noeviction refused the write.
            if isinstance(exc, redis.exceptions.OutOfMemoryError) or "maxmemory" in str(exc):
                raise ResourceExhausted(f"Redis is full and refused the write: {exc}") from exc
            raise
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            raise Unavailable(f"Redis did not answer: {exc}") from exc
        except InferqError:
            raise
