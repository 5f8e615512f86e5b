"""Batching: *when* to flush (the policy) apart from *how* to combine and split (pure numpy)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import numpy as np

Arrays = dict[str, np.ndarray[Any, Any]]


@dataclass(frozen=True)
class BatchPolicy:
    """Flush at ``max_rows``, or once nothing more is waiting, or after ``max_wait_s``.

    A lone job is never held: the first look at the queue that finds it empty flushes. The
    wait only applies while jobs keep arriving, so a busy queue forms full batches without
    a slow trickle stretching a batch forever.
    """

    max_rows: int
    max_wait_s: float
    #: While online (higher-priority) jobs have been seen within ``online_recent_s``, a model
    #: run of background (lowest-priority) rows lasts about this long, so an online job
    #: arriving meanwhile waits at most that; otherwise background runs are full size.
    background_run_s: float = 0.0005
    online_recent_s: float = 1.0

    def should_flush(self, rows: int, waited_s: float, queue_empty: bool) -> bool:
        if rows <= 0:
            return False
        return rows >= self.max_rows or queue_empty or waited_s >= self.max_wait_s


def take(row_counts: Sequence[int], max_rows: int) -> int:
    """How many leading jobs (with these row counts) fit into one batch; at least one."""
    total = 0
    for i, rows in enumerate(row_counts):
        if i and total + rows > max_rows:
            return i
        total += rows
    return len(row_counts)


def collate(jobs: Sequence[Arrays], names: Sequence[str]) -> Arrays:
    """Concatenate the jobs' inputs along the batch axis."""
    if len(jobs) == 1:
        return {n: jobs[0][n] for n in names}
    return {n: np.concatenate([j[n] for j in jobs], axis=0) for n in names}


def parts(arrays: Arrays, max_rows: int) -> list[Arrays]:
    """Cut one job's inputs into slices of at most ``max_rows`` rows (views, no copy)."""
    rows = len(next(iter(arrays.values())))
    return [{n: a[start:start + max_rows] for n, a in arrays.items()}
            for start in range(0, rows, max_rows)]


def join(outputs: Sequence[Arrays]) -> Arrays:
    """The outputs of a job's slices, concatenated back in order."""
    if len(outputs) == 1:
        return outputs[0]
    return {n: np.concatenate([o[n] for o in outputs], axis=0) for n in outputs[0]}


def split(outputs: Arrays, row_counts: Sequence[int]) -> list[Arrays]:
    """Cut batch outputs back into one mapping per job, checking the row total."""
    total = sum(row_counts)
    for name, arr in outputs.items():
        if arr.ndim == 0 or arr.shape[0] != total:
            raise ValueError(
                f"output '{name}' has shape {list(arr.shape)} for a batch of {total} rows"
            )
    bounds = np.cumsum([0, *row_counts])
    return [
        {name: arr[bounds[i] : bounds[i + 1]] for name, arr in outputs.items()}
        for i in range(len(row_counts))
    ]


# --- draining and picking ------------------------------------------------------------

#: Most messages taken in one round trip, whatever their size.
MAX_DRAIN = 256


def drain_size(room_rows: int, rows_per_message: float, max_drain: int = MAX_DRAIN) -> int:
    """Messages to take for ``room_rows`` of room in the next batch; 0 once it is full.

    Taking more than the next batch needs would hoard messages that another instance or
    worker is waiting for.
    """
    if room_rows <= 0:
        return 0
    return min(max_drain, max(1, int(room_rows / rows_per_message)))


def rows_per_message(average: float, rows: int) -> float:
    """The running average of rows per message, after a message of ``rows`` rows."""
    return 0.8 * average + 0.2 * max(1, rows)


class Waiting(Protocol):
    """What picking needs of a job waiting for its batch."""

    rows: int
    version: int
    #: The job's dimensions past the batch axis, per input: only equal ones concatenate.
    shape: tuple[tuple[int, ...], ...]
    #: Redelivered after a crash: runs alone, so a job that kills its worker is isolated.
    suspect: bool


W = TypeVar("W", bound=Waiting)


def pick(waiting: Sequence[W], max_rows: int) -> tuple[list[W], list[W]]:
    """The next batch and what stays waiting.

    A suspect job at the head runs alone; otherwise the batch is the non-suspect jobs of the
    head's version and shape (non-batch dimensions: a sequence model's jobs of one length),
    oldest first, up to ``max_rows`` (a single larger job runs alone). Jobs of other shapes
    wait for their own batch; nothing is padded.
    """
    head = waiting[0]
    if head.suspect:
        return [head], list(waiting[1:])
    group = [w for w in waiting
             if w.version == head.version and w.shape == head.shape and not w.suspect]
    batch = group[: take([w.rows for w in group], max_rows)]
    chosen = {id(w) for w in batch}
    return batch, [w for w in waiting if id(w) not in chosen]


def online_first(waiting: Sequence[W], background: Callable[[W], bool]) -> list[W]:
    """The jobs that may form the next batch: the online (not ``background``) ones when
    any wait, oldest first, so an online job never shares a run with background rows;
    otherwise every background job."""
    online = [w for w in waiting if not background(w)]
    return online or list(waiting)


#: A background run takes at least ``max_rows`` over this many rows, however slow rows
#: seem (a busy machine inflates the measure): below that, the per-run overhead (an online
#: look, a model call) would cost the batch more throughput than it saves online latency.
BACKGROUND_MIN_PART = 16


class BackgroundCap:
    """How many background rows one model run may take (see ``BatchPolicy.background_run_s``).

    It learns the model's seconds per row from the background runs themselves, so the cap
    follows the model and the machine: about ``background_run_s`` of model time while online
    jobs are about (at least ``max_rows / BACKGROUND_MIN_PART`` rows, and one), ``max_rows``
    when they are not.
    """

    def __init__(self, policy: BatchPolicy) -> None:
        self.policy = policy
        #: Running average of seconds per background row; None before the first run.
        self.seconds_per_row: float | None = None
        self.online_seen = -1e18

    def saw_online(self, now: float) -> None:
        """Online jobs were waiting at ``now`` (monotonic seconds)."""
        self.online_seen = now

    def observe(self, rows: int, seconds: float) -> None:
        """A background run of ``rows`` rows took ``seconds``."""
        if rows <= 0 or seconds <= 0:
            return
        per_row = seconds / rows
        self.seconds_per_row = (per_row if self.seconds_per_row is None
                                else 0.8 * self.seconds_per_row + 0.2 * per_row)

    def online_recent(self, now: float) -> bool:
        return now - self.online_seen < self.policy.online_recent_s

    def rows(self, now: float) -> int:
        """Rows the next background run may take at ``now`` (monotonic seconds)."""
        limit = self.policy.max_rows
        if self.seconds_per_row is None or not self.online_recent(now):
            return limit
        fitting = int(self.policy.background_run_s / self.seconds_per_row)
        return max(limit // BACKGROUND_MIN_PART, 1, min(limit, fitting))
