"""Every name that crosses the wire or is shared by producers and workers: task names,
queues, Redis keys, headers, error codes, defaults, and the one clock.

Another language's client needs only this module and :mod:`producer.wire.tensors` to talk
to inferq.
"""

from __future__ import annotations

import time
from typing import NamedTuple

#: Celery task name of a job: ``args=[model, inputs]``, ``kwargs={"version": int | None}``.
TASK_NAME = "inferq.infer"
#: Celery task name of a bulk message: ``args=[model, [job, ...]]``; each job keeps its own ID.
BULK_TASK_NAME = "inferq.infer_many"

#: Prefix of a model's queue (a Redis list, as kombu's Redis transport stores it).
QUEUE_PREFIX = "inferq."
#: Queue the Celery consumer itself listens on; inferq jobs never go there.
CONTROL_QUEUE = "inferq.control"
#: kombu's Redis priority sub-queues: ``<queue>\x06\x16<step>``; priority 0 is the plain list.
PRIORITY_SEP = "\x06\x16"
PRIORITY_STEPS = (3, 6, 9)
#: kombu's in-flight records: tag -> message, and tag -> delivery time.
UNACKED = "unacked"
UNACKED_INDEX = "unacked_index"

#: Celery's Redis result backend key of a job's result document.
RESULT_KEY_PREFIX = "celery-task-meta-"
#: Hash of model name -> JSON signature, written by workers once a model is loaded and warm.
MODELS_KEY = "inferq:models"
#: Pub/sub channel on which a change to the model repository is announced (the message: a
#: model's name, or empty for every model); workers load and unload versions without restart.
MODELS_CHANNEL = "inferq:models:changed"
#: Per-worker liveness key prefix (``inferq:worker:<hostname>``), refreshed while consuming.
WORKER_KEY_PREFIX = "inferq:worker:"
#: Per-model sorted set of the workers serving it, scored by when their heartbeat expires
#: (``inferq:live:<model>``): a model is advertised only while one of them is live.
LIVE_KEY_PREFIX = "inferq:live:"
#: Seconds a worker's heartbeat stays valid without being refreshed.
HEARTBEAT_TTL_S = 15
#: List a worker pushes finished job IDs to, so an inferq producer waits without polling.
NOTIFY_KEY_PREFIX = "inferq:notify:"
#: Prefix of the Redis keys holding data sent by reference (``{"ref": key}``).
BLOB_KEY_PREFIX = "inferq:blob:"
#: Marker of a job accepted and not yet answered (``inferq:job:<id>``), written with its
#: message and deleted with its result: "queued or running" apart from "never seen".
ACCEPTED_KEY_PREFIX = "inferq:job:"
#: State of a batch run (``inferq batch``): a hash per run, with a TTL.
BATCH_RUN_PREFIX = "inferq:batch:"
#: The dead-letter list: poisoned jobs and unreadable messages (``inferq dlq``).
DLQ_KEY = "inferq:dlq"
#: Counter of how often a redelivered job was started (``inferq:attempts:<job id>``).
ATTEMPTS_PREFIX = "inferq:attempts:"

#: Header stamps set by inferq producers (optional for other clients).
HEADER_ENQUEUED_AT = "inferq_enqueued_at"
HEADER_NOTIFY = "inferq_notify"
#: The largest result document (bytes) the producer takes in its notification itself: the
#: worker pushes ``\x00<job id>\x00<document>`` instead of the bare ID for a result it stored
#: of at most this size (while the list is short: :data:`NOTIFY_INLINE_ENTRIES`), and the
#: producer has the result without reading it (a round trip). Absent or 0: bare IDs only.
HEADER_NOTIFY_DOCS = "inferq_notify_docs"
#: What inferq producers ask for with :data:`HEADER_NOTIFY_DOCS` on single-job messages:
#: a small model's result (a label and its scores) fits; a larger one is read as before.
NOTIFY_INLINE_MAX = 2048
#: The most a worker inlines whatever a message asks.
NOTIFY_INLINE_LIMIT = 65536
#: A worker inlines results only while the producer's list holds fewer entries than this:
#: a producer that waits pops its list as it fills; one that never waits (it reads results
#: by ID later) is left at most this many documents, not a copy of every result.
NOTIFY_INLINE_ENTRIES = 64
HEADER_JOB_IDS = "inferq_job_ids"
#: Blob keys a message reads first (a bulk message's entries, a job's tensors by reference):
#: the worker's drain script returns their values with the message, saving a round trip.
HEADER_BLOBS = "inferq_blobs"
#: How the producer chose the version it pinned (``alias:canary``, ``split:<rev>``, ...).
HEADER_ROUTE = "inferq_route"

#: Message serializers a worker accepts, by name; anything else fails the job.
CONTENT_TYPES = {"msgpack": "application/x-msgpack", "json": "application/json"}

#: Redis of producers and workers when ``INFERQ_BROKER_URL`` is not set.
DEFAULT_URL = "redis://localhost:6379/0"
#: Seconds before an unacknowledged message is delivered again (``INFERQ_VISIBILITY_TIMEOUT``).
DEFAULT_VISIBILITY_TIMEOUT_S = 300


def now() -> float:
    """Wall-clock seconds since the epoch: the clock of every timing stamp on both sides."""
    return time.time()


def queue_name(model: str) -> str:
    """Redis list (Celery queue) that carries the jobs of ``model``."""
    return QUEUE_PREFIX + model


def priority_queues(queue: str) -> list[str]:
    """The Redis lists of ``queue``, highest priority first, as kombu's transport keeps them."""
    return [queue, *(f"{queue}{PRIORITY_SEP}{step}" for step in PRIORITY_STEPS)]


def priority_queue(queue: str, priority: int) -> str:
    """The list kombu's Redis transport keeps ``queue``'s messages of ``priority`` in: as in
    Celery on Redis, 0 is served first and 9 last (0-2, 3-5, 6-8 and 9 share a list)."""
    if not 0 <= priority <= 9:
        raise ValueError(f"priority must be 0 (first) to 9 (last), got {priority}")
    step = max(s for s in (0, *PRIORITY_STEPS) if s <= priority)
    return queue if step == 0 else f"{queue}{PRIORITY_SEP}{step}"


def result_key(job_id: str) -> str:
    """Redis key of a job's result document."""
    return RESULT_KEY_PREFIX + job_id


def blob_key(owner_id: str, part: str) -> str:
    """Redis key of data sent by reference, owned by the job (or bulk message) ``owner_id``."""
    return f"{BLOB_KEY_PREFIX}{owner_id}:{part}"


def owns_blob(owner_id: str, key: str) -> bool:
    """Whether ``key`` is a blob of ``owner_id`` (which may then delete it once done)."""
    return key.startswith(f"{BLOB_KEY_PREFIX}{owner_id}:")


def pin_key(job_id: str) -> str:
    """The version a worker gave a job that named none, so a redelivery runs the same."""
    return f"inferq:pin:{job_id}"


def accepted_key(job_id: str) -> str:
    """Marker of an accepted job that has no result yet."""
    return ACCEPTED_KEY_PREFIX + job_id


def notify_key(client_id: str) -> str:
    """List a worker pushes a client's finished job IDs to."""
    return NOTIFY_KEY_PREFIX + client_id


class Notify(NamedTuple):
    """Whom a worker tells of a finished job: the producer's ID (its notification list) and
    the largest result document it takes inline (0: the job ID only)."""

    client: str
    inline_max: int = 0


def notify_entry(raw: bytes) -> tuple[str, bytes | None]:
    """A notification list entry as (job ID, its result document when it came inline)."""
    if raw[:1] == b"\x00":
        job_id, _, doc = raw[1:].partition(b"\x00")
        return job_id.decode(), doc
    return raw.decode(), None


def attempts_key(job_id: str) -> str:
    """Redis counter of how often a redelivered job was started."""
    return ATTEMPTS_PREFIX + job_id


def live_key(model: str) -> str:
    """Sorted set of the workers serving ``model`` (member: hostname, score: expiry)."""
    return LIVE_KEY_PREFIX + model


def model_of_queue(key: str) -> str | None:
    """The model whose queue (or kombu priority sub-queue) ``key`` is, None for other keys."""
    if not key.startswith(QUEUE_PREFIX) or key.startswith(CONTROL_QUEUE):
        return None
    return key[len(QUEUE_PREFIX):].split(PRIORITY_SEP, 1)[0] or None


def worker_key(hostname: str) -> str:
    """A worker's liveness record, expiring unless refreshed."""
    return WORKER_KEY_PREFIX + hostname
