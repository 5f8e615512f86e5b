"""The producer: submit jobs to Redis and read their results in bulk."""

from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import redis

from producer import submission, waiting, wire
from producer.catalog import ModelCatalog, live_count_args, parse_models, routes_args
from producer.errors import InferqError, JobFailed
from producer.jobs import JobHandle, JobResult, JobStatus
from producer.submission import ModelInfo, VersionSpec
from producer.wire.connect import broker_url as env_broker_url
from producer.wire.connect import connect

__all__ = ["InferenceClient", "ModelInfo"]


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
        self.queue_without_workers = waiting.queue_without_workers(queue_without_workers)
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
        self._restarts = waiting.RestartWatch()
        self._catalog = ModelCatalog()
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

    @property
    def _models(self) -> dict[str, ModelInfo]:
        return self._catalog.live

    @property
    def _known(self) -> dict[str, ModelInfo]:
        return self._catalog.known

    def models(self, refresh: bool = True) -> dict[str, ModelInfo]:
        """Models that live workers serve, by name (a worker's heartbeat keeps its models
        advertised; they drop out within seconds of its last one)."""
        if refresh or not self._catalog.fresh():
            known = parse_models(self._call(self._broker.hgetall, wire.MODELS_KEY))
            replies: list[Any] = []
            if known:
                pipe = self._broker.pipeline(transaction=False)
                for name in known:
                    pipe.zcount(*live_count_args(name))
                pipe.mget(routes_args(list(known)))
                replies = self._call(pipe.execute, raise_on_error=False)
            with self._lock:
                self._catalog.read(known, replies)
        return self._catalog.live

    def model(self, name: str, version: int | None = None) -> ModelInfo | None:
        """The signature a job for ``name`` is checked against, refusing as ``submit`` would
        (ModelNotFound, Unavailable); None when queueing for workers while none ever
        registered the model."""
        return self._model_info(name, version)

    def _model_info(self, model: str, version: int | None) -> ModelInfo | None:
        info = self._catalog.cached(model, version)
        if info is None:
            self.models(refresh=False)
            return self._catalog.lookup(model, version,
                                        queue_without_workers=self.queue_without_workers)
        return info

    # --- submitting ------------------------------------------------------------------

    def _prepare(
        self, model: str, inputs: Mapping[str, Any], version: int | None, job_id: str,
        blobs: submission.Blobs, text: bool, blob_threshold: int,
    ) -> dict[str, wire.Tensor]:
        info = self._model_info(model, version) if self.validate else None
        return submission.prepare(info, inputs, job_id, blobs, text=text,
                                  blob_threshold=blob_threshold)

    def _push(
        self, target: str, model: str, messages: list[bytes], blobs: submission.Blobs,
        jobs: list[list[str]],
    ) -> None:
        """Blobs first, then the messages that name them (``jobs``: each message's job
        IDs), in one round trip; refuse with RESOURCE_EXHAUSTED (and take the blobs back)
        when the model's queue is full."""
        if not self._restarts.started:
            self._restarts.restarted(self._run_id())
        push = submission.Push.plan(target, model, self._catalog.registered(model),
                                    self.blob_ttl)
        replies = self._transact(push, messages, blobs, jobs)
        if push.refused(replies, len(blobs)):
            # The transaction ran, blobs included: take them back before refusing.
            if blobs:
                with contextlib.suppress(InferqError, redis.exceptions.RedisError):
                    self._call(self._broker.unlink, *blobs)
            raise push.full()

    def _transact(self, push: submission.Push, messages: list[bytes],
                  blobs: submission.Blobs, jobs: list[list[str]]) -> list[Any]:
        try:
            return self._transaction(push, messages, blobs, jobs)
        except redis.exceptions.NoScriptError:
            # Redis lost its script cache (restart, SCRIPT FLUSH): nothing was pushed and the
            # blob writes repeat harmlessly, so load the script and run it all again.
            self._call(self._broker.script_load, submission.PUSH_SCRIPT)
            return self._transaction(push, messages, blobs, jobs)

    def _transaction(self, push: submission.Push, messages: list[bytes],
                     blobs: submission.Blobs, jobs: list[list[str]]) -> list[Any]:
        calls = push.script_calls(messages, jobs)
        if not blobs and len(calls) == 1:
            # One script call is atomic on its own: no MULTI/EXEC to send and parse (about
            # 25 us of a lone submit()), and execute_command, not redis-py's evalsha().
            return [self._call(self._broker.execute_command, "EVALSHA",
                               submission.PUSH_SCRIPT_SHA, *calls[0])]
        pipe = self._broker.pipeline(transaction=True)
        for key, data in blobs.items():
            pipe.set(key, data, ex=push.ttl)
        for args in calls:
            # EVALSHA itself: a script object in a pipeline asks SCRIPT EXISTS first, one
            # more round trip on every submit.
            pipe.evalsha(submission.PUSH_SCRIPT_SHA, *args)
        return list(self._call(pipe.execute))

    def _run_id(self) -> str:
        try:
            return waiting.run_id_of(self._call(self._results.info, "server"))
        except redis.exceptions.ResponseError:
            return ""  # INFO not allowed (ACL) or not served: restarts go undetected

    def _envelope(self, model: str, version: int | None, deadline: float | None,
                  priority: int, route: str | None = None) -> submission.Envelope:
        return submission.envelope(model, self.client_id, self.serializer, version, deadline,
                                   priority, route)

    def _pin(self, model: str, version: VersionSpec, keys: Sequence[str]
             ) -> tuple[list[int | None], str | None]:
        """Each job's version (``keys``: what its split is hashed on) and the route that
        chose them, from routes at most one catalog refresh old."""
        if self._catalog.needs_read(version):
            self.models(refresh=False)
        return self._catalog.pin(model, version, keys)

    def submit(
        self,
        model: str,
        inputs: Mapping[str, Any],
        *,
        version: VersionSpec = None,
        deadline: float | None = None,
        priority: int = 0,
        route_key: str | None = None,
    ) -> JobHandle:
        """Enqueue one job and return its handle at once.

        ``inputs`` maps input names to arrays (or nested lists). ``version``: a number, an
        alias (``"canary"``, ``inferq alias``), ``"latest"``, or None for the model's route
        (``inferq route``: one version or a weighted split); it is resolved here and pinned
        in the message, so a redelivered job runs the version it was given. ``route_key``:
        the same key always gets the same version of a split (sticky assignment; default
        the job ID). ``deadline`` is in seconds from now; a job still queued past it fails
        with DEADLINE_EXCEEDED. ``priority``: as in Celery on Redis, 0 (the default) is
        served first and 9 last; a worker always drains higher-priority messages first
        (batch jobs use 9).
        """
        job_id = wire.new_id()
        (pinned,), route = self._pin(model, version, [route_key or job_id])
        blobs: submission.Blobs = {}
        tensors = self._prepare(model, inputs, pinned, job_id, blobs,
                                text=self.serializer == "json",
                                blob_threshold=self.blob_threshold)
        env = self._envelope(model, pinned, deadline, priority, route)
        message = submission.single_message(env, job_id, tensors)
        self._push(env.queue, model, [message], blobs, [[job_id]])
        return JobHandle(self, job_id, model, fresh=True)

    def submit_many(
        self,
        model: str,
        inputs: Iterable[Mapping[str, Any]],
        *,
        version: VersionSpec = None,
        deadline: float | None = None,
        jobs_per_message: int = submission.DEFAULT_JOBS_PER_MESSAGE,
        priority: int = 0,
        route_key: str | None = None,
    ) -> list[JobHandle]:
        """Enqueue many jobs in one pipelined round trip; each job keeps its own ID.

        ``version`` and ``route_key`` as in :meth:`submit`: under a split, each job is
        assigned by its own ID (or all by ``route_key``). Jobs travel ``jobs_per_message``
        to a message. The entries of a message are stored raw (msgpack) under a blob key
        the message names, so Redis holds tensor bytes once and without base64.
        """
        items = list(inputs)
        ids = [wire.new_id() for _ in items]
        versions, route = self._pin(model, version, [route_key or i for i in ids])
        blobs: submission.Blobs = {}
        prepared = [
            self._prepare(model, item, v, job_id, blobs, text=False,
                          blob_threshold=submission.bulk_blob_threshold(self.blob_threshold))
            for job_id, item, v in zip(ids, items, versions, strict=True)
        ]
        env = self._envelope(model, versions[0] if len(set(versions)) == 1 else None,
                             deadline, priority, route)
        messages = submission.bulk_messages(env, ids, prepared, blobs, jobs_per_message,
                                            versions)
        if messages:
            per = [ids[s:s + jobs_per_message] for s in range(0, len(ids), jobs_per_message)]
            self._push(env.queue, model, messages, blobs, per)
        return [JobHandle(self, i, model, fresh=True) for i in ids]

    def map(
        self,
        model: str,
        rows: Iterable[Mapping[str, Any]],
        *,
        chunk_rows: int | None = None,
        max_in_flight: int = 16,
        version: VersionSpec = None,
        priority: int = 9,
        timeout: float = 600.0,
    ) -> Iterator[JobResult | JobFailed]:
        """Run every item of ``rows`` through ``model``; yield one outcome per item, in
        input order.

        An item is one job's inputs as :meth:`submit` takes them (usually one row, without
        the batch axis). Consecutive items are stacked into jobs of up to ``chunk_rows``
        rows (default: the model's ``max_batch_rows``), submitted at ``priority`` (9, last:
        online jobs go first) only as outcomes are consumed, with at most
        ``max_in_flight`` jobs submitted and not yet handed back. Item ``i``'s outcome is
        what ``submit(model, rows[i]).result()`` would return, its outputs sliced from the
        job it travelled in, or the job's :class:`JobFailed` (shared by the job's items).
        The model is looked up at once; :class:`JobTimeout` ends the iteration when a job
        stays unanswered for ``timeout`` seconds.
        """
        from producer.mapping import map_rows

        return map_rows(self, model, rows, chunk_rows=chunk_rows, max_in_flight=max_in_flight,
                        version=version, priority=priority, timeout=timeout)

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
        # Jobs this client just enqueued were accepted; others are looked up once, when no
        # result came for a while (a busy wait never pays the lookup).
        unverified = not just_submitted
        while True:
            yield from self._read(pending, check)
            if not pending:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0 and unverified:
                # Out of time before any quiet look: tell unknown IDs apart first.
                unverified = False
                yield from self._unknown(pending)
                if not pending:
                    return
            if remaining <= 0:
                raise waiting.timed_out(list(pending), total, timeout)
            notified = self._wait_notified(min(remaining, waiting.FULL_RECHECK_S),
                                           len(pending) > 1)
            now = time.monotonic()
            if notified:
                quiet_since = now
                check = []
                for job_id, doc in notified:
                    if job_id not in pending:
                        continue
                    if doc is None:
                        check.append(job_id)
                    else:  # the result came with its notification: nothing to read
                        pending.discard(job_id)
                        yield job_id, wire.read_result(job_id, doc)
            elif now - quiet_since >= waiting.FULL_RECHECK_S:
                # No notification for a while (another thread took them, or a worker that
                # does not notify wrote the result): read every pending key once.
                check, quiet_since = list(pending), now
                self._check_server(len(pending))
                if unverified:
                    unverified = False
                    yield from self._unknown(pending)
                    if not pending:
                        return
                    check = list(pending)
            else:
                check = []

    def _check_server(self, pending: int) -> None:
        """Raise Unavailable when Redis restarted without persistence: jobs are gone."""
        if not self._restarts.restarted(self._run_id()):
            return  # the first look, or the same server
        persistence = self._call(self._results.info, "persistence")
        lost = self._restarts.lost(pending, bool(int(persistence.get("aof_enabled", 0))))
        if lost is not None:
            raise lost

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
                yield job_id, waiting.unknown_job(job_id)

    def _read(
        self, pending: set[str], ids: list[str]
    ) -> Iterator[tuple[str, JobResult | JobFailed]]:
        for chunk in waiting.chunks(ids):
            docs = self._call(self._results.mget, [wire.result_key(i) for i in chunk])
            for job_id, raw in zip(chunk, docs, strict=True):
                if raw is not None and job_id in pending:
                    pending.discard(job_id)
                    yield job_id, wire.read_result(job_id, raw)

    def _wait_notified(self, timeout: float, drain: bool) -> list[tuple[str, bytes | None]]:
        """Notified (job ID, inline result or None), after blocking up to ``timeout``."""
        popped = self._call(self._results.blpop, [self._notify_key], timeout=max(timeout, 0.001))
        if popped is None:
            return []
        # One job waited for: its own notification is enough, skip the extra round trip.
        rest = (self._call(self._results.lpop, self._notify_key, waiting.NOTIFY_POP)
                if drain else None)
        return [wire.notify_entry(popped[1]), *(wire.notify_entry(r) for r in rest or ())]

    # --- errors ----------------------------------------------------------------------

    @staticmethod
    def _call(fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except redis.exceptions.RedisError as exc:
            error = waiting.redis_failure(exc)
            if error is None:
                raise
            raise error from exc

