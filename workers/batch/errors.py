"""Errors of ``inferq batch``: each says what to change, in one or two lines."""

from __future__ import annotations

from workers.errors import WorkerError


class BatchError(WorkerError):
    """A batch run cannot start or go on as asked (input, columns, output, run state)."""


class BatchStopped(BatchError):
    """A chunk failed for good and ``--on-error fail`` stopped the run (resumable)."""


class BatchInterrupted(BatchError):
    """Ctrl-C stopped a run; the jobs in flight go on, and the run resumes where it was."""
