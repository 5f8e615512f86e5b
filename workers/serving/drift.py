"""The drift observer: live histograms of a sample of each version's inputs and outputs.

On the model thread it only bins: every k-th row of a batch (``INFERQ_DRIFT_SAMPLE``) by
the version's profile (:mod:`workers.ops.drift`), added to counts in memory, a few
vectorised numpy calls a batch. Everything that touches Redis or a file runs on the result
writer's thread (:meth:`DriftObserver.handoff`): finding the version's reference, building
one from the first rows served when there is none, and writing the counts every
``INFERQ_DRIFT_FLUSH`` seconds. The writer thread never changes what the model thread
reads: it leaves a decision in ``_Version.next`` that the model thread applies.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import redis
import structlog

from producer.errors import JobFailed
from workers.ops import drift
from workers.repository import Manifest
from workers.serving.observers import Batch, Observer, Outcome

log = structlog.get_logger(__name__)

#: Seconds between checks that the reference is still the one binned by (another worker
#: may have published a profile.json, a new profile.json may have been written, or a
#: person deleted it to start anew).
REF_CHECK_S = 30.0
#: Rows binned of one batch at most: a full batch at saturation (256 rows of the bench MLP)
#: bins 8, still hundreds of rows a second, for about 1% of its compute.
MAX_ROWS_PER_BATCH = 8
#: Seconds before a reference lookup that failed (Redis unreachable) is tried again.
RETRY_S = 5.0


@dataclass
class _Version:
    """Drift state of one model version, owned by the model thread."""

    #: new -> resolving -> (collecting -> building ->) ready; "next" moves it on. "off":
    #: binning failed (a profile that does not fit the model); the log says why.
    status: str = "new"
    profile: drift.Profile | None = None
    raw: bytes | None = None
    #: Set by the writer thread: ("adopt", profile, raw), ("collect",) or ("retry",).
    next: tuple[Any, ...] | None = None
    retry_at: float = 0.0
    #: The profile.json last read (its mtime), for noticing a new one; writer thread only.
    file_stamp: int | None = None
    minute: int = 0
    counts: list[np.ndarray[Any, Any]] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    dirty: bool = False
    #: Finished minutes not yet written: (key, packed counts).
    closed: list[tuple[str, bytes]] = field(default_factory=list)
    #: Reference rows being collected, per tracked tensor.
    buffer: list[list[np.ndarray[Any, Any]]] = field(default_factory=list)
    buffered: int = 0


class DriftObserver(Observer):
    """Bins a sample of every batch's rows by its version's reference profile."""

    def __init__(self, manifest: Manifest, client: redis.Redis, model_dir: Path, *,
                 sample: float, reference_rows: int, flush_s: float,
                 idle_flush: bool = True) -> None:
        self.model = manifest.name
        self.client = client
        self.model_dir = model_dir
        self.every = max(1, round(1 / sample))
        self.reference_rows = reference_rows
        self.flush_s = flush_s
        self.tracked = drift.tracked(manifest.inputs, manifest.outputs)
        #: This instance's field in every counts hash.
        self.token = uuid.uuid4().hex[:12]
        self.versions: dict[int, _Version] = {}
        self._seen = 0
        self._work: list[Callable[[], None]] = []
        self._last_flush = time.monotonic()
        self._last_check = time.monotonic()
        #: The model thread's state changes under ``_lock`` (uncontended but for a flush by
        #: the idle thread); Redis and file work runs under ``_io_lock``, one at a time.
        self._lock = threading.Lock()
        self._io_lock = threading.Lock()
        if idle_flush:
            threading.Thread(target=self._flush_when_idle, daemon=True,
                             name=f"inferq-drift-{self.model}").start()

    # --- model thread ---------------------------------------------------------------------

    def batch_done(self, batch: Batch, outcomes: Sequence[Outcome]) -> None:
        with self._lock:
            try:
                self._batch_done(batch, outcomes)
            except Exception as exc:  # monitoring must never stop the serving loop
                state = self.versions[batch.version]
                state.status = "off"
                log.warning("drift_off_for_version", model=self.model, version=batch.version,
                            error=f"{type(exc).__name__}: {exc}")

    def _batch_done(self, batch: Batch, outcomes: Sequence[Outcome]) -> None:
        state = self.versions.get(batch.version)
        if state is None:
            state = self.versions[batch.version] = _Version()
        if state.next is not None:
            self._apply(batch.version, state)
        if state.status == "new" and time.monotonic() >= state.retry_at:
            state.status = "resolving"
            self._work.append(lambda: self._resolve(batch.version, state))
        elif state.status == "collecting":
            self._collect(batch, outcomes, state)
        elif state.status == "ready":
            self._count(batch, outcomes, state)

    def handoff(self) -> Callable[[], None] | None:
        with self._lock:
            work = self._take_work()
        if not work:
            return None

        def run() -> None:
            with self._io_lock:
                for w in work:
                    w()

        return run

    def _flush_when_idle(self) -> None:
        """Write what the last batches counted when no batch has come to do it (the
        serving loop hands off only after a batch)."""
        period = max(self.flush_s, 0.05)
        while True:
            time.sleep(period)
            if time.monotonic() - self._last_flush >= 2 * period:
                try:
                    run = self.handoff()
                    if run is not None:
                        run()
                except Exception as exc:
                    log.warning("drift_flush_failed", model=self.model, error=str(exc))

    def _take_work(self) -> list[Callable[[], None]]:
        now = time.monotonic()
        if now - self._last_flush >= self.flush_s:
            self._last_flush = now
            writes = self._snapshot()
            if writes:
                self._work.append(lambda: self._write(writes))
            if now - self._last_check >= REF_CHECK_S:
                self._last_check = now
                ready = [(v, s) for v, s in self.versions.items() if s.status == "ready"]
                if ready:
                    self._work.append(lambda: self._check(ready))
        work, self._work = self._work, []
        return work

    def _apply(self, version: int, state: _Version) -> None:
        decision, state.next = state.next, None
        assert decision is not None
        if decision[0] == "adopt":
            profile, raw = decision[1], decision[2]
            if raw == state.raw and state.status == "ready":
                return
            if state.profile is not None:
                self._close(version, state)  # counts of the old bins go out under the old profile
            state.profile, state.raw, state.status = profile, raw, "ready"
            state.counts = [np.zeros(t.expected.shape, np.int64) for t in profile.tensors]
            state.rows = [0] * len(profile.tensors)
            state.buffer, state.buffered = [], 0
            log.info("drift_reference", model=self.model, version=version,
                     profile=profile.id, source=profile.source, rows=profile.rows)
        elif decision[0] == "collect":
            state.status, state.profile, state.raw = "collecting", None, None
            state.buffer, state.buffered = [[] for _ in self.tracked], 0
        else:
            state.status, state.retry_at = "new", time.monotonic() + RETRY_S

    def _picks(self, batch: Batch, outcomes: Sequence[Outcome], every: int,
               cap: int = 0) -> list[tuple[int, slice | None]]:
        """(job index, its rows sampled; None: all) of every ``every``-th row served, or
        fewer in a batch of more than ``every * cap`` rows (at most ``cap`` of them)."""
        n = batch.rows
        stride = max(every, -(-n // cap)) if cap else every
        start = (-self._seen) % stride
        self._seen += n
        if n == len(batch.jobs):  # one row a job: the usual case, no per-job arithmetic
            return [(i, None) for i in range(start, n, stride)
                    if not isinstance(outcomes[i], JobFailed)]
        rows = np.fromiter((p.rows for p in batch.jobs), np.int64, len(batch.jobs))
        starts = np.cumsum(rows) - rows
        first = starts + (start - starts) % stride
        return [(i, slice(int(first[i] - starts[i]), None, stride))
                for i in np.flatnonzero(first < starts + rows).tolist()
                if not isinstance(outcomes[i], JobFailed)]

    def _tables(self, batch: Batch, outcomes: Sequence[Outcome],
                picks: list[tuple[int, slice | None]], tensors: Sequence[tuple[str, str, Any]]
                ) -> list[np.ndarray[Any, Any]] | None:
        """Per tracked tensor, the picked rows reduced to its features."""
        if not picks:
            return None
        out = []
        for name, role, features in tensors:
            parts = []
            for i, rows in picks:
                outcome = outcomes[i]
                assert not isinstance(outcome, JobFailed)
                array = (batch.jobs[i].inputs if role == "input" else outcome).get(name)
                if array is None:
                    return None  # a signature that does not match the profile: skip
                parts.append(array if rows is None else array[rows])
            out.append(drift.rows_of(np.concatenate(parts) if len(parts) > 1 else parts[0],
                                     features))
        return out

    def _count(self, batch: Batch, outcomes: Sequence[Outcome], state: _Version) -> None:
        profile = state.profile
        assert profile is not None
        tensors = [(t.name, t.role, t.features) for t in profile.tensors]
        # INFERQ_DRIFT_SAMPLE=1 asks for every row: no cap then.
        picks = self._picks(batch, outcomes, self.every,
                            MAX_ROWS_PER_BATCH if self.every > 1 else 0)
        tables = self._tables(batch, outcomes, picks, tensors)
        if tables is None:
            return
        minute = int(batch.finished // 60)
        if minute != state.minute:
            self._close(batch.version, state)
            state.minute = minute
        for i, (tensor, table) in enumerate(zip(profile.tensors, tables, strict=True)):
            state.counts[i] += tensor.counts(table)
            state.rows[i] += len(table)
        state.dirty = True

    def _close(self, version: int, state: _Version) -> None:
        """The current minute is over: keep its counts for the next write (unless written
        since they last changed), start anew."""
        assert state.profile is not None
        if state.dirty:
            state.closed.append((
                drift.counts_key(self.model, version, state.profile.id, state.minute),
                state.profile.pack(state.counts, state.rows)))
        for c in state.counts:
            c[:] = 0
        state.rows = [0] * len(state.rows)
        state.dirty = False

    def _collect(self, batch: Batch, outcomes: Sequence[Outcome], state: _Version) -> None:
        tables = self._tables(batch, outcomes, self._picks(batch, outcomes, 1), self.tracked)
        if tables is None:
            return
        for buffer, table in zip(state.buffer, tables, strict=True):
            buffer.append(table)
        state.buffered += len(tables[0])
        if state.buffered >= self.reference_rows:
            state.status = "building"
            buffers, state.buffer = state.buffer, []
            version = batch.version
            self._work.append(lambda: self._build(version, state, buffers))

    def _snapshot(self) -> list[tuple[str, bytes]]:
        """(key, packed counts) to write: finished minutes, and the current minute's counts
        so far (its field is rewritten whole at every flush)."""
        out = []
        for version, state in self.versions.items():
            out += state.closed
            state.closed = []
            if state.profile is not None and state.dirty:
                out.append((drift.counts_key(self.model, version, state.profile.id,
                                             state.minute),
                            state.profile.pack(state.counts, state.rows)))
                state.dirty = False
        return out

    # --- writer thread ----------------------------------------------------------------------

    def _resolve(self, version: int, state: _Version) -> None:
        """The version's reference: its profile.json (published for every worker), else
        the one in Redis, else collect one from the rows served."""
        key = drift.ref_key(self.model, version)
        try:
            state.file_stamp = self._file_stamp(version)
            profile = self._file_profile(version)
            if profile is not None:
                raw = profile.dumps().encode()
                if self.client.get(key) != raw:
                    self.client.set(key, raw)
                state.next = ("adopt", profile, raw)
                return
            current = self.client.get(key)
            state.next = ("collect",) if current is None else (
                "adopt", drift.Profile.loads(current), current)
        except (redis.exceptions.RedisError, ValueError) as exc:
            log.warning("drift_reference_unavailable", model=self.model, version=version,
                        error=str(exc))
            state.next = ("retry",)

    def _file_stamp(self, version: int) -> int | None:
        try:
            return drift.profile_path(self.model_dir, self.model, version).stat().st_mtime_ns
        except OSError:
            return None

    def _file_profile(self, version: int) -> drift.Profile | None:
        path = drift.profile_path(self.model_dir, self.model, version)
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        profile = drift.Profile.loads(text)
        names = {name for name, _, _ in self.tracked}
        if {t.name for t in profile.tensors} - names:
            raise ValueError(f"{path} names tensors the model does not have")
        return profile

    def _build(self, version: int, state: _Version,
               buffers: list[list[np.ndarray[Any, Any]]]) -> None:
        rows = min(self.reference_rows, sum(len(b) for b in buffers[0]))
        tables = [(name, role, features, np.concatenate(buffer)[:rows])
                  for (name, role, features), buffer in zip(self.tracked, buffers, strict=True)]
        profile = drift.profile_from_tables(self.model, version,
                                            f"first {rows} rows served", tables)
        raw = profile.dumps().encode()
        key = drift.ref_key(self.model, version)
        try:
            # The first worker's reference is everyone's.
            if not self.client.set(key, raw, nx=True):
                got = self.client.get(key)
                raw = got if isinstance(got, bytes) else raw
            state.next = ("adopt", drift.Profile.loads(raw), raw)
        except (redis.exceptions.RedisError, ValueError) as exc:
            log.warning("drift_reference_not_stored", model=self.model, version=version,
                        error=str(exc))
            state.next = ("retry",)

    def _write(self, writes: list[tuple[str, bytes]]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for key, blob in writes:
            pipe.hset(key, self.token, blob)
            pipe.expire(key, drift.COUNTS_TTL_S)
        try:
            pipe.execute()
        except redis.exceptions.RedisError as exc:
            # Drift counts are monitoring: a lost flush is a gap, never a held-up result.
            log.debug("drift_counts_not_written", model=self.model, error=str(exc))

    def _check(self, ready: list[tuple[int, _Version]]) -> None:
        for version, state in ready:
            try:
                current = self.client.get(drift.ref_key(self.model, version))
            except redis.exceptions.RedisError:
                return
            if state.next is not None:
                continue
            if current is None or self._file_stamp(version) != state.file_stamp:
                # Deleted (publish the file's again, or start a new one), or a new file.
                self._resolve(version, state)
            elif current == state.raw:
                continue
            else:
                try:
                    state.next = ("adopt", drift.Profile.loads(current), current)
                except ValueError as exc:
                    log.warning("drift_reference_unreadable", model=self.model,
                                version=version, error=str(exc))
