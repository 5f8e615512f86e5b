"""One batch run: read chunks, keep a bounded window of jobs in flight, file each outcome.

The loop reads the input in chunks (:mod:`.readers`), skips those the run directory already
holds, takes over the jobs an earlier invocation left in flight (their IDs are in Redis),
submits the rest at priority 9 through :class:`producer.mapping.Window`, and writes each
chunk's outputs to the run directory as it arrives (:mod:`.spool`). A failed chunk is sent
again up to ``retries`` times when its failure may pass (UNAVAILABLE, RESOURCE_EXHAUSTED,
DEADLINE_EXCEEDED, INTERNAL, a job lost or unanswered); then it is recorded with its rows
(``on_error="skip"``) or stops the run (``"fail"``). Once every chunk has a file, the
output is assembled in input order (:mod:`.writers`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from producer import InferenceClient, JobFailed, JobResult, JobTimeout, UnknownJob
from producer.mapping import Window
from workers.batch import columns, readers, writers
from workers.batch.errors import BatchError, BatchInterrupted, BatchStopped
from workers.batch.progress import Progress, Summary, count
from workers.batch.readers import Chunk
from workers.batch.spool import Spool, errors_path
from workers.batch.state import RunState

log = logging.getLogger(__name__)

#: Failure codes that may pass when the chunk is sent again.
RETRYABLE = frozenset({"UNAVAILABLE", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "INTERNAL",
                       "WAIT_TIMEOUT", "LOST"})
#: Bad rows named one by one in an error record; beyond, only their count.
_NAMED_ROWS = 20


@dataclass
class RunSpec:
    """A batch run's parameters, kept in the run directory and in Redis."""

    model: str
    input: str
    output: str
    columns: list[str]
    id_column: str | None
    chunk_rows: int | None
    max_in_flight: int = 16
    #: A number, ``latest``, an alias, or None: resolved at each job's submission.
    version: int | str | None = None
    retries: int = 2
    on_error: str = "skip"
    timeout: float = 600.0
    priority: int = 9

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def version_number(version: int | str | None) -> int | None:
    """The version to read the model's signature for: an alias or ``latest`` reads the
    model's (a version's signature is the model's)."""
    return version if isinstance(version, int) else None


class Runner:
    """Drives one run of ``spec`` to its end (or to an interruption, resumable)."""

    def __init__(self, client: InferenceClient, spec: RunSpec, run_id: str, state: RunState,
                 spool: Spool, *, bar: bool | None = None, keep_spool: bool = False) -> None:
        self.client, self.spec, self.run_id = client, spec, run_id
        self.state, self.spool, self.bar, self.keep_spool = state, spool, bar, keep_spool
        self.live: dict[int, Chunk] = {}
        self.tries: dict[int, int] = {}
        #: Chunks to send again (after a failure that may pass), before any new one.
        self.again: list[Chunk] = []
        #: Chunks filed this round, for Redis: (index, rows, error or None).
        self.filed: list[tuple[int, int, dict[str, Any] | None]] = []
        self.total = 0
        self.adopted = self.retries = 0

    def run(self, *, resuming: bool) -> Summary:
        """Run to the end and assemble the output; BatchStopped (``on_error="fail"``) and
        BatchInterrupted (Ctrl-C) leave a resumable run."""
        spec, started = self.spec, time.monotonic()
        info = self.client.model(spec.model, version_number(spec.version))
        if info is None:
            raise BatchError(f"no worker ever registered model {spec.model!r}, so its inputs "
                             "are unknown: start a worker that serves it")
        chunk_rows = spec.chunk_rows or info.max_batch_rows or 64
        source = readers.open_source(Path(spec.input), info.inputs, columns.parse(spec.columns),
                                     spec.id_column, block_rows=max(chunk_rows * 8, 4096))
        self.specs = info.outputs
        self.schema = writers.output_schema(info.outputs, source.id_field)
        writers.check_output(Path(spec.output), info.outputs)
        if source.total_rows is not None:
            self.state.set(rows_total=source.total_rows,
                           chunks=-(-source.total_rows // chunk_rows))
        finished = self.spool.finished()
        recorded = self.state.jobs() if resuming else {}
        done = sum(self.spool.rows(i) for i, bad in finished.items() if not bad)
        failed = sum(self.spool.rows(i) for i, bad in finished.items() if bad)
        # A crash can land between a chunk's file and its Redis record: the file wins.
        self.state.resumed(done, failed, sum(not b for b in finished.values()),
                           sum(finished.values()), forget=[i for i in recorded if i in finished])
        self.progress = Progress(
            self.run_id, source.total_rows, done, failed, bar=self.bar,
            title=f"run {self.run_id}: {spec.model} {spec.input} -> {spec.output}")
        self.window: Window[int] = Window(
            self.client, spec.model, max_in_flight=spec.max_in_flight, version=spec.version,
            priority=spec.priority, timeout=spec.timeout)
        try:
            self._loop(readers.chunks(source, chunk_rows), finished, recorded)
        except KeyboardInterrupt:
            self.state.set(status="interrupted")
            raise BatchInterrupted(
                f"interrupted: the jobs in flight go on; finish run {self.run_id} with the same "
                f"command and --resume, or: inferq batch resume {self.run_id}") from None
        except BatchStopped:
            self.state.set(status="stopped")
            raise
        finally:
            self.progress.close()
        total = self.total
        stats = writers.assemble(self.spool, total, Path(spec.output), self.schema,
                                 info.outputs)
        summary = Summary(
            run_id=self.run_id, model=spec.model, output=spec.output, rows=stats.rows,
            rows_failed=sum(stats.failed.values()), seconds=time.monotonic() - started,
            rows_this_run=self.progress.done + self.progress.failed - self.progress.start_done,
            failed_by_code=count(stats.failed), rows_by_version=count(stats.versions),
            jobs_submitted=self.window.submitted, jobs_adopted=self.adopted,
            retries=self.retries,
            errors_file=str(errors_path(Path(spec.output))) if stats.failed else None)
        self.state.set(status="finished", summary=summary.as_json())
        if not self.keep_spool:
            self.spool.remove()
        return summary

    # --- the loop ---------------------------------------------------------------------

    def _loop(self, chunks: Iterator[Chunk], finished: dict[int, bool],
              recorded: dict[int, str]) -> None:
        """Rounds of: refill the window (retries first, then new chunks), wait for
        outcomes, file them. Everything a round writes to Redis goes in a few pipelines."""
        self.total, exhausted = 0, False
        while True:
            fresh, self.again = self.again[:self.window.free], self.again[self.window.free:]
            while not exhausted and self.window.free > len(fresh):
                chunk = next(chunks, None)
                if chunk is None:
                    exhausted = True
                    self.state.set(chunks=self.total)
                    break
                self.total = chunk.index + 1
                if chunk.index in finished:
                    continue
                if chunk.bad:
                    self._fail_bad_rows(chunk)
                    continue
                self.live[chunk.index] = chunk
                if recorded.get(chunk.index):
                    self.adopted += 1
                    self.window.adopt(chunk.index, recorded[chunk.index])
                else:
                    fresh.append(chunk)
            self._submit(fresh)
            self._flush()
            if exhausted and not len(self.window) and not self.again:
                return
            self._collect()

    def _submit(self, chunks: list[Chunk]) -> None:
        if not chunks:
            return
        # Marked first: a crash between the push and the job IDs being recorded leaves
        # empty IDs, and a resume sends those chunks again rather than missing them.
        self.state.submitting([c.index for c in chunks])
        ids = self.window.submit_many([(c.index, c.inputs) for c in chunks])
        self.state.submitted({c.index: i for c, i in zip(chunks, ids, strict=True)
                              if i is not None})

    def _flush(self) -> None:
        if self.filed:
            self.state.finished_chunks(self.filed)
            self.filed = []

    def _collect(self) -> None:
        try:
            outcomes = self.window.wait()
        except JobTimeout as exc:
            lost = JobFailed(f"no result after {self.spec.timeout}s", code="WAIT_TIMEOUT",
                             model=self.spec.model)
            outcomes = [(i, None, lost) for i in self.window.drop(exc.job_ids)]
        for index, job_id, outcome in outcomes:
            chunk = self.live[index]
            if isinstance(outcome, JobResult):
                self._done(chunk, outcome)
            else:
                self._failed(chunk, job_id, outcome)

    # --- one chunk ---------------------------------------------------------------------

    def _fail_bad_rows(self, chunk: Chunk) -> None:
        rows = sorted(chunk.bad)
        named = "; ".join(chunk.bad[r] for r in rows[:_NAMED_ROWS])
        more = f" (and {len(rows) - _NAMED_ROWS} more)" if len(rows) > _NAMED_ROWS else ""
        self._fail(chunk, None, "INVALID_ARGUMENT", f"not sent: {named}{more}", bad_rows=rows)

    def _done(self, chunk: Chunk, result: JobResult) -> None:
        meta = {writers.VERSION_KEY: str(result.version).encode(),
                writers.WORKER_KEY: result.worker.encode()}
        try:
            table = writers.chunk_table(self.schema, self.specs, chunk.rows, result.outputs,
                                        chunk.ids, meta)
        except BatchError as exc:
            self._fail(chunk, result.id, "INTERNAL", str(exc))
            return
        self.spool.write(chunk.index, table)
        self.filed.append((chunk.index, chunk.rows, None))
        del self.live[chunk.index]
        self.progress.advance(chunk.rows)

    def _failed(self, chunk: Chunk, job_id: str | None, error: JobFailed) -> None:
        code = "LOST" if isinstance(error, UnknownJob) else error.code
        tries = self.tries[chunk.index] = self.tries.get(chunk.index, 0) + 1
        if code in RETRYABLE and tries <= self.spec.retries:
            self.retries += 1
            log.info("chunk %d failed (%s: %s), sending it again (%d of %d)", chunk.index,
                     code, error.message, tries, self.spec.retries)
            if job_id is None:  # refused at submit (queue full, Redis busy): back off
                time.sleep(min(0.5 * 2 ** tries, 10.0))
            self.again.append(chunk)
            return
        self._fail(chunk, job_id or error.job_id, code, error.message)

    def _fail(self, chunk: Chunk, job_id: str | None, code: str, message: str,
              bad_rows: list[int] | None = None) -> None:
        error: dict[str, Any] = {
            "chunk": chunk.index, "first_row": chunk.first_row,
            "last_row": chunk.first_row + chunk.rows - 1, "rows": chunk.rows, "code": code,
            "message": message, "job_id": job_id, "tries": self.tries.get(chunk.index, 0)}
        if bad_rows is not None:
            error["bad_rows"] = bad_rows
        if chunk.ids is not None:
            error["ids"] = json.loads(json.dumps(chunk.ids.to_pylist(), default=str))
        self.live.pop(chunk.index, None)
        if self.spec.on_error == "fail":
            # No chunk file: a resume, once the cause is fixed, sends the chunk again.
            self._flush()
            self.state.stopped_at(chunk.index, error)
            raise BatchStopped(
                f"rows {error['first_row']}-{error['last_row']} (chunk {chunk.index}) failed: "
                f"{code}: {message}\nstopped (--on-error fail); fix the cause, then resume: "
                f"inferq batch resume {self.run_id}")
        self.spool.write(chunk.index, writers.chunk_table(self.schema, self.specs, chunk.rows,
                                                          None, chunk.ids), error)
        self.filed.append((chunk.index, chunk.rows, error))
        self.progress.advance(chunk.rows, failed=True)
