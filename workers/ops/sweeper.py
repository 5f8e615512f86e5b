"""Jobs on the queue of a model no worker knows end NOT_FOUND, whoever sent them.

A plain Celery client can send to ``inferq.<anything>``; without this, such a job would
wait forever. Every worker looks on each heartbeat (one at a time, under a short lock): a
queue whose model no worker has ever registered (``inferq:models``) and that has held
messages for ``grace_s`` is drained, and each of its jobs gets a NOT_FOUND result. Queues
of registered models are left alone even with no live worker: their workers may be scaling
from zero.

Finding such queues takes a SCAN of the keyspace, which holds every stored result too
(millions on a busy fleet): each sweep goes on with the scan where the last one stopped, for
at most ``scan_steps`` steps, and looks at the queues it found before directly. A sweep costs
Redis a bounded amount of work whatever the keyspace's size; a queue is found within one
pass over the keyspace, and answered once its grace is over.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import redis
import structlog

from producer import wire
from producer.errors import ModelNotFound
from workers.ops import deadletter
from workers.serving.reader import QueueReader
from workers.serving.writer import ResultStore

log = structlog.get_logger(__name__)

#: Seconds a queue of an unknown model may hold messages before they are answered.
DEFAULT_GRACE_S = 30.0
_LOCK = "inferq:sweep:lock"
_BATCH = 100
#: Keys one SCAN step looks at, and steps per sweep (per heartbeat of the sweeping worker).
#: Small steps: Redis serves nobody else during one, and a 1,000-key step on a loaded
#: server took 1-5 ms, which every queued job then waited.
SCAN_COUNT = 200
SCAN_STEPS = 50


class UnknownQueueSweeper:
    """Answers NOT_FOUND for jobs queued for models that no worker registers."""

    def __init__(self, broker: redis.Redis, store: ResultStore, hostname: str,
                 grace_s: float = DEFAULT_GRACE_S, clock: Callable[[], float] = wire.now,
                 scan_steps: int = SCAN_STEPS, scan_count: int = SCAN_COUNT) -> None:
        self.broker, self.store, self.hostname = broker, store, hostname
        self.grace_s = grace_s
        self.clock = clock
        self.scan_steps, self.scan_count = scan_steps, scan_count
        #: Queue key -> when this worker first saw it non-empty with an unknown model.
        self._seen: dict[str, float] = {}
        #: Where the scan of the keyspace goes on at the next sweep (0: a new pass).
        self._cursor = 0

    def __call__(self) -> None:
        try:
            # The lock only keeps two workers from answering the same queue at once; its
            # expiry covers a worker that dies while holding it.
            if self.broker.set(_LOCK, self.hostname, nx=True, ex=30):
                try:
                    self.sweep()
                finally:
                    self.broker.delete(_LOCK)
        except redis.exceptions.RedisError as exc:
            log.warning("sweep_failed", error=str(exc))

    def sweep(self) -> int:
        """One sweep; returns how many jobs were answered."""
        known = {k.decode() if isinstance(k, bytes) else str(k)
                 for k in self.broker.hkeys(wire.MODELS_KEY)}
        now = self.clock()
        tracked = list(self._seen)
        if tracked:  # emptied meanwhile (a worker came up and took them): grace starts again
            pipe = self.broker.pipeline(transaction=False)
            for key in tracked:
                pipe.exists(key)
            for key, found in zip(tracked, pipe.execute(), strict=True):
                if not found:
                    del self._seen[key]
        for _ in range(self.scan_steps):
            cursor, keys = self.broker.scan(self._cursor, match=wire.QUEUE_PREFIX + "*",
                                            count=self.scan_count, _type="LIST")
            self._cursor = int(cursor)
            for raw_key in keys:
                key = raw_key.decode() if isinstance(raw_key, bytes) else str(raw_key)
                model = wire.model_of_queue(key)
                if model is not None and model not in known:
                    self._seen.setdefault(key, now)
            if not self._cursor:
                break  # a whole pass: the rest at the next sweep
        answered = 0
        for key, first in list(self._seen.items()):
            model = wire.model_of_queue(key)
            if model is None or model in known:
                del self._seen[key]  # registered meanwhile: its workers will come
            elif now - first >= self.grace_s:
                answered += self._answer(key, model)
                del self._seen[key]
        return answered

    def _answer(self, key: str, model: str) -> int:
        reader = QueueReader(self.broker, key)
        answered = 0
        while True:
            drained, left = reader.drain(_BATCH)
            docs, tags, blobs = [], [], []
            for tag, raw, brought in drained:
                try:
                    delivery = wire.parse_message(raw, key)
                except Exception as exc:
                    deadletter.dead_letter_message(self.broker, tag, key, raw, str(exc))
                    continue
                error = ModelNotFound(
                    f"no worker serves model {model!r} (its queue {key!r} had no consumer "
                    f"for {self.grace_s:.0f}s); check the model name, or add the model to a "
                    "worker's repository (inferq models add)", model=model)
                if delivery.entries_ref is not None:
                    # Read the entries too, so their by-reference tensors are deleted with it.
                    ref = delivery.entries_ref
                    entries: Any = brought[ref] if ref in brought else self.broker.get(ref)
                    wire.attach_entries(delivery, entries)
                ids = delivery.ids
                docs += [(i, wire.failure_document(i, error, model), delivery.notify_to)
                         for i in ids]
                tags.append(tag)
                blobs += delivery.owned_blobs()
                answered += len(ids)
            self.store.commit(docs, tags, blobs)
            if not left or not drained:
                break
        log.warning("unknown_model_jobs_answered", model=model, queue=key, jobs=answered)
        return answered
