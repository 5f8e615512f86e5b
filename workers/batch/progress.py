"""Progress of a batch run while it goes, and its summary at the end.

On a terminal a live bar (tqdm: rows, rows/s, ETA, failed rows); otherwise one JSON line
every few seconds (``event: batch_progress``), fit for a log collector.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import IO, Any

#: Seconds between two JSON progress lines.
LOG_INTERVAL_S = 5.0


class Progress:
    """Rows done and failed so far, shown as a bar or logged as JSON lines."""

    def __init__(self, run_id: str, total: int | None, done: int = 0, failed: int = 0, *,
                 stream: IO[str] | None = None, bar: bool | None = None,
                 interval_s: float = LOG_INTERVAL_S, title: str = "") -> None:
        self.stream = stream or sys.stderr
        self.run_id, self.total = run_id, total
        self.done, self.failed, self.start_done = done, failed, done + failed
        self.interval_s = interval_s
        self.started = self._logged = time.monotonic()
        self._bar: Any = None
        if self.stream.isatty() if bar is None else bar:
            from tqdm import tqdm

            if title:
                self.stream.write(title + "\n")
            self._bar = tqdm(total=total, initial=done + failed, unit="rows", unit_scale=True,
                             file=self.stream, dynamic_ncols=True, smoothing=0.1)
            self._bar.set_postfix(failed=failed)
        else:
            self._emit({"event": "batch_started", "run_id": run_id, "title": title,
                        "rows_total": total, "rows_done": done, "rows_failed": failed})

    @property
    def rows_per_s(self) -> float:
        elapsed = time.monotonic() - self.started
        return (self.done + self.failed - self.start_done) / elapsed if elapsed > 0 else 0.0

    def advance(self, rows: int, failed: bool = False) -> None:
        """Count ``rows`` more rows, done or failed."""
        if failed:
            self.failed += rows
        else:
            self.done += rows
        if self._bar is not None:
            self._bar.update(rows)
            if failed:
                self._bar.set_postfix(failed=self.failed)
        elif time.monotonic() - self._logged >= self.interval_s:
            self.log()

    def log(self) -> None:
        """One JSON progress line."""
        self._logged = time.monotonic()
        rate = self.rows_per_s
        left = None if self.total is None else self.total - self.done - self.failed
        self._emit({
            "event": "batch_progress", "run_id": self.run_id, "rows_done": self.done,
            "rows_failed": self.failed, "rows_total": self.total,
            "rows_per_s": round(rate, 1),
            "eta_s": None if left is None or rate <= 0 else round(left / rate, 1),
        })

    def _emit(self, doc: dict[str, Any]) -> None:
        self.stream.write(json.dumps(doc) + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.done + self.failed > self.start_done:
            self.log()


@dataclass
class Summary:
    """What a batch run did: the whole output's figures, and this invocation's work."""

    run_id: str
    model: str
    output: str
    rows: int
    rows_failed: int
    seconds: float
    rows_this_run: int
    failed_by_code: dict[str, int] = field(default_factory=dict)
    rows_by_version: dict[int, int] = field(default_factory=dict)
    jobs_submitted: int = 0
    jobs_adopted: int = 0
    retries: int = 0
    errors_file: str | None = None

    @property
    def rows_per_s(self) -> float:
        return self.rows_this_run / self.seconds if self.seconds > 0 else 0.0

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "rows_per_s": round(self.rows_per_s, 1)}

    def lines(self) -> list[str]:
        """The summary a person reads."""
        failed = ", ".join(f"{code} {n:,}" for code, n in sorted(self.failed_by_code.items()))
        versions = ", ".join(f"v{v} ({n:,} rows)" for v, n in
                             sorted(self.rows_by_version.items()))
        out = [
            f"run {self.run_id}: {self.model} -> {self.output}",
            f"rows           {self.rows:,} ({self.rows - self.rows_failed:,} scored, "
            f"{self.rows_failed:,} failed)",
            f"this run       {self.rows_this_run:,} rows in {self.seconds:.1f} s "
            f"({self.rows_per_s:,.0f} rows/s)",
            f"jobs           {self.jobs_submitted:,} submitted, {self.jobs_adopted:,} taken "
            f"over from an earlier run, {self.retries:,} retries",
            f"versions       {versions or 'none'}"
            + ("  (more than one: the model changed during the run)"
               if len(self.rows_by_version) > 1 else ""),
        ]
        if failed:
            out.append(f"failed rows    {failed}; which rows and why: {self.errors_file}")
        return out


def count(items: Counter[Any]) -> dict[Any, int]:
    """A Counter as a plain dict, for JSON."""
    return dict(sorted(items.items()))
