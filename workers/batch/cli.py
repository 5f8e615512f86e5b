"""``inferq batch run | resume | status``: parse, then one call into :mod:`.runs`.

Exit status of ``run`` and ``resume``: 0 every row scored; 4 finished, with failed rows
skipped (the errors file names them); 1 stopped (``--on-error fail``) or could not run;
130 interrupted. Interrupted and stopped runs resume where they left off.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import click

#: Exit status of a finished run whose failed rows were skipped.
EXIT_ROWS_FAILED = 4
EXIT_INTERRUPTED = 130


@click.group()
def batch() -> None:
    """Score a whole file through the workers: streaming, resumable, at low priority."""


def _operational(f: Any) -> Any:
    for option in reversed([
        click.option("--max-in-flight", type=click.IntRange(1), default=None,
                     help="Jobs outstanding at once (backpressure).  [default: 16]"),
        click.option("--retries", type=click.IntRange(0), default=None,
                     help="Times a chunk is sent again after a failure that may pass "
                          "(unavailable, overloaded, internal, lost).  [default: 2]"),
        click.option("--on-error", type=click.Choice(["skip", "fail"]), default=None,
                     help="A chunk that still fails: record its rows in the errors file and "
                          "go on (skip), or stop the run, resumable (fail).  [default: skip]"),
        click.option("--timeout", type=click.FloatRange(min=1), default=None,
                     help="Seconds one job may stay unanswered before it is sent again.  "
                          "[default: 600]"),
        click.option("--retry-failed", is_flag=True,
                     help="On resume, send the chunks that failed before again."),
        click.option("--keep-spool", is_flag=True,
                     help="Keep the run directory (one file per chunk) after the output is "
                          "written."),
        click.option("--json", "as_json", is_flag=True,
                     help="Print the summary as one JSON object."),
        click.option("--nice", "niceness", type=click.IntRange(0, 19), default=10,
                     show_default=True,
                     help="Scheduling priority of this command (os.nice): on a host shared "
                          "with online producers or workers, reading and writing files "
                          "yields the CPU to them. 0 keeps it."),
    ]):
        f = option(f)
    return f


@batch.command("run")
@click.argument("model")
@click.option("--input", "input_path", required=True, type=click.Path(path_type=Path),
              help="Parquet, CSV, .npy (the model's only input) or .npz (an array per input).")
@click.option("--output", "output_path", required=True, type=click.Path(path_type=Path),
              help="Parquet (a column per output, named after it) or .npy (one output); "
                   "rows in the input's order.")
@click.option("--columns", "column_specs", multiple=True, metavar="INPUT=COLUMNS",
              help="Columns of a model input, in order: pixels=p0:p63, pixels=a,b,c, or one "
                   "list column pixels=img (repeat per input; default: the column named "
                   "after the input). For .npz: INPUT=ARRAY.")
@click.option("--id-column", default=None, help="A column carried through to the output.")
@click.option("--chunk-rows", type=click.IntRange(1), default=None,
              help="Rows per job (default: the model's max_batch_rows).")
@click.option("--version", default=None, metavar="N|ALIAS",
              help="Model version: a number, 'latest' or an alias (such as canary), "
                   "resolved as submit does, each job pinned to what it resolved to.")
@click.option("--resume", is_flag=True,
              help="Finish the unfinished run writing --output (start one if there is none).")
@_operational
def run_command(model: str, input_path: Path, output_path: Path,
                column_specs: tuple[str, ...], id_column: str | None, chunk_rows: int | None,
                version: str | None, resume: bool, **options: Any) -> None:
    """Score every row of --input with MODEL into --output, at priority 9 (online first)."""
    from workers.batch import runs
    from workers.batch.runner import RunSpec

    spec = RunSpec(model=model, input=str(input_path), output=str(output_path),
                   columns=list(column_specs), id_column=id_column, chunk_rows=chunk_rows,
                   version=int(version) if version is not None and version.isdigit()
                   else version, **_given(options, defaults=True))
    _finish(lambda client, flags: runs.run(client, spec, resume=resume, **flags), options)


@batch.command("resume")
@click.argument("run_id")
@_operational
def resume_command(run_id: str, **options: Any) -> None:
    """Finish run RUN_ID where it left off (on the host holding its run directory)."""
    from workers.batch import runs

    overrides = _given(options, defaults=False)
    _finish(lambda client, flags: runs.resume(client, run_id, overrides=overrides, **flags),
            options)


@batch.command("status")
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def status_command(run_id: str, as_json: bool) -> None:
    """A run's progress, from any host (reads Redis)."""
    from producer.wire.connect import broker_url, connect
    from workers.batch import runs

    doc = runs.status(connect(broker_url(), timeout=5.0, retries=1), run_id)
    if as_json:
        click.echo(json.dumps(doc))
        return
    spec, c = doc["spec"], doc["counts"]
    total = f"/{c['chunks']:,}" if c["chunks"] is not None else ""
    rows = f"/{c['rows_total']:,}" if c["rows_total"] is not None else ""
    version = spec["version"] if spec["version"] is not None else "latest"
    click.echo(f"run {run_id}: {spec['model']} (version {version}) {spec['input']} -> "
               f"{spec['output']}")
    click.echo(f"status   {c['status']}, updated {time.time() - c['updated']:,.0f} s ago on "
               f"{c['host']}")
    click.echo(f"chunks   {c['chunks_done']:,}{total} done, {c['chunks_failed']:,} failed, "
               f"{c['in_flight']:,} in flight")
    click.echo(f"rows     {c['rows_done']:,}{rows} done, {c['rows_failed']:,} failed; "
               f"{c['jobs_submitted']:,} jobs submitted")
    for failure in doc["failures"]:
        click.echo(f"failed   rows {failure['first_row']}-{failure['last_row']}: "
                   f"{failure['code']}: {failure['message']}")
    if doc["summary"]:
        click.echo("summary  " + json.dumps(doc["summary"]))


_DEFAULTS = {"max_in_flight": 16, "retries": 2, "on_error": "skip", "timeout": 600.0}


def _given(options: dict[str, Any], *, defaults: bool) -> dict[str, Any]:
    """The operational options given (with their defaults, for a new run)."""
    out = {k: options[k] for k in _DEFAULTS if options.get(k) is not None}
    return {**_DEFAULTS, **out} if defaults else out


def _finish(call: Any, options: dict[str, Any]) -> None:
    """Run ``call(client, flags)``, print its summary, exit with the run's status."""
    from producer import InferenceClient
    from workers.batch.errors import BatchInterrupted, BatchStopped

    flags = {"retry_failed": options["retry_failed"], "keep_spool": options["keep_spool"]}
    if options["niceness"]:
        os.nice(options["niceness"])
    try:
        with InferenceClient() as client:
            summary = call(client, flags)
    except BatchInterrupted as exc:
        click.echo(f"\n{exc}", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except KeyboardInterrupt:
        click.echo("\ninterrupted before the run started", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except BatchStopped as exc:
        click.echo(str(exc), err=True)
        sys.exit(1)
    if options["as_json"]:
        click.echo(json.dumps(summary.as_json()))
    else:
        for line in summary.lines():
            click.echo(line)
    sys.exit(EXIT_ROWS_FAILED if summary.rows_failed else 0)
