"""Per-job results, written for a whole batch in one round trip, and task events for Flower."""

from __future__ import annotations

import os
import queue
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis
import structlog

from producer import contract
from workers.consumer import UNACKED, UNACKED_INDEX, QueueReader

log = structlog.get_logger(__name__)

# KEYS: result keys (n), kombu's unacked hash and index, then blob keys to delete.
# ARGV: ttl, n, t, the n documents, t delivery tags to ack, then notify-list pairs
# (list key, job id). A result that already exists is kept: the first result wins, so a
# job run twice after a redelivery never shows two different outcomes. The acks come last
# and in the same script, so a message is only forgotten once every result it carries is
# stored; a Redis at maxmemory refuses the first SET and with it the whole script.
_STORE = """
local ttl = ARGV[1]
local n = tonumber(ARGV[2])
local t = tonumber(ARGV[3])
local stored = 0
for i = 1, n do
  if redis.call('SET', KEYS[i], ARGV[i + 3], 'EX', ttl, 'NX') then
    redis.call('PUBLISH', KEYS[i], ARGV[i + 3])
    stored = stored + 1
  end
end
local lists = {}
for i = n + t + 4, #ARGV, 2 do
  redis.call('RPUSH', ARGV[i], ARGV[i + 1])
  lists[ARGV[i]] = true
end
for key, _ in pairs(lists) do
  redis.call('EXPIRE', key, ttl)
  redis.call('LTRIM', key, -100000, -1)
end
for i = n + 4, n + t + 3 do
  redis.call('ZREM', KEYS[n + 2], ARGV[i])
  redis.call('HDEL', KEYS[n + 1], ARGV[i])
end
for i = n + 3, #KEYS do
  redis.call('UNLINK', KEYS[i])
end
return stored
"""


class ResultStore:
    """Writes result documents with SET NX + PUBLISH (what Celery clients wait on)."""

    def __init__(self, client: redis.Redis, ttl_s: int) -> None:
        self.client = client
        self.ttl_s = ttl_s
        self._store = client.register_script(_STORE)

    def store(self, docs: Sequence[tuple[str, bytes, str | None]],
              acks: Sequence[str] = (), blobs: Sequence[str] = ()) -> int:
        """Store ``(job_id, document, notify client or None)``; return how many were new.

        ``acks`` and ``blobs`` (when the broker is this same Redis) are acknowledged and
        deleted in the same round trip, after the documents.
        """
        if not docs and not acks and not blobs:
            return 0
        keys = [contract.result_key(job_id) for job_id, _, _ in docs]
        keys += [UNACKED, UNACKED_INDEX, *blobs]
        args: list[Any] = [self.ttl_s, len(docs), len(acks), *(doc for _, doc, _ in docs),
                           *acks]
        for job_id, _, notify in docs:
            if notify:
                args += [contract.NOTIFY_KEY_PREFIX + notify, job_id]
        return int(self._store(keys=keys, args=args))


Event = tuple[str, dict[str, Any]]


class TaskEvents:
    """Celery task events per job, so Flower shows each job as an ``inferq.infer`` task.

    Above ``max_rate`` jobs per second (0: no limit) only a sample of jobs gets events,
    so monitoring never costs more than a fixed share of a busy worker. Events are
    recorded by the model thread and sent, buffered, by the result writer.
    """

    def __init__(self, app: Any, hostname: str, enabled: bool, max_rate: float = 0.0) -> None:
        self.enabled = enabled
        self.max_rate = max_rate
        self._tokens = max_rate
        self._refilled = time.monotonic()
        self._dispatcher: Any = None
        if enabled:
            self._connection = app.connection_for_write()
            self._dispatcher = app.events.Dispatcher(
                self._connection, hostname=hostname, buffer_group=["task"], buffer_limit=100_000
            )

    def admit(self) -> bool:
        """Whether the next job gets events (token bucket of ``max_rate`` per second)."""
        if not self.enabled:
            return False
        if self.max_rate <= 0:
            return True
        now = time.monotonic()
        self._tokens = min(self.max_rate, self._tokens + (now - self._refilled) * self.max_rate)
        self._refilled = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False

    @staticmethod
    def received(job_id: str, model: str, retries: int) -> Event:
        return ("task-received", {
            "uuid": job_id, "name": contract.TASK_NAME, "args": f"({model!r}, ...)",
            "kwargs": "{}", "retries": retries, "eta": None, "expires": None,
            "root_id": job_id, "parent_id": None,
        })

    @staticmethod
    def started(job_id: str) -> Event:
        return ("task-started", {"uuid": job_id})

    @staticmethod
    def succeeded(job_id: str, summary: str, runtime: float) -> Event:
        return ("task-succeeded", {"uuid": job_id, "result": summary, "runtime": runtime})

    @staticmethod
    def failed(job_id: str, error: str) -> Event:
        return ("task-failed", {"uuid": job_id, "exception": error, "traceback": None})

    def send(self, events: Sequence[Event]) -> None:
        """Send recorded events as one buffered publish."""
        if self.enabled and events:
            for kind, fields in events:
                self._dispatcher.send(kind, **fields)
            self._dispatcher.flush()

    def close(self) -> None:
        if self.enabled:
            self._dispatcher.close()
            self._connection.release()



@dataclass
class Completed:
    """What one batch hands to the writer: documents, then acks, then events."""

    docs: list[tuple[str, bytes, str | None]]
    acks: list[str]
    blobs: list[str]
    events: list[Event]


class ResultWriter:
    """Stores results, acks messages and sends events in a thread of its own.

    The model thread goes on with the next batch while Redis executes the writes. Order
    per batch is kept: a message is acked only after every result it carries is stored.
    A bounded queue turns a slow or absent Redis into backpressure on the model thread.
    """

    def __init__(self, store: ResultStore, reader: QueueReader, events: TaskEvents,
                 depth: int = 4, *, same_server: bool = False) -> None:
        self.store, self.reader, self.events = store, reader, events
        #: Broker and results on one Redis: store and ack in one script, one round trip.
        self.same_server = same_server
        self._queue: queue.Queue[Completed | None] = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        #: Items handed to the thread, and items it has finished: one writer thread each,
        #: so neither count can lose an update.
        self._submitted = self._finished = 0
        self._thread = threading.Thread(target=self._loop, name="inferq-writer", daemon=True)
        self._thread.start()

    def submit(self, item: Completed) -> None:
        self._submitted += 1
        while True:
            if self.error is not None:
                raise RuntimeError("the result writer failed") from self.error
            try:
                self._queue.put(item, timeout=1.0)
                return
            except queue.Full:
                continue  # Redis is slow or refusing writes: wait, but notice a dead writer

    def close(self) -> None:
        """Write everything submitted so far, then stop the thread."""
        self._queue.put(None)
        self._thread.join()
        self.events.close()

    def write_if_idle(self, item: Completed) -> bool:
        """Write ``item`` on the calling thread if everything submitted before is written.

        Saves a thread hand-off on a lone job's path; order stays the same, because nothing
        is queued ahead of it and the caller is the only thread that submits.
        """
        if self._submitted != self._finished or self.error is not None:
            return False
        self._guarded_write(item)
        return True

    def _loop(self) -> None:
        while (item := self._queue.get()) is not None:
            try:
                self._guarded_write(item)
            except BaseException:
                return
            finally:
                self._finished += 1

    def _guarded_write(self, item: Completed) -> None:
        try:
            self._write(item)
        except BaseException as exc:
            self.error = exc
            log.exception("result_writer_failed")
            # Unwritten results stay unacked and come back to a fresh process.
            os.kill(os.getpid(), signal.SIGTERM)
            raise

    def _write(self, item: Completed) -> None:
        delay = 0.05
        while True:
            try:
                if self.same_server:
                    self.store.store(item.docs, item.acks, item.blobs)
                else:
                    self.store.store(item.docs)
                    self.reader.ack(item.acks, item.blobs)
                break
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
                    redis.exceptions.OutOfMemoryError) as exc:
                # Nothing is acked yet, so nothing is lost: retry until Redis is back or has
                # room again (results expire; operators can raise maxmemory).
                log.warning("result_write_retry", error=str(exc), jobs=len(item.docs))
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
        try:
            self.events.send(item.events)
        except Exception as exc:  # events are for monitoring: never block results on them
            log.warning("events_not_sent", error=str(exc))
