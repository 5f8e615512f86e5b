"""``inferq bench --batch``: a whole Parquet file of ``mlp`` rows through ``inferq batch``.

The bench writes the file (seeded rows, one fixed-size list column ``x`` and an ``id``),
runs ``inferq batch run`` as its own process (its RSS sampled), offers online jobs at a
steady 200/s with no batch running (before and after it) and during the batch (the same
worker, the same run), and checks a sample of the output against ONNX Runtime run directly.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from producer import InferenceClient, JobResult
from producer.errors import InferqError
from workers.bench import measure
from workers.bench.fleet import inferq_workers
from workers.launch.demo import percentiles
from workers.repository import load_manifest
from workers.serving import runtime

MODEL = "mlp"
T = TypeVar("T")
#: Rows per row group of the input file, and per generation step (bounded memory).
GROUP_ROWS = 65_536
SAMPLE_ROWS = 1000


def _group(start: int, rows: int, width: int) -> np.ndarray:
    """Rows ``start`` .. ``start + rows`` of the input: seeded per row group."""
    rng = np.random.default_rng(start)
    return (rng.random((rows, width), dtype=np.float32) * 16).astype(np.float32)


def write_input(path: Path, rows: int, width: int) -> None:
    """The bench's input: ``id`` and ``x`` (fixed-size list of ``width`` float32)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("id", pa.int64()), ("x", pa.list_(pa.float32(), width))])
    with pq.ParquetWriter(path, schema, compression="none") as writer:
        for start in range(0, rows, GROUP_ROWS):
            n = min(GROUP_ROWS, rows - start)
            values = pa.array(_group(start, n, width).reshape(-1))
            writer.write_table(pa.table({
                "id": pa.array(np.arange(start, start + n)),
                "x": pa.FixedSizeListArray.from_arrays(values, width)}, schema=schema))


def _sample_check(model_dir: Path, output: Path, rows: int, width: int) -> dict[str, Any]:
    """Outputs of ``SAMPLE_ROWS`` random rows against ONNX Runtime run in this process."""
    import pyarrow.parquet as pq

    manifest = load_manifest(model_dir / MODEL)
    session = runtime.load(manifest, manifest.latest, "cpu", 1)
    picks = np.sort(np.random.default_rng(7).choice(rows, min(SAMPLE_ROWS, rows),
                                                    replace=False))
    x = np.concatenate([_group(g, min(GROUP_ROWS, rows - g), width)[picks[(picks >= g) & (
        picks < g + GROUP_ROWS)] - g] for g in range(0, rows, GROUP_ROWS)])
    table = pq.read_table(output, columns=["id", "logits"]).take(picks)
    got = np.array(table.column("logits").to_pylist(), np.float32)
    want = session.run({"x": x})["logits"]
    return {"rows": len(picks), "ids_match": table.column("id").to_pylist() == picks.tolist(),
            "max_abs_diff": float(np.abs(got - want).max()),
            "allclose": bool(np.allclose(got, want, rtol=1e-4, atol=1e-4))}


#: Online jobs a second offered by the latency probe, quiet and during the batch.
ONLINE_RATE = 200.0
#: Seconds of each quiet probe (no batch running), before and after the batch: 6,000 jobs
#: in all, so that the quiet p99 (the ratio's denominator) rests on 60 jobs, not a handful.
QUIET_S = 15.0
#: Seconds after the batch command starts before the probe counts (reading, first chunks).
BATCH_WARMUP_S = 1.5


#: Seconds of the control probe: online jobs while plain CPU loops (one per core this
#: process may use, at the batch command's default nice 10) keep the cores busy, no batch.
HOG_S = 10.0
_HOG = "import os\nos.nice(10)\nwhile True:\n    pass\n"


#: Seconds between the Redis probe's PINGs.
PING_EVERY_S = 0.005

# The PING probe's own process: one thread, so no other thread of the bench (the online
# probe, the RSS sampler) holds a GIL it waits for; SIGTERM ends it, and it prints its round
# trips (ms) as one JSON list.
_PINGER = """
import json, signal, sys, time
from producer.wire.connect import connect
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
client, every, ms = connect(sys.argv[1]), float(sys.argv[2]), []
client.ping()
print("ready", flush=True)
while not stop:
    start = time.perf_counter()
    client.ping()
    ms.append(round((time.perf_counter() - start) * 1000, 4))
    time.sleep(every)
print(json.dumps(ms), flush=True)
"""


class _Pings:
    """PINGs Redis from a process of its own every ``PING_EVERY_S`` until stopped: the
    round trip any client of this Redis pays meanwhile, the floor under an online job's
    several (its push, the worker's take and store, its wake-up)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _PINGER, self.url, str(PING_EVERY_S)],
            stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            self.proc.wait()
            raise RuntimeError(f"the PING probe exited {self.proc.returncode}")

    def done(self) -> list[float]:
        """Stop; the round trips (ms)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return []
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
        return [float(ms) for ms in json.loads(out)] if proc.returncode == 0 else []


def _pinged(url: str, run: Callable[[], T]) -> tuple[T, list[float]]:
    """``run()`` with the PING probe beside it: what it returns, and the round trips (ms)."""
    pings = _Pings(url)
    pings.start()
    try:
        return run(), pings.done()
    finally:
        pings.done()  # when run() raised: the probe's process does not outlive it


def ping_figures(*runs: Sequence[float]) -> dict[str, Any]:
    pooled = [ms for run in runs for ms in run]
    return {**percentiles(pooled), "pings": len(pooled)} if pooled else {}


class _Online(threading.Thread):
    """Online jobs (priority 0) offered at a steady ``rate`` (open loop) until stopped.

    Latency is each job's own ``total`` (enqueued to stored), so a slow result reader in
    this process does not count; the stage breakdown says where the time went.
    """

    def __init__(self, client: InferenceClient, inputs: Sequence[dict[str, Any]],
                 rate: float = ONLINE_RATE) -> None:
        super().__init__(daemon=True)
        self.client, self.inputs, self.rate = client, inputs, rate
        self.stop, self.ids = threading.Event(), list[str]()
        self.seconds = 0.0
        #: How long each submit() took: the job's own push, round trip to Redis included.
        self.submit_ms = list[float]()
        #: Refused submits by error code: counted, and the probe goes on offering jobs.
        self.refused: Counter[str] = Counter()

    def run(self) -> None:
        start, sent = time.perf_counter(), 0
        while not self.stop.is_set():
            due = int((time.perf_counter() - start) * self.rate) + 1 - sent
            for _ in range(max(0, due)):
                pushed = time.perf_counter()
                try:
                    self.ids.append(self.client.submit(MODEL, self.inputs[sent % len(
                        self.inputs)]).id)
                    self.submit_ms.append((time.perf_counter() - pushed) * 1000)
                except InferqError as exc:
                    self.refused[exc.code] += 1
                sent += 1
            if due <= 0:
                self.stop.wait(0.25 / self.rate)
        self.seconds = time.perf_counter() - start


def figures(probes: Sequence[_Online]) -> dict[str, Any]:
    """Latency percentiles (ms) of every job the ``probes`` offered, with stages' p99."""
    ids = [i for p in probes for i in p.ids]
    refused = dict(sum((p.refused for p in probes), Counter[str]()))
    if not ids:
        return {"jobs": 0, "refused": refused}
    outcomes = probes[0].client.outcomes(ids, timeout=600)
    done = [r for r in outcomes if isinstance(r, JobResult)]
    if not done:
        return {"jobs": 0, "failed": len(outcomes)}
    out: dict[str, Any] = percentiles([float(r.timings_ms["total"] or 0) for r in done])
    for stage in ("queued", "batch_wait", "inference"):
        values = [float(v) for r in done if (v := r.timings_ms.get(stage)) is not None]
        if values:
            out[f"{stage}_p99"] = percentiles(values)["p99"]
    out["submit_ms"] = percentiles([x for p in probes for x in p.submit_ms])
    seconds = sum(p.seconds for p in probes)
    out.update(jobs=len(done), failed=len(outcomes) - len(done), refused=refused,
               jobs_per_s=round(len(done) / max(seconds, 1e-9), 1),
               mean_batch_rows=round(float(np.mean([r.batch_size for r in done])), 1))
    return out


def online_probe(client: InferenceClient, inputs: Sequence[dict[str, Any]],
                 seconds: float, rate: float = ONLINE_RATE) -> _Online:
    """Offer ``rate`` online jobs a second for ``seconds``; the probe, for :func:`figures`."""
    probe = _Online(client, inputs, rate)
    probe.start()
    time.sleep(seconds)
    probe.stop.set()
    probe.join()
    return probe


def hog_probe(client: InferenceClient, inputs: Sequence[dict[str, Any]],
              seconds: float = HOG_S) -> _Online:
    """The online probe while busy loops hold every core this process may use: what any
    CPU-saturating neighbour costs online jobs on this host, inferq's batch or not (the
    floor under the batch's p99 ratio where the batch must share the worker's cores)."""
    hogs = [subprocess.Popen([sys.executable, "-c", _HOG])
            for _ in os.sched_getaffinity(0)]
    try:
        return online_probe(client, inputs, seconds)
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


def _score(argv: Sequence[str], env: dict[str, str], log: Path, probe: _Online | None = None,
           pings: _Pings | None = None) -> tuple[dict[str, Any], list[int]]:
    """Run the batch command to its end: (its JSON summary, its RSS sampled every 0.1 s).
    With ``probe`` (and ``pings``), those start once the batch is under way."""
    rss: list[int] = []
    with open(log, "w") as err:
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=err)
        started = time.monotonic()
        while proc.poll() is None:
            if (probe is not None and probe.ident is None
                    and time.monotonic() - started >= BATCH_WARMUP_S):
                probe.start()
                if pings is not None:
                    pings.start()
            try:
                rss.append(measure.rss_bytes(proc.pid))
            except (OSError, ValueError):
                break
            time.sleep(0.1)
        out, _ = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"inferq batch run exited {proc.returncode}: see {log}")
    return json.loads(out), rss


def _isolated(stack: contextlib.ExitStack, url: str, model_dir: Path,
              gpus: Sequence[int] | None, logs: Path, redis_pid: int) -> list[int]:
    """Start the worker pinned to core(s) of its own (one ONNX Runtime thread each), move
    Redis and this process (and so the batch command it starts) to the others; the
    worker's cores."""
    from workers.bench.isolate import intra_op_threads, pin_process, pinned, split_cores

    every = sorted(os.sched_getaffinity(0))
    worker_cores, other_cores = split_cores(every)
    with pinned(worker_cores), intra_op_threads(len(worker_cores)):
        stack.enter_context(inferq_workers(url, model_dir, MODEL, 1, gpus,
                                           logs / "batch-isolated.log"))
    pin_process(redis_pid, other_cores)
    stack.callback(pin_process, redis_pid, every)
    stack.enter_context(pinned(other_cores))
    return worker_cores


def batch_phase(url: str, model_dir: Path, rows: int, gpus: Sequence[int] | None,
                logs: Path, saturation_rows_per_s: float | None,
                say: Callable[[str], None], options: Sequence[str] = (),
                isolate_redis_pid: int | None = None) -> dict[str, Any]:
    """Every figure of the batch phase (``options``: more ``inferq batch run`` options).

    With ``isolate_redis_pid``, as a fleet runs it: the worker on core(s) of its own, and
    Redis (that pid), the batch command and the online probe on the others.
    """
    manifest = load_manifest(model_dir / MODEL)
    width = int(manifest.inputs[0].shape[1])
    data, output = logs / "batch-input.parquet", logs / "batch-output.parquet"
    say(f"batch: writing {rows:,} {MODEL} rows to {data.name}")
    start = time.perf_counter()
    write_input(data, rows, width)
    say(f"  {data.stat().st_size / 1e6:,.0f} MB in {time.perf_counter() - start:.1f} s")
    inputs = measure.make_inputs(manifest, 64)
    env = {**os.environ, "INFERQ_BROKER_URL": url, "INFERQ_RESULT_URL": url}
    argv = [sys.executable, "-m", "workers.launch.cli", "batch", "run", MODEL, "--input",
            str(data), "--output", str(output), "--columns", "x=x", "--id-column", "id",
            "--json", *options]
    with contextlib.ExitStack() as stack:
        cores: list[int] | None = None
        if isolate_redis_pid is not None:
            cores = _isolated(stack, url, model_dir, gpus, logs, isolate_redis_pid)
        else:
            stack.enter_context(inferq_workers(url, model_dir, MODEL, 1, gpus,
                                               logs / "batch.log"))
        client = stack.enter_context(InferenceClient(url))
        client.results([h.id for h in client.submit_many(MODEL, inputs)], timeout=120)
        # The batch's own capacity first, no online job beside it: what online-first costs
        # it is the difference with the run below.
        say("  the batch alone, no online jobs")
        alone, alone_rss = _score(argv, env, logs / "batch-alone.log")
        say(f"  online probe: {ONLINE_RATE:.0f} jobs/s, {QUIET_S:.0f} s before and after the "
            "batch (quiet) and during it")
        before, calm_pings = _pinged(url, lambda: online_probe(client, inputs, QUIET_S))
        probe = _Online(client, inputs)
        busy_pings = _Pings(url)
        stack.callback(busy_pings.done)
        summary, rss = _score(argv, env, logs / "batch-command.log", probe, busy_pings)
        probe.stop.set()
        if probe.is_alive():
            probe.join()
        busy_ping = ping_figures(busy_pings.done())
        after, after_pings = _pinged(url, lambda: online_probe(client, inputs, QUIET_S))
        calm_ping = ping_figures(calm_pings, after_pings)
        say(f"  online probe with {len(os.sched_getaffinity(0))} busy loops at nice 10, "
            f"no batch, {HOG_S:.0f} s")
        hog, hog_pings = _pinged(url, lambda: hog_probe(client, inputs))
        hogged, hog_ping = figures([hog]), ping_figures(hog_pings)
        busy = figures([probe])
        # Quiet before and after, pooled: the machine's own noise drifts over a run.
        calm = figures([before, after])
        calm_each = [figures([before]).get("p99"), figures([after]).get("p99")]
    sample = _sample_check(model_dir, output, rows, width)

    def of_saturation(rows_per_s: float) -> float | None:
        return round(rows_per_s / saturation_rows_per_s, 3) if saturation_rows_per_s else None

    result = {
        "rows": summary["rows"], "seconds": round(summary["seconds"], 2),
        "rows_per_s": summary["rows_per_s"], "jobs": summary["jobs_submitted"],
        "saturation_rows_per_s": saturation_rows_per_s,
        "ratio_to_saturation": of_saturation(summary["rows_per_s"]),
        "alone_rows_per_s": alone["rows_per_s"], "alone_seconds": round(alone["seconds"], 2),
        "alone_ratio_to_saturation": of_saturation(alone["rows_per_s"]),
        "rss_max_mb": round(max(rss + alone_rss) / 1e6, 1) if rss or alone_rss else None,
        "rss_samples": len(rss),
        "input_mb": round(data.stat().st_size / 1e6, 1),
        "online_rate_per_s": ONLINE_RATE,
        "online_quiet_ms": calm, "online_quiet_p99_before_after_ms": calm_each,
        "online_during_batch_ms": busy,
        "redis_ping_quiet_ms": calm_ping, "redis_ping_during_batch_ms": busy_ping,
        "redis_ping_busy_loops_ms": hog_ping,
        "online_p99_ratio": round(busy["p99"] / calm["p99"], 2)
        if "p99" in busy and "p99" in calm else None,
        "online_with_busy_loops_ms": hogged,
        "busy_loops_p99_ratio": round(hogged["p99"] / calm["p99"], 2)
        if "p99" in hogged and "p99" in calm else None,
        "sample": sample, "command": " ".join(["inferq", *argv[3:]]),
        "worker_cores": cores,
    }
    say(f"  batch alone: {result['alone_rows_per_s']:,.0f} rows/s "
        f"({result['alone_ratio_to_saturation']} of saturation)")
    where = " (worker isolated)" if cores else ""
    say(f"  batch{where}: {result['rows']:,} rows in {result['seconds']} s "
        f"({result['rows_per_s']:,.0f} rows/s, {result['ratio_to_saturation']} of saturation), "
        f"RSS max {result['rss_max_mb']} MB; sample {sample}")
    say(f"  online at {ONLINE_RATE:.0f}/s: p50 / p99 {calm.get('p50', 0):.2f} / "
        f"{calm.get('p99', 0):.2f} ms quiet (p99 {calm_each[0]} before, {calm_each[1]} "
        f"after), {busy.get('p50', 0):.2f} / "
        f"{busy.get('p99', 0):.2f} ms during the batch ({busy.get('jobs', 0)} jobs): "
        f"p99 ratio {result['online_p99_ratio']}")
    say(f"  control, busy loops instead of the batch: p99 {hogged.get('p99', 0):.2f} ms, "
        f"ratio {result['busy_loops_p99_ratio']} (what any CPU-saturating neighbour costs "
        "online jobs here)")
    if calm.get("refused") or busy.get("refused") or hogged.get("refused"):
        say(f"  online submits refused, by code: {calm.get('refused')} quiet, "
            f"{busy.get('refused')} during the batch, {hogged.get('refused')} beside the "
            "busy loops")
    say(f"  a Redis PING (a process of its own, every {PING_EVERY_S * 1000:.0f} ms) p50 / p99: "
        f"{calm_ping.get('p50', 0):.2f} / {calm_ping.get('p99', 0):.2f} ms quiet, "
        f"{busy_ping.get('p50', 0):.2f} / {busy_ping.get('p99', 0):.2f} ms during the batch, "
        f"{hog_ping.get('p50', 0):.2f} / {hog_ping.get('p99', 0):.2f} ms beside the busy loops; "
        f"the online job's own submit() p99 "
        f"{calm.get('submit_ms', {}).get('p99', 0):.2f} ms quiet, "
        f"{busy.get('submit_ms', {}).get('p99', 0):.2f} ms during the batch")
    return result
