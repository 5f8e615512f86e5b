"""The dead-letter list: poisoned jobs and unreadable messages, kept for people to act on.

Each entry is a JSON record in the Redis list ``inferq:dlq`` (newest first, bounded). A job
entry carries a complete single-job Celery message, so ``requeue`` can put it back on its
queue as it was, after clearing the job's POISONED result and its execution count.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import redis

from producer import wire
from producer.wire import DLQ_KEY, UNACKED, UNACKED_INDEX, attempts_key, now

#: Entries kept; the oldest fall off beyond this.
MAX_ENTRIES = 100_000


def _push(pipe: Any, entry: dict[str, Any]) -> None:
    pipe.lpush(DLQ_KEY, json.dumps(entry, separators=(",", ":")))
    pipe.ltrim(DLQ_KEY, 0, MAX_ENTRIES - 1)


def message_entry(tag: str, queue: str, raw: bytes, reason: str) -> dict[str, Any]:
    """A record for a message no job ID could be read from."""
    return {"kind": "message", "id": tag, "queue": queue, "code": "INVALID_ARGUMENT",
            "reason": reason, "at": now(),
            "message_b64": base64.b64encode(raw).decode("ascii")}


def job_entry(job_id: str, model: str, version: int | None,
              inputs: Mapping[str, np.ndarray[Any, Any]], code: str, reason: str) -> dict[str, Any]:
    """A record for one job, with a single-job message that re-enqueues it unchanged."""
    queue = wire.queue_name(model)
    message = wire.build_message(
        task=wire.TASK_NAME, task_id=job_id,
        args=[model, {k: wire.encode_tensor(v) for k, v in inputs.items()}],
        kwargs={"version": version}, queue=queue, argsrepr=f"({model!r}, <requeued>)",
    )
    return {"kind": "job", "id": job_id, "queue": queue, "model": model, "version": version,
            "code": code, "reason": reason, "at": now(),
            "message_b64": base64.b64encode(message).decode("ascii")}


def dead_letter_message(client: redis.Redis, tag: str, queue: str, raw: bytes,
                        reason: str) -> None:
    """Move an unreadable message from in flight (kombu's unacked records) to the list."""
    add(client, message_entry(tag, queue, raw, reason),
        ("zrem", UNACKED_INDEX, tag), ("hdel", UNACKED, tag))


def add(client: redis.Redis, entry: dict[str, Any], *also: Any) -> None:
    """Append ``entry``; ``also`` are extra (method, *args) calls done in the same MULTI."""
    pipe = client.pipeline(transaction=True)
    _push(pipe, entry)
    for name, *args in also:
        getattr(pipe, name)(*args)
    pipe.execute()


def entries(client: redis.Redis, limit: int = 100) -> list[dict[str, Any]]:
    """The newest ``limit`` entries (0: all)."""
    raw: list[bytes] = client.lrange(DLQ_KEY, 0, limit - 1 if limit else -1)  # type: ignore[assignment]
    return [json.loads(r) for r in raw]


def _find(client: redis.Redis, entry_id: str) -> tuple[bytes, dict[str, Any]] | None:
    raw_entries: list[bytes] = client.lrange(DLQ_KEY, 0, -1)  # type: ignore[assignment]
    for raw in raw_entries:
        doc = json.loads(raw)
        if doc.get("id") == entry_id:
            return raw, doc
    return None


def show(client: redis.Redis, entry_id: str) -> dict[str, Any] | None:
    """One entry by job ID (or message tag), with its message decoded for reading."""
    found = _find(client, entry_id)
    if found is None:
        return None
    doc = dict(found[1])
    raw = base64.b64decode(doc.pop("message_b64", ""))
    try:
        envelope = json.loads(raw)
        doc["message"] = {"headers": envelope.get("headers"),
                          "content-type": envelope.get("content-type"), "bytes": len(raw)}
    except ValueError:
        doc["message"] = {"bytes": len(raw), "head": raw[:120].decode("latin-1")}
    return doc


def requeue(client: redis.Redis, entry_id: str, results: redis.Redis | None = None) -> bool:
    """Put an entry's message back on its queue and forget the job's failure; False if absent.

    ``results`` is the Redis holding results when it is not ``client`` (the broker).
    """
    found = _find(client, entry_id)
    if found is None:
        return False
    raw, doc = found
    is_job = doc.get("kind") == "job"
    if is_job and results is not None:
        # Before the job is back on its queue: its new result must not lose to this one.
        results.delete(wire.result_key(doc["id"]))
    pipe = client.pipeline(transaction=True)
    pipe.lrem(DLQ_KEY, 1, raw)  # type: ignore[arg-type]  # bytes work; the stub says str
    if is_job:
        # The POISONED result would otherwise win over the new one (first result wins).
        pipe.delete(wire.result_key(doc["id"]), attempts_key(doc["id"]))
    if is_job:
        # Known again while it waits: its status reads PENDING, not UNKNOWN.
        pipe.set(wire.accepted_key(doc["id"]), 1, ex=86_400)
    pipe.lpush(doc["queue"], base64.b64decode(doc["message_b64"]))
    pipe.execute()
    return True


def purge(client: redis.Redis) -> int:
    """Drop every entry; return how many there were."""
    pipe = client.pipeline(transaction=True)
    pipe.llen(DLQ_KEY)
    pipe.delete(DLQ_KEY)
    count, _ = pipe.execute()
    return int(count)
