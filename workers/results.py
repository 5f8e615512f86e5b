"""Per-job results, written for a whole batch in one round trip, and task events for Flower."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import redis

from producer import contract

# KEYS: result keys. ARGV[1]: ttl, ARGV[2..n+1]: documents, then notify-list pairs
# (list key, job id). A result that already exists is kept: the first result wins, so a
# job run twice after a redelivery never shows two different outcomes.
_STORE = """
local ttl = ARGV[1]
local n = #KEYS
local stored = 0
for i = 1, n do
  if redis.call('SET', KEYS[i], ARGV[i + 1], 'EX', ttl, 'NX') then
    redis.call('PUBLISH', KEYS[i], ARGV[i + 1])
    stored = stored + 1
  end
end
local lists = {}
for i = n + 2, #ARGV, 2 do
  redis.call('RPUSH', ARGV[i], ARGV[i + 1])
  lists[ARGV[i]] = true
end
for key, _ in pairs(lists) do
  redis.call('EXPIRE', key, ttl)
  redis.call('LTRIM', key, -100000, -1)
end
return stored
"""


class ResultStore:
    """Writes result documents with SET NX + PUBLISH (what Celery clients wait on)."""

    def __init__(self, client: redis.Redis, ttl_s: int) -> None:
        self.client = client
        self.ttl_s = ttl_s
        self._store = client.register_script(_STORE)

    def store(self, docs: Sequence[tuple[str, bytes, str | None]]) -> int:
        """Store ``(job_id, document, notify client or None)``; return how many were new."""
        if not docs:
            return 0
        keys = [contract.result_key(job_id) for job_id, _, _ in docs]
        args: list[Any] = [self.ttl_s, *(doc for _, doc, _ in docs)]
        for job_id, _, notify in docs:
            if notify:
                args += [contract.NOTIFY_KEY_PREFIX + notify, job_id]
        return int(self._store(keys=keys, args=args))


class TaskEvents:
    """Celery task events for every job, buffered and sent once per batch.

    Flower and other event consumers see each job as an ``inferq.infer`` task with its own
    ID, even when several jobs travelled in one message.
    """

    def __init__(self, app: Any, hostname: str, enabled: bool) -> None:
        self.enabled = enabled
        self._dispatcher: Any = None
        if enabled:
            self._connection = app.connection_for_write()
            self._dispatcher = app.events.Dispatcher(
                self._connection, hostname=hostname, buffer_group=["task"], buffer_limit=10_000
            )

    def _send(self, kind: str, **fields: Any) -> None:
        self._dispatcher.send(kind, **fields)

    def received(self, job_id: str, model: str, retries: int = 0) -> None:
        if self.enabled:
            self._send(
                "task-received", uuid=job_id, name=contract.TASK_NAME, args=f"({model!r}, ...)",
                kwargs="{}", retries=retries, eta=None, expires=None, root_id=job_id,
                parent_id=None,
            )

    def started(self, job_ids: Sequence[str]) -> None:
        if self.enabled:
            for job_id in job_ids:
                self._send("task-started", uuid=job_id)

    def finished(self, outcomes: Mapping[str, tuple[bool, str, float]]) -> None:
        """``job_id -> (succeeded, summary or error, runtime seconds)``; then flush."""
        if not self.enabled:
            return
        for job_id, (ok, text, runtime) in outcomes.items():
            if ok:
                self._send("task-succeeded", uuid=job_id, result=text, runtime=runtime)
            else:
                self._send("task-failed", uuid=job_id, exception=text, traceback=None)
        self.flush()

    def flush(self) -> None:
        if self.enabled:
            self._dispatcher.flush()

    def close(self) -> None:
        if self.enabled:
            self.flush()
            self._dispatcher.close()
            self._connection.release()

