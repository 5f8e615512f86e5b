"""Many rows through one model with a bounded number of jobs in flight.

:class:`Window` keeps at most ``max_in_flight`` jobs outstanding and hands back their
outcomes as they arrive; :func:`map_rows` (``InferenceClient.map``) builds on it: rows are
stacked into multi-row jobs of ``chunk_rows`` rows, submitted lazily as the caller consumes
results, and answered in input order. ``inferq batch`` drives the same window over the
chunks of a file. Only the client's public calls are used (``model``, ``submit``,
``as_completed``), so any front end that offers them can be driven.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import numpy as np

from producer.errors import JobFailed, JobTimeout
from producer.submission import VersionSpec
from producer.wire.results import JobResult

if TYPE_CHECKING:
    from producer.client import InferenceClient
    from producer.submission import ModelInfo

__all__ = ["DEFAULT_CHUNK_ROWS", "DEFAULT_MAX_IN_FLIGHT", "Outcome", "Window", "map_rows"]

Outcome = JobResult | JobFailed
T = TypeVar("T")

#: Rows per job when the model advertises no ``max_batch_rows``.
DEFAULT_CHUNK_ROWS = 64
#: Jobs outstanding at once: enough to keep a worker's next batches queued behind the one
#: it runs; raise it for a fleet of many workers.
DEFAULT_MAX_IN_FLIGHT = 16
#: Longest a wait for outcomes blocks before the caller may look again.
POLL_S = 0.1


class Window(Generic[T]):
    """Jobs in flight for one model, each tagged by the caller; at most ``max_in_flight``.

    The caller checks :attr:`free` before :meth:`submit` (or :meth:`adopt`, for a job an
    earlier process accepted) and collects outcomes with :meth:`wait`, in arrival order.
    A submit the client refuses (a ``JobFailed`` without a job ID) becomes that tag's
    outcome. ``timeout`` is how long one job may stay unanswered: :meth:`wait` then raises
    :class:`JobTimeout` naming it, and :meth:`drop` forgets it.
    """

    def __init__(self, client: InferenceClient, model: str, *,
                 max_in_flight: int = DEFAULT_MAX_IN_FLIGHT, version: VersionSpec = None,
                 priority: int = 9, timeout: float = 600.0) -> None:
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}")
        self.client, self.model = client, model
        self.max_in_flight, self.version = max_in_flight, version
        self.priority, self.timeout = priority, timeout
        self._jobs: dict[str, tuple[T, float]] = {}
        self._refused: list[tuple[T, JobFailed]] = []
        #: Jobs submitted through this window (not counting adopted ones).
        self.submitted = 0

    def __len__(self) -> int:
        return len(self._jobs) + len(self._refused)

    @property
    def free(self) -> int:
        """How many more jobs may be submitted now."""
        return self.max_in_flight - len(self)

    @property
    def job_ids(self) -> list[str]:
        """The jobs outstanding, oldest first."""
        return list(self._jobs)

    def submit(self, tag: T, inputs: Mapping[str, Any]) -> str | None:
        """Submit one job for ``tag``; its ID, or None when the client refused it (the
        refusal is then ``tag``'s outcome)."""
        try:
            handle = self.client.submit(self.model, inputs, version=self.version,
                                        priority=self.priority)
        except JobFailed as exc:
            self._refused.append((tag, exc))
            return None
        self.submitted += 1
        self._jobs[handle.id] = (tag, time.monotonic())
        return handle.id

    def submit_many(self, jobs: Sequence[tuple[T, Mapping[str, Any]]]) -> list[str | None]:
        """Submit several jobs in one round trip, one message each (so a worker takes them
        one by one, and a job of higher priority can pass between them); their IDs, None
        for a refused one. When the client refuses the call, each job is submitted alone,
        so that a refusal is the outcome of the job it concerns."""
        if len(jobs) <= 1:
            return [self.submit(tag, inputs) for tag, inputs in jobs]
        try:
            handles = self.client.submit_many(self.model, [inputs for _, inputs in jobs],
                                              version=self.version, priority=self.priority,
                                              jobs_per_message=1)
        except JobFailed:
            return [self.submit(tag, inputs) for tag, inputs in jobs]
        now = time.monotonic()
        for (tag, _), handle in zip(jobs, handles, strict=True):
            self._jobs[handle.id] = (tag, now)
        self.submitted += len(handles)
        return [h.id for h in handles]

    def adopt(self, tag: T, job_id: str) -> None:
        """Wait for a job accepted earlier (possibly by another process) as ``tag``'s."""
        self._jobs[job_id] = (tag, time.monotonic())

    def drop(self, job_ids: Iterable[str]) -> list[T]:
        """Stop waiting for ``job_ids``; return their tags."""
        tags = []
        for job_id in job_ids:
            entry = self._jobs.pop(job_id, None)
            if entry is not None:
                tags.append(entry[0])
        return tags

    def wait(self, poll_s: float = POLL_S) -> list[tuple[T, str | None, Outcome]]:
        """Outcomes that arrived (any order): ``(tag, job ID or None for a refused submit,
        JobResult or JobFailed)``; blocks up to ``poll_s`` only when none has.

        Raises :class:`JobTimeout` for jobs unanswered for longer than ``timeout``.
        """
        out: list[tuple[T, str | None, Outcome]] = [(t, None, e) for t, e in self._refused]
        self._refused.clear()
        if not self._jobs:
            return out
        # Read every outstanding result key first, without blocking: that finds jobs
        # adopted from another process (never notified to this client), lost ones, and any
        # whose notification an earlier wait took but did not hand back.
        self._collect(out, timeout=0.0, just_submitted=False, first_only=False)
        if not out and self._jobs:
            # Then block on this client's notifications, and return with the first outcome:
            # the caller refills the window at once, so the queue never runs dry.
            self._collect(out, timeout=poll_s, just_submitted=True, first_only=True)
        now = time.monotonic()
        late = [i for i, (_, at) in self._jobs.items() if now - at > self.timeout]
        if late and not out:
            raise JobTimeout(f"{len(late)} jobs of model {self.model!r} have no result after "
                             f"{self.timeout}s; they may still finish", late)
        return out

    def _collect(self, out: list[tuple[T, str | None, Outcome]], *, timeout: float,
                 just_submitted: bool, first_only: bool) -> None:
        found = self.client.as_completed(list(self._jobs), timeout=timeout,
                                         just_submitted=just_submitted)
        try:
            for job_id, outcome in found:
                tag, _ = self._jobs.pop(job_id)
                out.append((tag, job_id, outcome))
                if first_only:
                    break
        except JobTimeout:
            pass
        finally:
            close = getattr(found, "close", None)  # a generator: end its wait at once
            if close is not None:
                close()


@dataclass
class _Chunk:
    """Rows stacked into one job, and how many rows each input item gave it."""

    seq: int
    inputs: dict[str, np.ndarray[Any, Any]]
    counts: list[int] = field(default_factory=list)


def _item_arrays(item: Mapping[str, Any], info: ModelInfo | None) -> dict[str, Any]:
    """One item's inputs as arrays with a batch axis (added as ``submit`` adds it)."""
    specs = {s.name: s for s in info.inputs} if info is not None else {}
    out = {}
    for name, value in item.items():
        spec = specs.get(name)
        arr = value if isinstance(value, np.ndarray) else np.asarray(
            value, None if spec is None else spec.dtype)
        if spec is not None and spec.shape[:1] == (-1,) and arr.ndim == len(spec.shape) - 1:
            arr = arr[np.newaxis]
        out[name] = arr
    return out


def _key(arrays: Mapping[str, np.ndarray[Any, Any]]) -> tuple[Any, ...]:
    """What items must share to be stacked into one job: names, dtypes, non-batch dims."""
    return tuple((n, a.dtype.str, a.shape[1:]) for n, a in sorted(arrays.items()))


def _rows(arrays: Mapping[str, np.ndarray[Any, Any]]) -> int:
    return int(next(iter(arrays.values())).shape[0]) if arrays else 0


def stack(items: Iterable[Mapping[str, Any]], info: ModelInfo | None,
          chunk_rows: int) -> Iterator[_Chunk]:
    """Consecutive items stacked into jobs of up to ``chunk_rows`` rows; an item is never
    split, and one whose names, dtypes or non-batch dimensions differ from the job being
    built starts the next one (so a malformed item fails with few others)."""
    seq, parts, key, rows = 0, list[dict[str, Any]](), None, 0
    for item in items:
        if not isinstance(item, Mapping) or not item:
            # Not stackable: a job of its own, which submit refuses as it would alone.
            if parts:
                yield _join(seq, parts)
                seq, parts, rows = seq + 1, [], 0
            yield _Chunk(seq, item, [1])  # type: ignore[arg-type]
            seq += 1
            continue
        arrays = _item_arrays(item, info)
        n = _rows(arrays) if all(a.ndim for a in arrays.values()) else 1
        k = _key(arrays) if all(a.ndim for a in arrays.values()) else None
        if parts and (k is None or k != key or rows + n > chunk_rows):
            yield _join(seq, parts)
            seq, parts, rows = seq + 1, [], 0
        parts.append(arrays)
        key, rows = k, rows + n
    if parts:
        yield _join(seq, parts)


def _join(seq: int, parts: list[dict[str, Any]]) -> _Chunk:
    counts = [_rows(p) for p in parts]
    if len(parts) == 1:
        return _Chunk(seq, parts[0], counts)
    return _Chunk(seq, {n: np.concatenate([p[n] for p in parts]) for n in parts[0]}, counts)


def split(outcome: Outcome, counts: list[int]) -> Iterator[Outcome]:
    """One outcome per item of a job: its rows of every output (a failure is shared)."""
    if not isinstance(outcome, JobResult) or len(counts) == 1:
        yield from (outcome for _ in counts)
        return
    start = 0
    for n in counts:
        yield JobResult(id=outcome.id, model=outcome.model, version=outcome.version,
                        worker=outcome.worker, batch_size=outcome.batch_size,
                        timings_ms=outcome.timings_ms,
                        outputs={k: v[start:start + n] for k, v in outcome.outputs.items()})
        start += n


def map_rows(client: InferenceClient, model: str, rows: Iterable[Mapping[str, Any]], *,
             chunk_rows: int | None = None, max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
             version: VersionSpec = None, priority: int = 9, timeout: float = 600.0
             ) -> Iterator[Outcome]:
    """Outcomes of ``rows``, in input order, with at most ``max_in_flight`` jobs
    submitted and not yet handed back (see ``InferenceClient.map``).

    The model is looked up at once (``ModelNotFound``, ``Unavailable`` raise here); rows
    are read and submitted only as the outcomes are consumed.
    """
    info = client.model(model, version if isinstance(version, int) else None)
    if chunk_rows is None:
        chunk_rows = info.max_batch_rows if info is not None and info.max_batch_rows > 0 \
            else DEFAULT_CHUNK_ROWS
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be at least 1, got {chunk_rows}")
    window: Window[int] = Window(client, model, max_in_flight=max_in_flight, version=version,
                                 priority=priority, timeout=timeout)
    return _in_order(window, stack(rows, info, chunk_rows))


def _in_order(window: Window[int], chunks: Iterator[_Chunk]) -> Iterator[Outcome]:
    order: deque[_Chunk] = deque()
    ready: dict[int, Outcome] = {}
    exhausted = False
    while True:
        # The window holds every job not yet handed back, answered or not: outcomes that
        # arrive out of order wait here, never more than max_in_flight of them.
        fresh: list[_Chunk] = []
        while not exhausted and len(order) < window.max_in_flight:
            chunk = next(chunks, None)
            if chunk is None:
                exhausted = True
                break
            order.append(chunk)
            fresh.append(chunk)
        window.submit_many([(c.seq, c.inputs) for c in fresh])
        if not order:
            return
        while order[0].seq not in ready:
            for seq, _, outcome in window.wait():
                ready[seq] = outcome
        while order and order[0].seq in ready:
            head = order.popleft()
            yield from split(ready.pop(head.seq), head.counts)
