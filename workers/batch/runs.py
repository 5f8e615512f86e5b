"""Starting, resuming and reading batch runs: what ``inferq batch`` calls.

A run is named by its ID and by its output: its directory ``<output>.inferq-batch/`` holds
``run.json`` (ID, parameters, the input's fingerprint), so ``--resume`` needs only the same
command line, and ``inferq batch resume RUN_ID`` reads the parameters from Redis instead.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import redis

from producer import InferenceClient
from producer.mapping import DEFAULT_CHUNK_ROWS
from producer.wire.connect import connect
from workers.batch import columns, readers, writers
from workers.batch.errors import BatchError
from workers.batch.progress import Summary
from workers.batch.runner import Runner, RunSpec, version_number
from workers.batch.spool import Spool, spool_dir
from workers.batch.state import DEFAULT_TTL_S, RunState, fingerprint, new_run_id

#: Parameters a resume may change: they do not change what the output holds.
OPERATIONAL = ("max_in_flight", "retries", "on_error", "timeout")


def state_redis(client: InferenceClient) -> redis.Redis:
    """The connection run state is kept through: the client's broker."""
    return connect(client.broker_url, timeout=5.0, retries=1)


def run(client: InferenceClient, spec: RunSpec, *, resume: bool = False,
        retry_failed: bool = False, ttl_s: int = DEFAULT_TTL_S, bar: bool | None = None,
        keep_spool: bool = False) -> Summary:
    """Run ``spec`` to its end; with ``resume``, finish the run that writes the same output
    (or start one, if there is none)."""
    spec = replace(spec, input=str(Path(spec.input).resolve()),
                   output=str(Path(spec.output).resolve()))
    spool = Spool(spool_dir(Path(spec.output)))
    r = state_redis(client)
    if spool.exists():
        doc = spool.run()
        if not resume:
            raise BatchError(
                f"an unfinished run {doc.get('run_id')} writes {spec.output} (its chunks are in "
                f"{spool.directory}): add --resume to finish it, or delete that directory to "
                "start over")
        stored = RunSpec(**doc["spec"])
        if (stored.model, stored.input) != (spec.model, spec.input):
            raise BatchError(f"run {doc['run_id']} scores {stored.input} with {stored.model}, "
                             f"not {spec.input} with {spec.model}: write elsewhere, or delete "
                             f"{spool.directory}")
        return _resume(client, r, doc, _with_operational(stored, spec), retry_failed, ttl_s,
                       bar, keep_spool)
    info = client.model(spec.model, version_number(spec.version))
    if isinstance(spec.version, str):
        # An unknown alias is refused now, as submit would refuse it, not at the first chunk.
        client._pin(spec.model, spec.version, [spec.input])
    if info is None:
        raise BatchError(f"no worker ever registered model {spec.model!r}, so its inputs are "
                         "unknown: start a worker that serves it")
    # Refused before anything is written: a run that cannot start leaves nothing behind.
    writers.check_output(Path(spec.output), info.outputs)
    readers.open_source(Path(spec.input), info.inputs, columns.parse(spec.columns),
                        spec.id_column, block_rows=1)
    if spec.chunk_rows is None:  # resolved now: a resume must cut the file the same way
        spec = replace(spec, chunk_rows=info.max_batch_rows or DEFAULT_CHUNK_ROWS)
    run_id = new_run_id()
    doc = {"run_id": run_id, "spec": spec.as_json(),
           "fingerprint": fingerprint(Path(spec.input)), "created": time.time()}
    spool.create(doc)
    state = RunState(r, run_id, ttl_s)
    state.create(doc)
    return Runner(client, spec, run_id, state, spool, bar=bar, keep_spool=keep_spool).run(
        resuming=False)


def resume(client: InferenceClient, run_id: str, *, overrides: dict[str, Any] | None = None,
           retry_failed: bool = False, ttl_s: int = DEFAULT_TTL_S, bar: bool | None = None,
           keep_spool: bool = False) -> Summary:
    """Finish run ``run_id``, on the host that holds its directory."""
    r = state_redis(client)
    doc = RunState(r, run_id, ttl_s).meta()
    spool = Spool(spool_dir(Path(doc["spec"]["output"])))
    if not spool.exists():
        raise BatchError(f"run {run_id}: no run directory {spool.directory} on this host (run "
                         "it where it started, or start a new run)")
    stored = RunSpec(**doc["spec"])
    spec = replace(stored, **{k: v for k, v in (overrides or {}).items()
                              if k in OPERATIONAL and v is not None})
    return _resume(client, r, spool.run(), spec, retry_failed, ttl_s, bar, keep_spool)


def _with_operational(stored: RunSpec, given: RunSpec) -> RunSpec:
    return replace(stored, **{k: getattr(given, k) for k in OPERATIONAL})


def _resume(client: InferenceClient, r: redis.Redis, doc: dict[str, Any], spec: RunSpec,
            retry_failed: bool, ttl_s: int, bar: bool | None, keep_spool: bool) -> Summary:
    run_id = doc["run_id"]
    now = fingerprint(Path(spec.input))
    if now != doc["fingerprint"]:
        raise BatchError(f"{spec.input} changed since run {run_id} started (size, time or "
                         f"content): its chunks would not match; delete "
                         f"{spool_dir(Path(spec.output))} to start over")
    spool = Spool(spool_dir(Path(spec.output)))
    if retry_failed:
        spool.forget_failures()
    state = RunState(r, run_id, ttl_s)
    if not state.exists():  # expired: the run directory still says what is done
        state.create(doc)
    return Runner(client, spec, run_id, state, spool, bar=bar, keep_spool=keep_spool).run(
        resuming=True)


def status(r: redis.Redis, run_id: str) -> dict[str, Any]:
    """Run ``run_id`` as Redis knows it: parameters, figures and the first failures."""
    state = RunState(r, run_id)
    doc = state.meta()
    counts = state.counts()
    return {"run_id": run_id, "spec": doc["spec"], "created": doc.get("created"),
            "counts": counts.__dict__, "summary": state.field("summary"),
            "failures": state.failures()}
