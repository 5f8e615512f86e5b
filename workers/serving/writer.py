"""Storing results and acknowledging messages: one batch in one round trip, acks last.

This module owns every ack of a served message: with broker and results on one Redis, the
documents and the acks go in one script; otherwise the documents are stored first and the
acks follow. Either way a message is forgotten only once every result it carries is stored.
"""

from __future__ import annotations

import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis
import structlog

from producer import wire
from producer.wire import UNACKED, UNACKED_INDEX, Notify
from workers.serving.outage import Outage

log = structlog.get_logger(__name__)

# KEYS: kombu's unacked hash and index, then blob keys to delete.
# ARGV: ttl, n, t, markers, the n job IDs, their n documents, t delivery tags to ack, then
# (notify list, first, last, inline) quadruples: jobs first..last (1-based) go to that
# client's list, each as its ID, or as NUL ID NUL document when the document was stored here,
# is at most `inline` bytes (wire.HEADER_NOTIFY_DOCS) and the list holds fewer than
# INLINE_ENTRIES entries: a client that waits pops its list as it fills, one that never
# waits leaves at most that many documents in it (the rest are bare IDs).
# A result that already exists is kept: the first result wins, so a job run twice after a
# redelivery never shows two different outcomes (and its notification carries no document).
# The acks come last and in the same script, so a message is only forgotten once every
# result it carries is stored; a Redis at maxmemory refuses the first SET and with it the
# whole script.
_STORE = """
local ttl = ARGV[1]
local n = tonumber(ARGV[2])
local t = tonumber(ARGV[3])
local markers = ARGV[4] == '1'
local stored = 0
local fresh = {}
for i = 5, 4 + n do
  local key = 'RESULT_PREFIX' .. ARGV[i]
  local doc = ARGV[i + n]
  if redis.call('SET', key, doc, 'EX', ttl, 'NX') then
    redis.call('PUBLISH', key, doc)
    stored = stored + 1
    fresh[i] = true
  end
  if markers then
    redis.call('UNLINK', 'ACCEPTED_PREFIX' .. ARGV[i])
  end
end
for r = 5 + 2 * n + t, #ARGV, 4 do
  local list = ARGV[r]
  local first, last = 4 + tonumber(ARGV[r + 1]), 4 + tonumber(ARGV[r + 2])
  local inline = tonumber(ARGV[r + 3])
  if inline > 0 then
    local room = INLINE_ENTRIES - redis.call('LLEN', list)
    local entries = {}
    for i = first, last do
      local doc = ARGV[i + n]
      if fresh[i] and room > 0 and #doc <= inline then
        room = room - 1
        entries[#entries + 1] = '\0' .. ARGV[i] .. '\0' .. doc
      else
        entries[#entries + 1] = ARGV[i]
      end
    end
    redis.call('RPUSH', list, unpack(entries))
  else
    redis.call('RPUSH', list, unpack(ARGV, first, last))
  end
  redis.call('EXPIRE', list, ttl)
  redis.call('LTRIM', list, -100000, -1)
end
for i = 5 + 2 * n, 4 + 2 * n + t do
  redis.call('ZREM', KEYS[2], ARGV[i])
  redis.call('HDEL', KEYS[1], ARGV[i])
end
for i = 3, #KEYS do
  redis.call('UNLINK', KEYS[i])
end
return stored
""".replace("ACCEPTED_PREFIX", wire.ACCEPTED_KEY_PREFIX).replace(
    "RESULT_PREFIX", wire.RESULT_KEY_PREFIX).replace(
    "INLINE_ENTRIES", str(wire.NOTIFY_INLINE_ENTRIES))
#: A result to store: (job ID, document, whom to notify or None).
Doc = tuple[str, bytes, Notify | None]
#: Most jobs one RPUSH of the store script names (Lua's unpack has a stack limit).
_NOTIFY_RUN = 1000


class ResultStore:
    """Writes result documents with SET NX + PUBLISH (what Celery clients wait on), and
    acknowledges the messages that carried them.

    ``broker`` is the Redis holding the queues when it is not ``client``: then documents
    and acks take two round trips instead of one script.
    """

    def __init__(self, client: redis.Redis, ttl_s: int, broker: redis.Redis | None = None
                 ) -> None:
        self.client = client
        self.ttl_s = ttl_s
        self.broker = broker
        self._store = client.register_script(_STORE)

    def commit(self, docs: Sequence[Doc], acks: Sequence[str],
               blobs: Sequence[str]) -> None:
        """Store ``docs``, then ack ``acks`` and delete ``blobs`` and the jobs' accepted
        markers; the acks only once the documents are stored."""
        if self.broker is None:
            # The script deletes each job's accepted marker with its result.
            self.store(docs, acks, blobs, markers=True)
        else:
            self.store(docs)
            self.ack(acks, [*blobs, *(wire.accepted_key(job_id) for job_id, _, _ in docs)])

    def ack(self, tags: Sequence[str], blobs: Sequence[str] = ()) -> None:
        """Forget delivered messages (kombu's unacked records) and delete their blobs."""
        if tags or blobs:
            pipe = (self.broker or self.client).pipeline(transaction=False)
            if tags:
                pipe.zrem(UNACKED_INDEX, *tags)
                pipe.hdel(UNACKED, *tags)
            if blobs:
                pipe.unlink(*blobs)
            pipe.execute()

    def store(self, docs: Sequence[Doc],
              acks: Sequence[str] = (), blobs: Sequence[str] = (), *,
              markers: bool = False) -> int:
        """Store ``(job_id, document, whom to notify or None)``; return how many were new.

        ``acks`` and ``blobs`` (when the broker is this same Redis) are acknowledged and
        deleted in the same round trip, after the documents; with ``markers``, so are the
        jobs' accepted markers.
        """
        if not docs and not acks and not blobs:
            return 0
        args: list[Any] = [self.ttl_s, len(docs), len(acks), 1 if markers else 0,
                           *(job_id for job_id, _, _ in docs), *(doc for _, doc, _ in docs),
                           *acks]
        # Runs of jobs for the same waiting client (a batch's jobs mostly come from a few).
        run_notify: Notify | None = None
        run_start = 0
        for i, (_, _, notify) in enumerate([*docs, ("", b"", None)]):
            if notify != run_notify or i - run_start == _NOTIFY_RUN:
                if run_notify is not None:
                    args += [wire.notify_key(run_notify.client), run_start + 1, i,
                             run_notify.inline_max]
                run_notify, run_start = notify, i
        return int(self._store(keys=[UNACKED, UNACKED_INDEX, *blobs], args=args))


@dataclass
class Completed:
    """What one batch hands to the writer: documents, then acks, then what runs after
    they are stored (such as sending the batch's task events)."""

    docs: list[Doc]
    acks: list[str]
    blobs: list[str]
    after: list[Callable[[], None]] = field(default_factory=list)


class ResultWriter:
    """Stores results, acks messages and sends events in a thread of its own.

    The model thread goes on with the next batch while Redis executes the writes. Order
    per batch is kept: a message is acked only after every result it carries is stored.
    A bounded queue turns a slow or absent Redis into backpressure on the model thread.
    """

    def __init__(self, store: ResultStore, depth: int = 4, redis_url: str = "") -> None:
        self.store = store
        self.outage = Outage(log, "results", redis_url, max_delay_s=2.0)
        self._queue: queue.Queue[Completed | None] = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        #: Items handed to the thread, and items it has finished: one writer thread each,
        #: so neither count can lose an update.
        self._submitted = self._finished = 0
        #: Set by close(grace_s): past it, a write Redis keeps refusing is abandoned.
        self._give_up_at: float | None = None
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

    def give_up_after(self, grace_s: float) -> None:
        """From now on, abandon a write Redis still refuses ``grace_s`` seconds from now: its
        messages stay unacknowledged and are delivered again later, so a worker told to stop
        while Redis is unreachable does stop."""
        self._give_up_at = time.monotonic() + grace_s

    def close(self) -> None:
        """Write everything submitted so far, then stop the thread."""
        self._queue.put(None)
        self._thread.join()

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
        while True:
            try:
                self.store.commit(item.docs, item.acks, item.blobs)
                if self.outage.ongoing:
                    self.outage.recovered()
                break
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
                    redis.exceptions.OutOfMemoryError) as exc:
                # Nothing is acked yet, so nothing is lost: retry until Redis is back or has
                # room again (results expire; operators can raise maxmemory).
                if self._give_up_at is not None and time.monotonic() > self._give_up_at:
                    log.error("results_abandoned_at_shutdown", error=str(exc),
                              jobs=len(item.docs), messages=len(item.acks))
                    return
                time.sleep(self.outage.failed(exc, jobs=len(item.docs)))
        for after in item.after:
            try:
                after()
            except Exception as exc:  # monitoring must never hold up results
                log.warning("after_commit_failed", error=str(exc))
