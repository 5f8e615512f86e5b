"""``inferq bench --gateway``: the HTTP gateway and the asyncio client against the sync client.

On the ``mlp`` model, one inferq worker, one gateway process (``inferq gateway serve``, one
uvicorn worker, its rate limit on but out of reach) and the bench process as the caller:

* jobs/s: the sync client (``submit_many`` + ``results``); HTTP ``jobs:batch`` then one
  ``GET /v1/jobs/{id}?wait=`` per job; HTTP one job per request (``POST .../jobs`` then the
  ``GET``); the asyncio client (many concurrent ``submit`` + ``result``, and
  ``submit_many`` + ``results``);
* one job at a time (p50/p99): the sync client's ``submit`` + ``result``, HTTP
  ``:predict`` and the asyncio client's ``submit`` + ``result``, interleaved job by job so
  that a noisy neighbour slows all three alike.

The HTTP caller is a raw HTTP/1.1 keep-alive socket (:class:`Http`, one per thread), with
every request body encoded before the clock starts: the figures are the gateway's, not the
caller's.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from producer import InferenceClient
from producer.aio import AsyncInferenceClient
from producer.wire.connect import connect
from workers.bench import measure
from workers.bench.fleet import inferq_workers
from workers.gateway import keys
from workers.launch.demo import percentiles
from workers.launch.redisproc import free_port
from workers.repository import load_manifest

MODEL = "mlp"
HTTP_CLIENT = "raw HTTP/1.1 keep-alive socket (one connection per caller thread)"
#: Caller threads (one keep-alive connection each) for the HTTP throughput runs.
THREADS = 8
#: Jobs per ``jobs:batch`` request, and per sync ``submit_many`` call.
BATCH = 256
#: Concurrent submit + result tasks of the asyncio client.
CONCURRENCY = 256


@dataclass(frozen=True)
class GatewayLoad:
    """Jobs each measure sends."""

    client: int = 10_000
    http_batch: int = 10_000
    http_single: int = 4_000
    aio: int = 5_000
    one_at_a_time: int = 500


QUICK = GatewayLoad(client=1_000, http_batch=1_000, http_single=400, aio=1_000,
                    one_at_a_time=60)


class Http:
    """One keep-alive HTTP/1.1 connection to the gateway, with the API key: each request
    written as one buffer, each answer read by its Content-Length (every gateway answer has
    one). ``http.client`` would add about 0.1 ms of the caller's CPU to every request."""

    def __init__(self, port: int, key: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=120)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.head = (f"Host: 127.0.0.1:{port}\r\nAuthorization: Bearer {key}\r\n"
                     "Content-Type: application/json\r\n").encode()
        self.buffer = b""

    def call(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        body = body or b""
        self.sock.sendall(b"%s %s HTTP/1.1\r\n%sContent-Length: %d\r\n\r\n%s" % (
            method.encode(), path.encode(), self.head, len(body), body))
        while True:
            head, found, rest = self.buffer.partition(b"\r\n\r\n")
            if found:
                length = int(head.lower().split(b"\r\ncontent-length:", 1)[1]
                             .split(b"\r\n", 1)[0])
                if len(rest) >= length:
                    self.buffer = rest[length:]
                    return int(head[9:12]), rest[:length]
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("the gateway closed the connection")
            self.buffer += chunk

    def ok(self, method: str, path: str, body: bytes | None = None) -> Any:
        status, raw = self.call(method, path, body)
        if status not in (200, 202):
            raise RuntimeError(f"{method} {path}: {status} {raw[:500]!r}")
        return json.loads(raw)

    def close(self) -> None:
        self.sock.close()


def _tensor(row: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"name": name, "datatype": "FP32", "shape": list(arr.shape),
             "data": arr.reshape(-1).tolist()} for name, arr in row.items()]


def job_bodies(inputs: Sequence[dict[str, Any]]) -> list[bytes]:
    """Each input as a ``POST .../jobs`` / ``:predict`` body (JSON, flat ``data``)."""
    return [json.dumps({"inputs": _tensor(row)}).encode() for row in inputs]


def batch_body(inputs: Sequence[dict[str, Any]], jobs: int) -> bytes:
    """A ``jobs:batch`` body of ``jobs`` jobs."""
    return json.dumps({"jobs": [{"inputs": _tensor(inputs[i % len(inputs)])}
                                for i in range(jobs)]}).encode()


@contextlib.contextmanager
def gateway_process(url: str, log: Path) -> Iterator[tuple[int, int]]:
    """``inferq gateway serve`` on a free loopback port; yields (port, pid)."""
    port = free_port()
    env = {**os.environ, "INFERQ_BROKER_URL": url, "INFERQ_RESULT_URL": url,
           "INFERQ_LOG_FORMAT": "json"}
    argv = [sys.executable, "-m", "workers.launch.cli", "gateway", "serve", "--port",
            str(port), "--rate-limit", "1000000"]
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=out, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the gateway did not start (exit {proc.poll()}): see {log}")
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            try:
                conn.request("GET", "/readyz")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                pass
            finally:
                conn.close()
            time.sleep(0.1)
        yield port, proc.pid
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _threads(work: Callable[[int], None], count: int) -> float:
    """Run ``work(i)`` for i < count in threads; the seconds until the last one ends."""
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            work(i)
        except BaseException as exc:  # reported below, in the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - start


def http_throughput(port: int, key: str, bodies: Sequence[bytes], batch: bytes | None,
                    jobs: int) -> float:
    """Jobs/s over HTTP: each caller thread submits its share (``batch``: ``jobs:batch``
    requests of :data:`BATCH` jobs; None: one ``POST .../jobs`` per job), then reads each
    of its jobs with ``GET /v1/jobs/{id}?wait=60``."""
    share = jobs // THREADS

    def caller(i: int) -> None:
        conn = Http(port, key)
        try:
            ids: list[str] = []
            if batch is not None:
                for _ in range(max(1, share // BATCH)):
                    doc = conn.ok("POST", f"/v1/models/{MODEL}/jobs:batch", batch)
                    ids += [j["job_id"] for j in doc["jobs"]]
            else:
                for n in range(share):
                    ids.append(conn.ok("POST", f"/v1/models/{MODEL}/jobs",
                                       bodies[(i * share + n) % len(bodies)])["job_id"])
            for job_id in ids:
                status, raw = conn.call("GET", f"/v1/jobs/{job_id}?wait=60")
                if status != 200 or b'"SUCCESS"' not in raw:
                    raise RuntimeError(f"job {job_id}: {status} {raw[:300]!r}")
        finally:
            conn.close()

    sent = (max(1, share // BATCH) * BATCH if batch is not None else share) * THREADS
    return sent / _threads(caller, THREADS)


def client_throughput(client: InferenceClient, inputs: Sequence[dict[str, Any]],
                      jobs: int) -> float:
    """Jobs/s of the sync client: ``submit_many`` of :data:`BATCH`, then ``results``."""
    start = time.perf_counter()
    ids: list[str] = []
    for first in range(0, jobs, BATCH):
        chunk = [inputs[i % len(inputs)] for i in range(first, min(jobs, first + BATCH))]
        ids += [h.id for h in client.submit_many(MODEL, chunk)]
    client.results(ids, timeout=600)
    return jobs / (time.perf_counter() - start)


class AsyncRunner:
    """The asyncio client on an event loop in its own thread, driven from this one."""

    def __init__(self, url: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.client = self.run(self._open(url))

    @staticmethod
    async def _open(url: str) -> AsyncInferenceClient:
        return AsyncInferenceClient(url, max_connections=32)

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    async def one(self, row: dict[str, Any]) -> float:
        """One job's submit + result, in ms timed on the loop (the thread hand-off that
        drives it is not the client's)."""
        start = time.perf_counter()
        await (await self.client.submit(MODEL, row)).result(timeout=60)
        return (time.perf_counter() - start) * 1000

    async def concurrent(self, inputs: Sequence[dict[str, Any]], jobs: int) -> float:
        gate = asyncio.Semaphore(CONCURRENCY)

        async def job(i: int) -> None:
            async with gate:
                await self.one(inputs[i % len(inputs)])

        start = time.perf_counter()
        await asyncio.gather(*(job(i) for i in range(jobs)))
        return jobs / (time.perf_counter() - start)

    async def bulk(self, inputs: Sequence[dict[str, Any]], jobs: int) -> float:
        start = time.perf_counter()
        ids: list[str] = []
        for first in range(0, jobs, BATCH):
            chunk = [inputs[i % len(inputs)] for i in range(first, min(jobs, first + BATCH))]
            ids += [h.id for h in await self.client.submit_many(MODEL, chunk)]
        await self.client.results(ids, timeout=600)
        return jobs / (time.perf_counter() - start)

    def close(self) -> None:
        self.run(self.client.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


def one_at_a_time(client: InferenceClient, conn: Http, runner: AsyncRunner,
                  inputs: Sequence[dict[str, Any]], bodies: Sequence[bytes], jobs: int
                  ) -> dict[str, list[float]]:
    """Round-trip ms of the sync client, ``:predict`` and the asyncio client, one job
    after another, the three interleaved."""
    out: dict[str, list[float]] = {"client": [], "predict": [], "aio": []}
    for i in range(jobs):
        row, body = inputs[i % len(inputs)], bodies[i % len(bodies)]
        start = time.perf_counter()
        client.submit(MODEL, row).result(timeout=60)
        out["client"].append((time.perf_counter() - start) * 1000)
        start = time.perf_counter()
        conn.ok("POST", f"/v1/models/{MODEL}:predict", body)
        out["predict"].append((time.perf_counter() - start) * 1000)
        out["aio"].append(runner.run(runner.one(row)))
    return out


def gateway_phase(url: str, model_dir: Path, workers: int, gpus: Sequence[int] | None,
                  logs: Path, say: Callable[[str], None], quick: bool = False
                  ) -> dict[str, Any]:
    """Every figure of the gateway phase."""
    load = QUICK if quick else GatewayLoad()
    manifest = load_manifest(model_dir / MODEL)
    inputs = measure.make_inputs(manifest, 256)
    bodies = job_bodies(inputs)
    batch = batch_body(inputs, BATCH)
    key, _ = keys.create(
        connect(url), f"bench-{os.getpid()}-{time.time_ns()}", (MODEL,), {"submit", "read"})
    say(f"gateway: {MODEL}, {workers} worker(s), one gateway process; HTTP caller: "
        f"{HTTP_CLIENT}")
    with inferq_workers(url, model_dir, MODEL, workers, gpus, logs / "gateway-bench.log"), \
            gateway_process(url, logs / "gateway.log") as (port, gateway_pid), \
            InferenceClient(url) as client:
        runner = AsyncRunner(url)
        conn = Http(port, key)
        try:
            # Warm every path: the worker's batches, connections, the gateway's caches.
            client.results([h.id for h in client.submit_many(MODEL, inputs)], timeout=120)
            one_at_a_time(client, conn, runner, inputs, bodies, 30)
            http_throughput(port, key, bodies, batch, BATCH * THREADS)
            low = one_at_a_time(client, conn, runner, inputs, bodies, load.one_at_a_time)
            say(f"  one at a time: {load.one_at_a_time} jobs each")
            rates: dict[str, float] = {}
            cpu: dict[str, float] = {}
            meter = measure.CpuMeter({"gateway": gateway_pid})
            rates["client"] = client_throughput(client, inputs, load.client)
            with meter:
                rates["http_batch"] = http_throughput(port, key, bodies, batch,
                                                      load.http_batch)
            cpu["http_batch"] = meter.used["gateway"] / load.http_batch
            meter = measure.CpuMeter({"gateway": gateway_pid})
            with meter:
                rates["http_single"] = http_throughput(port, key, bodies, None,
                                                       load.http_single)
            cpu["http_single"] = meter.used["gateway"] / load.http_single
            rates["aio_concurrent"] = runner.run(runner.concurrent(inputs, load.aio))
            rates["aio_bulk"] = runner.run(runner.bulk(inputs, load.aio))
        finally:
            conn.close()
            runner.close()
    lat = {name: percentiles(values) for name, values in low.items()}
    added = round(lat["predict"]["p50"] - lat["client"]["p50"], 3)
    return {
        "model": MODEL, "http_client": HTTP_CLIENT, "http_threads": THREADS,
        "aio_loop": "asyncio's default loop, in a thread of the bench process",
        "batch_jobs_per_request": BATCH, "aio_concurrency": CONCURRENCY, "load": vars(load),
        "client_jobs_per_s": round(rates["client"], 1),
        "http_batch_jobs_per_s": round(rates["http_batch"], 1),
        "http_single_jobs_per_s": round(rates["http_single"], 1),
        "aio_concurrent_jobs_per_s": round(rates["aio_concurrent"], 1),
        "aio_submit_many_jobs_per_s": round(rates["aio_bulk"], 1),
        "gateway_cpu_ms_per_job": {k: round(v * 1000, 3) for k, v in cpu.items()},
        "one_at_a_time_ms": lat,
        "predict_added_p50_ms": added,
        "predict_added_p99_ms": round(lat["predict"]["p99"] - lat["client"]["p99"], 3),
        "predict_target_met": added <= 1.0,
        "aio_p50_over_client_p50": round(lat["aio"]["p50"] / lat["client"]["p50"], 2),
        "client_mean_ms": round(float(np.mean(low["client"])), 3),
        "predict_mean_ms": round(float(np.mean(low["predict"])), 3),
    }


def format_gateway(g: dict[str, Any]) -> str:
    """The gateway phase's Markdown tables."""
    lat, cpu = g["one_at_a_time_ms"], g["gateway_cpu_ms_per_job"]
    rows = [
        ("sync client: submit_many + results", g["client_jobs_per_s"], "-"),
        (f"HTTP jobs:batch ({g['batch_jobs_per_request']} a request) + GET ?wait= each",
         g["http_batch_jobs_per_s"], f"{cpu['http_batch']:.3f}"),
        ("HTTP one job a request: POST jobs + GET ?wait=", g["http_single_jobs_per_s"],
         f"{cpu['http_single']:.3f}"),
        (f"async client: {g['aio_concurrency']} concurrent submit + result",
         g["aio_concurrent_jobs_per_s"], "-"),
        ("async client: submit_many + results", g["aio_submit_many_jobs_per_s"], "-"),
    ]
    lines = [f"gateway ({g['model']}; HTTP caller: {g['http_client']}, "
             f"{g['http_threads']} threads)",
             "| path | jobs/s | gateway CPU ms/job |", "|---|---|---|"]
    lines += [f"| {name} | {rate:,.0f} | {c} |" for name, rate, c in rows]
    lines += ["", "| one job at a time | p50 ms | p95 ms | p99 ms |", "|---|---|---|---|"]
    for name, label in (("client", "sync client: submit + result"),
                        ("predict", "HTTP POST :predict"),
                        ("aio", "async client: submit + result")):
        p = lat[name]
        lines.append(f"| {label} | {p['p50']:.2f} | {p['p95']:.2f} | {p['p99']:.2f} |")
    lines.append(f"gateway added p50 {g['predict_added_p50_ms']:+.2f} ms (target <= +1 ms: "
                 f"{'met' if g['predict_target_met'] else 'NOT met'}), p99 "
                 f"{g['predict_added_p99_ms']:+.2f} ms")
    return "\n".join(lines)
