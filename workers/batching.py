"""Batching: *when* to flush (the policy) apart from *how* to combine and split (pure numpy)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

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
