"""The asyncio producer: the synchronous client's surface on redis-py's asyncio API.

Submitting goes through the same :mod:`producer.submission` (checks, messages, the push
transaction) and :mod:`producer.catalog` as :class:`~producer.client.InferenceClient`, and
raises the same error classes. Waiting is shared by every waiter of a client: one reader
task pops the client's ``inferq:notify:<client id>`` list (BLPOP) and hands the finished IDs
to a resolver task, which reads their results (MGET) and resolves each waiter's future; it
also re-reads every pending ID every 0.1 s, for results written without a notification.
With a single waiter the reader reads its result itself, as the sync client would.
Thousands of concurrent ``result()`` calls cost one blocked connection and a few MGETs, not
a connection each; a waiter that is cancelled takes its future out with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from producer import submission, waiting, wire
from producer.catalog import ModelCatalog, live_count_args, parse_models, routes_args
from producer.errors import InferqError, JobFailed, Unavailable
from producer.jobs import JobResult, JobStatus
from producer.submission import ModelInfo, VersionSpec
from producer.wire.connect import broker_url as env_broker_url
from producer.wire.connect import require_verified_tls

__all__ = ["AsyncInferenceClient", "AsyncJobHandle"]

T = TypeVar("T")
Outcome = JobResult | JobFailed
#: ``(key prefix, value, ttl_s)``: a key set per job with the push (see ``submit``).
Mark = tuple[str, str, int]
#: Finished IDs popped before anyone waited for them (a handle awaited a moment after its
#: submit), kept this long, and at most this many, for the waiter that comes.
_UNCLAIMED_S = 60.0
_UNCLAIMED_MAX = 100_000


def _pool(url: str, timeout: float, max_connections: int) -> aioredis.Redis:
    """A client on a small blocking pool: a caller beyond ``max_connections`` waits up to
    ``timeout`` for a free connection, then fails (Unavailable)."""
    require_verified_tls(url)
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=timeout, socket_timeout=timeout,
        socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 1))
    return aioredis.Redis(connection_pool=pool)


async def _call(awaitable: Awaitable[T]) -> T:
    """``awaitable``, its Redis failures raised as the inferq error they stand for."""
    try:
        result = await awaitable
    except redis.exceptions.RedisError as exc:
        _raise_if_cancelled()
        error = waiting.redis_failure(exc)
        if error is None:
            raise
        raise error from exc
    _raise_if_cancelled()
    return result


def _raise_if_cancelled() -> None:
    """Raise CancelledError in a task that was cancelled while a Redis call ran: redis-py
    can turn that cancellation into a connection error, and Python 3.11's ``wait_for`` (in
    its connection pool) can lose one that races a free connection — the caller would then
    wait on until its timeout. ``Task.cancelling()`` still counts it (Python >= 3.11)."""
    task = asyncio.current_task()
    if task is not None and getattr(task, "cancelling", lambda: 0)():
        raise asyncio.CancelledError


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class AsyncJobHandle:
    """A submitted job: its ID, and coroutines that read its status and result."""

    def __init__(self, client: AsyncInferenceClient, job_id: str, model: str, *,
                 fresh: bool = False) -> None:
        self._client = client
        self.id = job_id
        self.model = model
        self._fresh = fresh  # submitted by this client a moment ago, not yet waited on

    def __repr__(self) -> str:
        return f"AsyncJobHandle(id={self.id!r}, model={self.model!r})"

    async def status(self) -> JobStatus:
        """PENDING until the job's result is stored, then SUCCESS or FAILURE."""
        return await self._client.status(self.id)

    async def result(self, timeout: float = 60.0) -> JobResult:
        """Wait up to ``timeout`` seconds; raise JobFailed or JobTimeout."""
        fresh, self._fresh = self._fresh, False
        [outcome] = await self._client._outcomes([self.id], timeout, fresh=fresh)
        if isinstance(outcome, JobFailed):
            if outcome.model is None:
                outcome.model = self.model
            raise outcome
        return outcome


class _Waiters:
    """Every pending ``result()`` of one client: futures by job ID, the reader task that
    pops notifications, and the resolver task that reads results and settles futures."""

    def __init__(self, client: AsyncInferenceClient) -> None:
        self._client = client
        self.futures: dict[str, set[asyncio.Future[Outcome]]] = {}
        self._notified: set[str] = set()
        self._unclaimed: OrderedDict[str, float] = OrderedDict()
        self._poked = False
        self._waker: asyncio.Future[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        #: Set before the tasks are cancelled: redis-py may turn a cancellation inside a
        #: command into a connection error, which the loops would otherwise outlive.
        self._stopping = False

    # --- waiters -------------------------------------------------------------------

    def watch(self, job_id: str) -> asyncio.Future[Outcome]:
        """A future the resolver settles with ``job_id``'s outcome."""
        self.start()
        fut: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        was_idle = not self.futures
        self.futures.setdefault(job_id, set()).add(fut)
        if self._unclaimed.pop(job_id, None) is not None:
            # Its notification was popped before anyone waited: read it now.
            self._notified.add(job_id)
            self._poke()
        elif was_idle:
            self._poke()  # the resolver sleeps while nobody waits
        return fut

    def unwatch(self, job_id: str, fut: asyncio.Future[Outcome]) -> None:
        """Forget ``fut`` (settled, timed out or cancelled)."""
        if fut.done() and not fut.cancelled():
            fut.exception()  # retrieved: no "exception was never retrieved" at GC
        futs = self.futures.get(job_id)
        if futs is not None:
            futs.discard(fut)
            if not futs:
                del self.futures[job_id]

    def settle(self, job_id: str, outcome: Outcome) -> None:
        """Give every waiter of ``job_id`` its outcome."""
        for fut in self.futures.pop(job_id, ()):
            if not fut.done():
                fut.set_result(outcome)

    def fail_all(self, error: BaseException) -> None:
        """Fail every waiter (Redis unreachable, restarted without persistence, closed)."""
        futures, self.futures = self.futures, {}
        for futs in futures.values():
            for fut in futs:
                if not fut.done():
                    fut.set_exception(error)

    # --- tasks ---------------------------------------------------------------------

    def start(self) -> None:
        """Start the reader and resolver tasks on the running loop, once (again if one
        ended, or the client moved to another loop)."""
        loop = asyncio.get_running_loop()
        if (self._tasks and not any(t.done() for t in self._tasks)
                and self._tasks[0].get_loop() is loop):
            return
        for task in self._tasks:
            with contextlib.suppress(RuntimeError):  # its loop may be closed
                task.cancel()
        self._stopping = False
        self._tasks = [asyncio.create_task(self._listen(), name="inferq-notify-reader"),
                       asyncio.create_task(self._resolve(), name="inferq-result-resolver")]

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        self._stopping = True
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)

    @property
    def running(self) -> int:
        """Tasks of this client still running (0 after ``close``)."""
        return sum(not t.done() for t in self._tasks)

    def _poke(self) -> None:
        """Wake the resolver now (or spare it its next nap)."""
        self._poked = True
        if self._waker is not None:
            _wake(self._waker)

    async def _nap(self, timeout: float | None) -> None:
        """Sleep until poked, at most ``timeout`` seconds (None: until poked).

        A plain future and a timer, not ``wait_for`` on an event: Python 3.11's
        ``wait_for`` can swallow a cancellation that races the event, which would leave
        ``close()`` waiting on a task that never ends.
        """
        if not self._poked:
            loop = asyncio.get_running_loop()
            waker = self._waker = loop.create_future()
            timer = None if timeout is None else loop.call_later(timeout, _wake, waker)
            try:
                await waker
            finally:
                self._waker = None
                if timer is not None:
                    timer.cancel()
        self._poked = False

    async def _listen(self) -> None:
        """Pop this client's notification list; hand finished IDs to the resolver."""
        client = self._client
        results, key = client._results, client._notify_key
        block = max(min(1.0, client.socket_timeout / 2), 0.01)
        while not self._stopping:
            try:
                popped = await results.blpop([key], timeout=block)
            except Exception:  # Redis down: the resolver tells the waiters
                await asyncio.sleep(waiting.FULL_RECHECK_S)
                continue
            if popped is None:
                continue
            first, doc = wire.notify_entry(popped[1])  # type: ignore[arg-type]  # bytes
            if len(self.futures) == 1 and first in self.futures:
                # The one job waited for: its result came inline, or is read here, as the
                # sync client does (no hand-off to the resolver, no LPOP); then wait for
                # the next.
                try:
                    if doc is None or not self._settled(first, doc):
                        await self._client._read([first])
                except Exception:  # the resolver reads it again, and tells the waiter
                    pass
                else:
                    # Let the waiter run before this task sends its next BLPOP: that write
                    # is not on the caller's path.
                    await asyncio.sleep(0)
                    continue
            self._arrived([popped[1]])  # type: ignore[list-item]  # bytes (no decode_responses)
            if len(self.futures) <= len(self._notified):
                # Every waiter is answered: the next BLPOP takes whatever comes. The
                # resolver sends its MGET before this task sends that BLPOP.
                await asyncio.sleep(0)
                continue
            # The resolver reads the first ID while this task drains the rest.
            try:
                rest = await results.lpop(key, waiting.NOTIFY_POP)
            except Exception:
                await asyncio.sleep(waiting.FULL_RECHECK_S)
                continue
            if rest:
                self._arrived(rest)  # type: ignore[arg-type]  # a list (LPOP with a count)

    def _arrived(self, raws: Iterable[bytes]) -> None:
        """Settle waiters whose results came inline, hand the other notified IDs to the
        resolver; keep the rest for a waiter that comes (it reads the result)."""
        now = time.monotonic()
        for raw in raws:
            job_id, doc = wire.notify_entry(raw)
            if job_id not in self.futures:
                self._unclaimed[job_id] = now
            elif doc is None or not self._settled(job_id, doc):
                self._notified.add(job_id)
        self._trim(now)
        if self._notified:
            self._poke()

    def _settled(self, job_id: str, doc: bytes) -> bool:
        """Settle ``job_id``'s waiters with its inline result; False when it does not read
        (the resolver reads the stored one, and reports what is wrong with it)."""
        try:
            outcome = wire.read_result(job_id, doc)
        except Exception:
            return False
        self.settle(job_id, outcome)
        return True

    def _trim(self, now: float) -> None:
        while self._unclaimed and (len(self._unclaimed) > _UNCLAIMED_MAX
                                   or now - next(iter(self._unclaimed.values())) > _UNCLAIMED_S):
            self._unclaimed.popitem(last=False)

    async def _resolve(self) -> None:
        """Read the results of notified IDs at once, and of every pending ID every 0.1 s."""
        last_full = time.monotonic()
        while not self._stopping:
            if not self.futures:
                await self._nap(None)
                last_full = time.monotonic()  # the first full read 0.1 s from now
            due = last_full + waiting.FULL_RECHECK_S - time.monotonic()
            if not self._notified and due > 0:
                await self._nap(due)
            notified = [i for i in self._notified if i in self.futures]
            self._notified.clear()
            full = time.monotonic() - last_full >= waiting.FULL_RECHECK_S
            if full:
                last_full = time.monotonic()
            try:
                if full:
                    await self._client._read(list(self.futures))
                    await self._client._check_server(len(self.futures))
                elif notified:
                    await self._client._read(notified)
            except Exception as exc:  # Redis down, a corrupt result
                # What the synchronous client raises to its caller, every waiter gets.
                self.fail_all(exc)
                await asyncio.sleep(waiting.FULL_RECHECK_S)


class AsyncInferenceClient:
    """Submit inference jobs and collect their results from asyncio code.

    The same surface and errors as :class:`~producer.client.InferenceClient`, with
    coroutines: ``await client.submit(...)``, ``await handle.result(timeout)``,
    ``await client.results(ids, timeout)``. Use it as ``async with`` (or ``await
    client.close()``). ``max_connections`` bounds each Redis connection pool (one
    connection of the result pool stays with the notification reader).
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
        max_connections: int = 16,
    ) -> None:
        if serializer not in wire.CONTENT_TYPES:
            raise ValueError(f"serializer must be one of {sorted(wire.CONTENT_TYPES)}")
        if max_connections < 2:
            raise ValueError("max_connections must be at least 2 (the notification reader "
                             "holds one)")
        self.broker_url = broker_url or env_broker_url()
        self.result_url = result_url or os.environ.get("INFERQ_RESULT_URL") or self.broker_url
        self.serializer = serializer
        self.socket_timeout = socket_timeout
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
        self._broker = _pool(self.broker_url, socket_timeout, max_connections)
        self._results = (self._broker if self.result_url == self.broker_url
                         else _pool(self.result_url, socket_timeout, max_connections))
        self._restarts = waiting.RestartWatch()
        self._catalog = ModelCatalog()
        self._waiters = _Waiters(self)

    async def close(self) -> None:
        """Stop the reader, fail whoever still waits (Unavailable), close the pools."""
        await self._waiters.stop()
        self._waiters.fail_all(Unavailable("the client was closed while waiting"))
        for client in {id(c): c for c in (self._broker, self._results)}.values():
            await client.aclose()
            await client.connection_pool.disconnect()

    async def __aenter__(self) -> AsyncInferenceClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- models --------------------------------------------------------------------

    async def models(self, refresh: bool = True) -> dict[str, ModelInfo]:
        """Models that live workers serve, by name (a worker's heartbeat keeps its models
        advertised; they drop out within seconds of its last one)."""
        if refresh or not self._catalog.fresh():
            known = parse_models(await _call(self._broker.hgetall(wire.MODELS_KEY)))
            replies: list[Any] = []
            if known:
                pipe = self._broker.pipeline(transaction=False)
                for name in known:
                    pipe.zcount(*live_count_args(name))
                pipe.mget(routes_args(list(known)))
                replies = await _call(pipe.execute(raise_on_error=False))
            self._catalog.read(known, replies)
        return self._catalog.live

    async def model(self, name: str, version: int | None = None) -> ModelInfo | None:
        """The signature a job for ``name`` is checked against, refusing as ``submit`` would
        (ModelNotFound, Unavailable); None when queueing for workers while none ever
        registered the model."""
        return await self._model_info(name, version)

    async def _model_info(self, model: str, version: int | None) -> ModelInfo | None:
        info = self._catalog.cached(model, version)
        if info is None:
            await self.models(refresh=False)
            return self._catalog.lookup(model, version,
                                        queue_without_workers=self.queue_without_workers)
        return info

    # --- submitting ------------------------------------------------------------------

    async def submit(
        self,
        model: str,
        inputs: Mapping[str, Any],
        *,
        version: VersionSpec = None,
        deadline: float | None = None,
        priority: int = 0,
        route_key: str | None = None,
        mark: Mark | None = None,
    ) -> AsyncJobHandle:
        """Enqueue one job and return its handle at once (as ``InferenceClient.submit``).

        ``version``: a number, an alias, ``"latest"``, or None for the model's route,
        resolved here and pinned; ``route_key``: the same key, the same version of a split.
        ``deadline`` is in seconds from now; ``priority`` 0 (the default) is served first
        and 9 last. ``mark`` ``(prefix, value, ttl_s)``: also set ``prefix + job ID`` to
        ``value`` in the push's own transaction (the gateway records each job's API key).
        """
        job_id = wire.new_id()
        (pinned,), route = await self._pin(model, version, [route_key or job_id])
        info = await self._model_info(model, pinned) if self.validate else None
        blobs: submission.Blobs = {}
        tensors = submission.prepare(info, inputs, job_id, blobs,
                                     text=self.serializer == "json",
                                     blob_threshold=self.blob_threshold)
        env = submission.envelope(model, self.client_id, self.serializer, pinned, deadline,
                                  priority, route)
        message = submission.single_message(env, job_id, tensors)
        await self._push(env.queue, model, [message], blobs, [[job_id]], mark)
        return AsyncJobHandle(self, job_id, model, fresh=True)

    async def submit_many(
        self,
        model: str,
        inputs: Iterable[Mapping[str, Any]],
        *,
        version: VersionSpec = None,
        deadline: float | None = None,
        jobs_per_message: int = submission.DEFAULT_JOBS_PER_MESSAGE,
        priority: int = 0,
        route_key: str | None = None,
        mark: Mark | None = None,
    ) -> list[AsyncJobHandle]:
        """Enqueue many jobs in one transaction; each job keeps its own ID (as
        ``InferenceClient.submit_many``); ``mark`` as in :meth:`submit`."""
        items = list(inputs)
        ids = [wire.new_id() for _ in items]
        versions, route = await self._pin(model, version, [route_key or i for i in ids])
        infos = ({v: await self._model_info(model, v) for v in set(versions)}
                 if self.validate and items else {})
        blobs: submission.Blobs = {}
        prepared = [
            submission.prepare(infos.get(v), item, job_id, blobs, text=False,
                               blob_threshold=submission.bulk_blob_threshold(
                                   self.blob_threshold))
            for job_id, item, v in zip(ids, items, versions, strict=True)
        ]
        env = submission.envelope(model, self.client_id, self.serializer,
                                  versions[0] if len(set(versions)) == 1 else None, deadline,
                                  priority, route)
        messages = submission.bulk_messages(env, ids, prepared, blobs, jobs_per_message,
                                            versions)
        if messages:
            per = [ids[s:s + jobs_per_message] for s in range(0, len(ids), jobs_per_message)]
            await self._push(env.queue, model, messages, blobs, per, mark)
        return [AsyncJobHandle(self, i, model, fresh=True) for i in ids]

    async def _pin(self, model: str, version: VersionSpec, keys: Sequence[str]
                   ) -> tuple[list[int | None], str | None]:
        """Each job's version and the route that chose them (as the sync client)."""
        if self._catalog.needs_read(version):
            await self.models(refresh=False)
        return self._catalog.pin(model, version, keys)

    async def _push(self, target: str, model: str, messages: list[bytes],
                    blobs: submission.Blobs, jobs: list[list[str]],
                    mark: Mark | None = None) -> None:
        if not self._restarts.started:
            self._restarts.restarted(await self._run_id())
        push = submission.Push.plan(target, model, self._catalog.registered(model),
                                    self.blob_ttl)
        try:
            replies = await self._transaction(push, messages, blobs, jobs, mark)
        except redis.exceptions.NoScriptError:
            # Redis lost its script cache (restart, SCRIPT FLUSH): nothing was pushed and the
            # blob writes repeat harmlessly, so load the script and run it all again.
            await _call(self._broker.script_load(submission.PUSH_SCRIPT))
            replies = await self._transaction(push, messages, blobs, jobs, mark)
        if push.refused(replies, len(blobs)):
            # The transaction ran, blobs included: take them back (and the marks of any
            # chunk of a large submit that went through before one was refused).
            marked = [mark[0] + i for ids in jobs for i in ids] if mark else []
            if blobs or marked:
                with contextlib.suppress(InferqError, redis.exceptions.RedisError):
                    await _call(self._broker.unlink(*blobs, *marked))
            raise push.full()
        self._waiters.start()  # notifications of these jobs will come

    async def _transaction(self, push: submission.Push, messages: list[bytes],
                           blobs: submission.Blobs, jobs: list[list[str]],
                           mark: Mark | None) -> list[Any]:
        """Blobs, then the push script calls (which set the marks): the replies in that
        order."""
        calls = push.script_calls(messages, jobs, mark)
        if not blobs and len(calls) == 1:
            # One script call is atomic on its own: no MULTI/EXEC to send and parse (and
            # execute_command: redis-py's evalsha() costs about 20 us more a call).
            return [await _call(self._broker.execute_command(  # type: ignore[no-untyped-call]
                "EVALSHA", submission.PUSH_SCRIPT_SHA, *calls[0]))]
        pipe = self._broker.pipeline(transaction=True)
        for key, data in blobs.items():
            pipe.set(key, data, ex=push.ttl)
        for args in calls:
            pipe.evalsha(submission.PUSH_SCRIPT_SHA, *args)
        return list(await _call(pipe.execute()))

    # --- reading ---------------------------------------------------------------------

    async def status(self, job_id: str) -> JobStatus:
        """PENDING until the job's result is stored, then SUCCESS or FAILURE; UNKNOWN for an
        ID with neither a result nor a record of being accepted."""
        key = wire.result_key(job_id)
        state = wire.read_status(await _call(self._results.get(key)))
        if state != "PENDING":
            return JobStatus(state)
        accepted: int = await _call(self._broker.exists(wire.accepted_key(job_id)))
        if accepted:
            return JobStatus(state)
        # The result may have been stored (and the marker deleted) between the two reads.
        state = wire.read_status(await _call(self._results.get(key)))
        return JobStatus.UNKNOWN if state == "PENDING" else JobStatus(state)

    async def result(self, job_id: str, timeout: float = 60.0) -> JobResult:
        """Wait for one job; return its result or raise its JobFailed (JobTimeout past
        ``timeout``)."""
        [outcome] = await self._outcomes([job_id], timeout)
        if isinstance(outcome, JobFailed):
            raise outcome
        return outcome

    async def results(self, job_ids: Sequence[str], timeout: float = 60.0) -> list[JobResult]:
        """Wait for every job; return results in order, raising the first JobFailed."""
        out = await self._outcomes(job_ids, timeout)
        for item in out:
            if isinstance(item, JobFailed):
                raise item
        return out  # type: ignore[return-value]

    async def outcomes(self, job_ids: Sequence[str], timeout: float = 60.0) -> list[Outcome]:
        """Wait for every job; return a JobResult or a JobFailed for each, in order.

        Raises :class:`JobTimeout` if some job has no result after ``timeout`` seconds.
        """
        return await self._outcomes(job_ids, timeout)

    async def as_completed(self, job_ids: Iterable[str], timeout: float = 60.0
                           ) -> AsyncIterator[tuple[str, Outcome]]:
        """Yield ``(job_id, JobResult or JobFailed)`` as results arrive; JobTimeout after
        ``timeout`` seconds for the rest."""
        ids = list(dict.fromkeys(job_ids))
        futs = self._watch(ids)
        try:
            await self._first_look(futs)
            deadline = time.monotonic() + timeout
            left = dict(futs)
            while left:
                done = [i for i, f in left.items() if f.done()]
                if not done:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise waiting.timed_out(list(left), len(ids), timeout)
                    await asyncio.wait(left.values(), timeout=remaining,
                                       return_when=asyncio.FIRST_COMPLETED)
                    continue
                for job_id in done:
                    yield job_id, left.pop(job_id).result()
        finally:
            self._unwatch(futs)

    def _watch(self, ids: Sequence[str]) -> dict[str, asyncio.Future[Outcome]]:
        return {i: self._waiters.watch(i) for i in ids}

    def _unwatch(self, futs: Mapping[str, asyncio.Future[Outcome]]) -> None:
        for job_id, fut in futs.items():
            self._waiters.unwatch(job_id, fut)

    async def _outcomes(self, job_ids: Sequence[str], timeout: float, *, fresh: bool = False
                        ) -> list[Outcome]:
        """``fresh``: jobs this client just enqueued skip the first read (their notification
        comes first) and the acceptance check."""
        unique = list(dict.fromkeys(job_ids))
        futs = self._watch(unique)
        try:
            if not fresh:
                await self._first_look(futs)
            pending = [f for f in futs.values() if not f.done()]
            if pending:
                await asyncio.wait(pending, timeout=max(timeout, 0),
                                   return_when=asyncio.FIRST_EXCEPTION)
            for fut in futs.values():
                if fut.done() and fut.exception() is not None:
                    raise fut.exception()  # type: ignore[misc]  # Redis failed for everyone
            late = [i for i, f in futs.items() if not f.done()]
            if late:
                raise waiting.timed_out(late, len(unique), timeout)
            return [futs[i].result() for i in job_ids]
        finally:
            self._unwatch(futs)

    async def _first_look(self, futs: Mapping[str, asyncio.Future[Outcome]]) -> None:
        """Read results already stored; answer IDs never accepted with UnknownJob."""
        await self._read(list(futs))
        ids = [i for i, f in futs.items() if not f.done()]
        if not ids:
            return
        pipe = self._broker.pipeline(transaction=False)
        for job_id in ids:
            pipe.exists(wire.accepted_key(job_id))
        known = await _call(pipe.execute())
        missing = [i for i, k in zip(ids, known, strict=True) if not k]
        if missing:
            await self._read(missing)  # one more look for a result stored meanwhile
            for job_id in missing:
                if not futs[job_id].done():
                    self._waiters.settle(job_id, waiting.unknown_job(job_id))

    async def _read(self, ids: Sequence[str]) -> None:
        """Settle the waiters of every ID of ``ids`` whose result is stored."""
        for chunk in waiting.chunks(ids):
            docs = await _call(self._results.mget([wire.result_key(i) for i in chunk]))
            for job_id, raw in zip(chunk, docs, strict=True):
                if raw is not None:
                    self._waiters.settle(job_id, wire.read_result(job_id, raw))

    async def _run_id(self) -> str:
        try:
            return waiting.run_id_of(await _call(self._results.info("server")))
        except redis.exceptions.ResponseError:
            return ""  # INFO not allowed (ACL) or not served: restarts go undetected

    async def _check_server(self, pending: int) -> None:
        """Raise Unavailable when Redis restarted without persistence: jobs are gone."""
        if not self._restarts.restarted(await self._run_id()):
            return
        persistence = await _call(self._results.info("persistence"))
        lost = self._restarts.lost(pending, bool(int(persistence.get("aof_enabled", 0))))
        if lost is not None:
            raise lost

    # --- for tests and operators ---------------------------------------------------------

    @property
    def waiting(self) -> int:
        """Futures of callers waiting now (0 once every caller returned or was cancelled)."""
        return sum(len(f) for f in self._waiters.futures.values())

    @property
    def background_tasks(self) -> int:
        """This client's reader and resolver tasks still running."""
        return self._waiters.running

