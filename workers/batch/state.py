"""A batch run's state in Redis, readable from any host, expiring after a TTL.

``inferq:batch:<run id>`` (hash): ``meta`` (the run's parameters and the input's
fingerprint, JSON), ``status`` (running, interrupted, stopped, finished), ``host``,
``updated``, ``rows_total`` and ``chunks`` (when known: from the file's metadata, else
once the whole input was read), the counters ``rows_done``,
``rows_failed``, ``chunks_done``, ``chunks_failed``, ``jobs_submitted``, ``summary`` (JSON,
when finished), ``j:<chunk>`` (the job ID of a chunk in flight; empty while it is being
submitted) and ``f:<chunk>`` (why a chunk failed, JSON). ``inferq:batch:<run id>:done``
and ``:failed`` are bitmaps over chunk indices. Every write renews the TTL.

The chunk files beside the output are the truth about what is done (a crash can land
between a file and its counter); Redis holds what a resume and ``inferq batch status`` need
besides: the jobs in flight, and the figures.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from producer import wire
from workers.batch.errors import BatchError

#: Prefix of a run's keys. (Beside the other inferq keys' names in spirit: a producer's
#: ACL user needs ``~inferq:batch:*`` to run batches.)
RUN_KEY_PREFIX = wire.BATCH_RUN_PREFIX
#: Seconds a run's state outlives its last write.
DEFAULT_TTL_S = 7 * 86_400
_EDGE_BYTES = 1 << 20


def run_key(run_id: str) -> str:
    """The hash holding run ``run_id``'s state."""
    return RUN_KEY_PREFIX + run_id


def new_run_id() -> str:
    """A short random run ID."""
    return os.urandom(6).hex()


def fingerprint(path: Path) -> dict[str, Any]:
    """What identifies an input file's content well enough to resume against it: size,
    modification time and a hash of its first and last MiB."""
    st = path.stat()
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(_EDGE_BYTES))
        if st.st_size > _EDGE_BYTES:
            f.seek(max(_EDGE_BYTES, st.st_size - _EDGE_BYTES))
            digest.update(f.read(_EDGE_BYTES))
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "edges_sha256": digest.hexdigest()}


@dataclass
class Counts:
    """A run's figures as Redis holds them."""

    status: str
    rows_done: int
    rows_failed: int
    chunks_done: int
    chunks_failed: int
    chunks: int | None
    rows_total: int | None
    in_flight: int
    jobs_submitted: int
    updated: float
    host: str


class RunState:
    """Reads and writes one run's state; every write renews the TTL."""

    def __init__(self, client: redis.Redis, run_id: str, ttl_s: int = DEFAULT_TTL_S) -> None:
        self.r, self.run_id, self.ttl_s = client, run_id, ttl_s
        self.key = run_key(run_id)
        self.done_key, self.failed_key = self.key + ":done", self.key + ":failed"
        self.host = socket.gethostname()

    def _write(self, pipe: Any) -> None:
        pipe.hset(self.key, mapping={"updated": time.time(), "host": self.host})
        for key in (self.key, self.done_key, self.failed_key):
            pipe.expire(key, self.ttl_s)
        pipe.execute()

    def _pipe(self) -> Any:
        return self.r.pipeline(transaction=False)

    def create(self, meta: dict[str, Any]) -> None:
        """Record a new run."""
        pipe = self._pipe()
        pipe.hset(self.key, mapping={"meta": json.dumps(meta), "status": "running",
                                     "rows_done": 0, "rows_failed": 0, "chunks_done": 0,
                                     "chunks_failed": 0, "jobs_submitted": 0})
        pipe.setbit(self.done_key, 0, 0)
        pipe.setbit(self.failed_key, 0, 0)
        self._write(pipe)

    def meta(self) -> dict[str, Any]:
        """The run's parameters; BatchError when Redis has no such run (expired?)."""
        raw = self.r.hget(self.key, "meta")
        if raw is None:
            raise BatchError(f"no batch run {self.run_id!r} in Redis (unknown, or its state "
                             f"expired {self.ttl_s // 86_400} days after its last write)")
        doc: dict[str, Any] = json.loads(raw)
        return doc

    def exists(self) -> bool:
        return bool(self.r.exists(self.key))

    def jobs(self) -> dict[int, str]:
        """Chunks in flight: index -> job ID ('' while it was being submitted)."""
        return {int(_text(name)[2:]): _text(value) for name, value in
                self.r.hscan_iter(self.key, match="j:*", count=1000)}

    def resumed(self, rows_done: int, rows_failed: int, done: int, failed: int,
                forget: list[int] | None = None) -> None:
        """Start again from what the chunk files say (the counters may lag a crash), and
        forget the job IDs of chunks ``forget`` (they have their file)."""
        pipe = self._pipe()
        for index in forget or ():
            pipe.hdel(self.key, f"j:{index}")
        pipe.hset(self.key, mapping={"status": "running", "rows_done": rows_done,
                                     "rows_failed": rows_failed, "chunks_done": done,
                                     "chunks_failed": failed})
        self._write(pipe)

    def submitting(self, indices: list[int]) -> None:
        """About to submit these chunks: a crash before :meth:`submitted` leaves their job
        IDs empty, and a resume sends them again."""
        pipe = self._pipe()
        for index in indices:
            pipe.hset(self.key, f"j:{index}", "")
        pipe.execute()

    def submitted(self, jobs: dict[int, str]) -> None:
        """The job IDs of chunks just submitted."""
        pipe = self._pipe()
        pipe.hset(self.key, mapping={f"j:{i}": job for i, job in jobs.items()})
        pipe.hincrby(self.key, "jobs_submitted", len(jobs))
        self._write(pipe)

    def finished_chunks(self, chunks: list[tuple[int, int, dict[str, Any] | None]]) -> None:
        """Chunks that have their file: ``(index, rows, error or None)`` each, counted done
        or failed."""
        pipe = self._pipe()
        for index, rows, error in chunks:
            pipe.hdel(self.key, f"j:{index}")
            if error is None:
                pipe.hdel(self.key, f"f:{index}")
                pipe.setbit(self.failed_key, index, 0)
                pipe.setbit(self.done_key, index, 1)
                pipe.hincrby(self.key, "rows_done", rows)
                pipe.hincrby(self.key, "chunks_done", 1)
            else:
                pipe.setbit(self.failed_key, index, 1)
                pipe.hset(self.key, f"f:{index}", json.dumps(error))
                pipe.hincrby(self.key, "rows_failed", rows)
                pipe.hincrby(self.key, "chunks_failed", 1)
        self._write(pipe)

    def stopped_at(self, index: int, error: dict[str, Any]) -> None:
        """Chunk ``index`` failed and stopped the run: recorded, not counted (a resume
        sends it again)."""
        pipe = self._pipe()
        pipe.hdel(self.key, f"j:{index}")
        pipe.hset(self.key, f"f:{index}", json.dumps(error))
        self._write(pipe)

    def set(self, **fields: Any) -> None:
        """Record ``status``, ``chunks`` or ``summary`` (dicts as JSON)."""
        pipe = self._pipe()
        pipe.hset(self.key, mapping={k: json.dumps(v) if isinstance(v, dict) else v
                                     for k, v in fields.items()})
        self._write(pipe)

    def counts(self) -> Counts:
        """The run's figures, for ``inferq batch status``."""
        self.meta()
        raw = {_text(k): _text(v) for k, v in self.r.hgetall(self.key).items()}
        in_flight = sum(1 for _ in self.r.hscan_iter(self.key, match="j:*", count=1000))
        return Counts(
            status=raw.get("status", "?"), rows_done=int(raw.get("rows_done", 0)),
            rows_failed=int(raw.get("rows_failed", 0)),
            chunks_done=int(raw.get("chunks_done", 0)),
            chunks_failed=int(raw.get("chunks_failed", 0)),
            chunks=int(raw["chunks"]) if "chunks" in raw else None,
            rows_total=int(raw["rows_total"]) if "rows_total" in raw else None,
            in_flight=in_flight,
            jobs_submitted=int(raw.get("jobs_submitted", 0)),
            updated=float(raw.get("updated", 0)), host=raw.get("host", "?"))

    def field(self, name: str) -> Any:
        raw = self.r.hget(self.key, name)
        return None if raw is None else json.loads(raw)

    def failures(self, limit: int = 20) -> list[dict[str, Any]]:
        """Up to ``limit`` failed chunks' errors, in chunk order."""
        found = [(int(_text(k)[2:]), json.loads(v)) for k, v in
                 self.r.hscan_iter(self.key, match="f:*", count=1000)]
        return [doc for _, doc in sorted(found)[:limit]]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
