"""What every fault scenario shares: the test profile, the ledger, audits, waits, load, and
the :class:`Rig` (workers, ledger and load on one Redis) that the ``rig`` fixtures hand out.

Measurement (reliability.md 7.1): the **ledger** is the set of job IDs whose submit returned
without raising, kept in this process and never read back from Redis. After the faults an
**audit** reads the result key of every ledger ID and classifies it; ``lost`` = accepted IDs
with no result or with a failure the input did not cause.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

import numpy as np
import redis
from sklearn.datasets import load_digits

from producer import InferenceClient, wire
from producer.errors import InferqError
from producer.wire import UNACKED, UNACKED_INDEX
from producer.wire import read_result as parse_result
from tests.conftest import MODELS, WorkerProcess
from workers.launch.launcher import Supervisor, plan

#: The CI profile every fault test runs under (reliability.md 7.1: VT 10 s, sweep 1 s).
PROFILE = {
    "INFERQ_VISIBILITY_TIMEOUT": "10",
    "INFERQ_RESTORE_INTERVAL": "1",
    "INFERQ_BATCH_TIME_LIMIT": "3",
}
DIGITS_QUEUE = wire.queue_name("digits")
#: The 1,797 8x8 images of scikit-learn's digits data, float32 [N, 64].
X = load_digits().data.astype(np.float32)


def _reference_labels() -> np.ndarray[Any, Any]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(MODELS / "digits" / "2" / "model.onnx"), options,
                                   providers=["CPUExecutionProvider"])
    labels: np.ndarray[Any, Any] = session.run(["label"], {"pixels": X})[0]
    return labels


#: What digits v2 answers for each row of X, computed here without the workers.
LABELS = _reference_labels()


def rows_of(indices: Iterable[int]) -> list[dict[str, np.ndarray[Any, Any]]]:
    """One-row jobs for the given rows of X (always with the batch axis)."""
    return [{"pixels": X[i % len(X)][np.newaxis]} for i in indices]


class Figures(Protocol):
    """The ``figures`` fixture: record measured figures by name."""

    def __call__(self, **figures: object) -> None: ...


class WorkerFactory(Protocol):
    """The ``profile_worker`` fixture: a (not yet started) worker with the test profile."""

    def __call__(self, url: str, **kw: Any) -> WorkerProcess: ...


def alive(worker: WorkerProcess) -> bool:
    """The worker's process was started and has not exited."""
    return worker.proc is not None and worker.proc.poll() is None


# --- waiting -------------------------------------------------------------------------------


def wait_for(predicate: Callable[[], object], timeout: float, what: str,
             interval: float = 0.02) -> float:
    """Poll ``predicate`` until it is truthy; return the seconds it took, or fail with ``what``."""
    started = time.monotonic()
    deadline = started + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)
    return time.monotonic() - started


def result_docs(client: redis.Redis, ids: Sequence[str]) -> dict[str, bytes | None]:
    """The raw result document of every id (None where there is none)."""
    out: dict[str, bytes | None] = {}
    for start in range(0, len(ids), 2000):
        chunk = list(ids[start:start + 2000])
        values: list[Any] = client.mget([wire.result_key(i) for i in chunk])
        out.update(zip(chunk, values, strict=True))
    return out


def wait_results(client: redis.Redis, ids: Iterable[str], timeout: float,
                 interval: float = 0.05) -> tuple[float, set[str]]:
    """Wait until every id has a result; return (seconds taken, ids still without one)."""
    started = time.monotonic()
    missing = set(ids)
    while missing:
        docs = result_docs(client, sorted(missing))
        missing = {i for i, doc in docs.items() if doc is None}
        if not missing or time.monotonic() - started > timeout:
            break
        time.sleep(interval)
    return time.monotonic() - started, missing


def first_result_among(client: redis.Redis, ids: Callable[[], Sequence[str]], timeout: float,
                       interval: float = 0.02) -> float | None:
    """Seconds until any of ``ids()`` (re-read each poll) has a result; None on timeout."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        current = ids()
        if current:
            try:
                if any(v is not None for v in result_docs(client, current).values()):
                    return time.monotonic() - started
            except redis.exceptions.ConnectionError:
                pass
        time.sleep(interval)
    return None


def in_flight(client: redis.Redis) -> int:
    """Messages taken by some worker and not acked yet (kombu's ``unacked`` hash)."""
    return int(client.hlen(UNACKED))


def holding(client: redis.Redis, job_id: str) -> list[str]:
    """Tags of the in-flight messages that carry ``job_id`` (empty when none does)."""
    needle = job_id.encode()
    return [tag.decode() for tag, raw in client.hscan_iter(UNACKED, count=1000)
            if needle in raw]


def quiesced(client: redis.Redis, queues: Sequence[str] = (DIGITS_QUEUE,)) -> bool:
    """True when no queue holds a message and nothing is in flight."""
    pipe = client.pipeline(transaction=False)
    for q in queues:
        pipe.llen(q)
    pipe.hlen(UNACKED)
    pipe.zcard(UNACKED_INDEX)
    return not any(pipe.execute())


# --- the ledger and the audit ---------------------------------------------------------------


class Ledger:
    """Accepted job IDs (submit returned) with the row of X each carries; thread-safe."""

    def __init__(self) -> None:
        self.rows: dict[str, int] = {}
        self.accepted_at: dict[str, float] = {}
        self.rejected: collections.Counter[str] = collections.Counter()
        self.slowest_call_s = 0.0
        self._lock = threading.Lock()

    def accept(self, ids: Sequence[str], rows: Sequence[int]) -> None:
        now = time.monotonic()
        with self._lock:
            for job_id, row in zip(ids, rows, strict=True):
                self.rows[job_id] = row
                self.accepted_at[job_id] = now

    def reject(self, error: BaseException, jobs: int) -> None:
        with self._lock:
            self.rejected[type(error).__name__] += jobs

    def call_took(self, seconds: float) -> None:
        with self._lock:
            self.slowest_call_s = max(self.slowest_call_s, seconds)

    @property
    def ids(self) -> list[str]:
        with self._lock:
            return list(self.rows)

    def accepted_between(self, start: float, end: float) -> list[str]:
        with self._lock:
            return [i for i, t in self.accepted_at.items() if start <= t < end]

    def __len__(self) -> int:
        return len(self.rows)


#: Failure codes a job's own input causes; any other failure of a good job counts as lost.
INPUT_CODES = frozenset({"INVALID_ARGUMENT", "NOT_FOUND", "DEADLINE_EXCEEDED"})


@dataclass
class Audit:
    """Where every ledger job ended."""

    accepted: int
    missing: set[str] = field(default_factory=set)
    failed: dict[str, str] = field(default_factory=dict)
    wrong: set[str] = field(default_factory=set)
    docs: dict[str, bytes] = field(default_factory=dict)

    @property
    def lost(self) -> int:
        """No result, or a failure the (good) input did not cause."""
        return len(self.missing) + len(self.failed)

    def summary(self) -> str:
        codes = collections.Counter(self.failed.values())
        return (f"accepted={self.accepted} lost={self.lost} (missing={len(self.missing)}, "
                f"failed={dict(codes)}) wrong={len(self.wrong)}")


def audit(client: redis.Redis, ledger: Ledger) -> Audit:
    """Read every ledger job's result and check SUCCESS outputs against the reference."""
    ids = ledger.ids
    report = Audit(accepted=len(ids))
    for job_id, raw in result_docs(client, ids).items():
        if raw is None:
            report.missing.add(job_id)
            continue
        report.docs[job_id] = raw
        outcome = parse_result(job_id, raw)
        if isinstance(outcome, InferqError):
            report.failed[job_id] = outcome.code
        elif int(outcome["label"][0]) != int(LABELS[ledger.rows[job_id] % len(X)]):
            report.wrong.add(job_id)
    return report


def changed_results(client: redis.Redis, first: dict[str, bytes]) -> list[str]:
    """IDs whose stored result differs now from ``first`` (a result must never change)."""
    now = result_docs(client, list(first))
    return [i for i, doc in first.items() if now[i] != doc]


def result_keys(client: redis.Redis) -> set[str]:
    """Every job ID that has a result key in this Redis."""
    prefix = wire.RESULT_KEY_PREFIX
    return {k.decode()[len(prefix):] for k in client.scan_iter(prefix + "*", count=5000)}


# --- worker logs ----------------------------------------------------------------------------


def log_events(worker: WorkerProcess, event: str) -> list[dict[str, Any]]:
    return [r for r in worker.log_records() if r.get("event") == event]


def executed_jobs(workers: Iterable[WorkerProcess]) -> int:
    """Jobs the workers ran through a model, from their ``batch`` log lines (one per batch).

    Exact for workers that exited normally; a SIGKILLed worker may have run a batch whose
    line it never wrote, so with kills this is a lower bound.
    """
    return sum(int(r["jobs"]) for w in workers for r in log_events(w, "batch"))


def kill_while_holding(client: redis.Redis, victim: WorkerProcess,
                       restart: Callable[[], WorkerProcess], tries: int = 5,
                       provoke: Callable[[], object] | None = None,
                       ) -> tuple[WorkerProcess, float, int, list[WorkerProcess]]:
    """SIGKILL ``victim`` at a moment some worker holds unacked messages, and check the
    victim did hold some: messages picked up before the kill must still be unacked 1.5 s
    later (a live worker acks what it takes within milliseconds). On a miss, start a new
    worker with ``restart`` and try again. The killed worker is always replaced, as a
    supervisor would. ``provoke`` (e.g. a burst of jobs) runs before each try.

    Returns (replacement, monotonic kill time, orphaned messages, killed workers).
    """
    killed: list[WorkerProcess] = []
    for _ in range(tries):
        if provoke is not None:
            provoke()
        wait_for(lambda: in_flight(client) > 0, 10, "messages in flight")
        kill_wall, kill_at = time.time(), time.monotonic()
        victim.kill()
        killed.append(victim)
        time.sleep(1.5)  # an observation window, not a wait for an outcome
        orphans = int(client.zcount(UNACKED_INDEX, "-inf", kill_wall))
        victim = restart()
        if orphans:
            return victim, kill_at, orphans, killed
    raise AssertionError(f"never caught the victim holding messages in {tries} kills")


# --- load -----------------------------------------------------------------------------------


class Load(threading.Thread):
    """A producer thread: ``jobs_per_call`` digits jobs via submit_many every ``interval`` s.

    Every call is bounded (the client's socket timeout); accepted IDs go to the ledger, typed
    refusals are counted by class. Stops at ``total`` jobs or on :meth:`stop`.
    """

    def __init__(self, url: str, ledger: Ledger, *, jobs_per_call: int = 32,
                 interval: float = 0.02, total: int | None = None,
                 single: bool = False) -> None:
        super().__init__(name="fault-load", daemon=True)
        self.url, self.ledger = url, ledger
        self.jobs_per_call, self.interval, self.total = jobs_per_call, interval, total
        self.single = single
        self.calls = 0
        self.errors: list[BaseException] = []
        self._stop_event = threading.Event()
        self._next_row = 0

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=30)

    def run(self) -> None:
        # Workers are killed and restarted under this load: it queues for them meanwhile, as
        # a service that expects workers to come back would.
        client = InferenceClient(self.url, queue_without_workers=True)
        try:
            while not self._stop_event.is_set():
                if self.total is not None and len(self.ledger) >= self.total:
                    return
                rows = list(range(self._next_row, self._next_row + self.jobs_per_call))
                self._next_row += self.jobs_per_call
                started = time.monotonic()
                try:
                    if self.single:
                        ids = [client.submit("digits", rows_of([r])[0]).id for r in rows]
                    else:
                        ids = [h.id for h in client.submit_many("digits", rows_of(rows))]
                    self.ledger.accept(ids, rows)
                except InferqError as exc:
                    self.ledger.reject(exc, len(rows))
                except Exception as exc:  # untyped: a product bug; keep it for the test
                    self.errors.append(exc)
                    self.ledger.reject(exc, len(rows))
                finally:
                    self.ledger.call_took(time.monotonic() - started)
                    self.calls += 1
                self._stop_event.wait(self.interval)
        finally:
            client.close()


# --- a scenario's rig -------------------------------------------------------------------------


@dataclass
class Settled:
    """What :meth:`Rig.settle` found: every ledger job waited for, queues quiet, audited."""

    took: float
    """Seconds until every job had a result (or the wait gave up)."""
    done_at: float
    """``time.monotonic()`` when that wait ended."""
    missing: set[str]
    """Jobs still without a result when the wait ended."""
    report: Audit


class Rig:
    """What a scenario runs against one Redis: fault-profile workers, the ledger of accepted
    jobs and producer load. Workers and producers connect to ``url`` (the server, or a proxy
    in front of it); ``r`` talks to the server directly. Made by the ``rig``/``rig_for``
    fixtures, which stop every load and close every client after the test (workers are
    stopped by ``start_worker``)."""

    def __init__(self, url: str, r: redis.Redis, make_worker: WorkerFactory) -> None:
        self.url, self.r = url, r
        self.ledger = Ledger()
        self._make_worker = make_worker
        self._loads: list[Load] = []
        self._producer: InferenceClient | None = None

    def worker(self, **kw: Any) -> WorkerProcess:
        """Start a profile worker on ``url`` (keyword arguments override the profile)."""
        return self._make_worker(self.url, **kw).start()

    def workers(self, n: int, **kw: Any) -> list[WorkerProcess]:
        return [self.worker(**kw) for _ in range(n)]

    def load(self, **kw: Any) -> Load:
        """Start a :class:`Load` thread feeding this rig's ledger."""
        load = Load(self.url, self.ledger, **kw)
        self._loads.append(load)
        load.start()
        return load

    def burst(self, jobs: int = 1024) -> None:
        """Submit ``jobs`` jobs in one call (so a worker about to be killed holds some)."""
        if self._producer is None:
            self._producer = InferenceClient(self.url, queue_without_workers=True)
        rows = list(range(jobs))
        self.ledger.accept([h.id for h in self._producer.submit_many("digits", rows_of(rows))],
                           rows)

    def settle(self, *, results_s: float, quiesce_s: float, extra_ids: Sequence[str] = (),
               queues: Sequence[str] = (DIGITS_QUEUE,)) -> Settled:
        """Wait up to ``results_s`` for a result of every ledger job (and ``extra_ids``),
        require the queues drained and nothing in flight within ``quiesce_s``, then audit."""
        took, missing = wait_results(self.r, [*self.ledger.ids, *extra_ids], timeout=results_s)
        done_at = time.monotonic()
        wait_for(lambda: quiesced(self.r, queues), quiesce_s,
                 "queues drained and nothing in flight")
        return Settled(took, done_at, missing, audit(self.r, self.ledger))

    def close(self) -> None:
        for load in self._loads:
            load.stop()
        if self._producer is not None:
            self._producer.close()
        self.r.close()


class Supervised:
    """One worker under the launcher's :class:`Supervisor`, with the fault-test profile and
    ``INFERQ_MAX_JOBS_PER_PROCESS``, logging to ``log_path``. Made by the ``supervised``
    fixture, which stops it after the test."""

    def __init__(self, url: str, log_path: Path, max_jobs_per_process: int) -> None:
        env = {**os.environ, **PROFILE, "INFERQ_BROKER_URL": url, "INFERQ_RESULT_URL": url,
               "INFERQ_MODEL_DIR": str(MODELS), "INFERQ_LOG_FORMAT": "json",
               "INFERQ_MAX_JOBS_PER_PROCESS": str(max_jobs_per_process),
               "INFERQ_INTRA_OP_THREADS": "1", "INFERQ_METRICS_PORT": "0"}
        self.specs = plan(None, 1, host=f"fault-{uuid.uuid4().hex[:6]}", base_env=env)
        self.hostname = self.specs[0].hostname
        self.log_path = log_path
        self.pids: set[int] = set()
        self.errors: list[BaseException] = []
        self._log: IO[bytes] | None = None
        self._supervisor: Supervisor | None = None
        self._watching = threading.Event()
        self._watcher: threading.Thread | None = None

    def start(self) -> Supervised:
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed by stop)
        self._supervisor = Supervisor(self.specs, output=self._log)
        self._supervisor.start()
        return self

    def poll(self) -> None:
        """One round of what ``Supervisor.run()`` does (raises LaunchError when it gives up);
        remember every worker pid seen."""
        assert self._supervisor is not None
        self._supervisor.poll()
        self.pids.update(p.pid for p in self._supervisor.procs.values())

    def watch(self, interval: float = 0.1) -> None:
        """Poll in a thread, as ``Supervisor.run()`` would, minus its signal handlers; an
        error ends the thread and is kept in ``errors``."""

        def run() -> None:
            while not self._watching.is_set():
                try:
                    self.poll()
                except Exception as exc:
                    self.errors.append(exc)
                    return
                self._watching.wait(interval)

        self._watcher = threading.Thread(target=run, name="supervise", daemon=True)
        self._watcher.start()

    def stop(self) -> None:
        """Stop watching, then warm-stop the workers (idempotent)."""
        self._watching.set()
        if self._watcher is not None:
            self._watcher.join(timeout=10)
        if self._supervisor is not None:
            self._supervisor.stop()
        if self._log is not None:
            self._log.close()

    def log_lines(self, needle: str) -> list[str]:
        return [line for line in self.log_path.read_text(errors="replace").splitlines()
                if needle in line]


# --- model repositories -----------------------------------------------------------------------


def copy_digits(root: Path, *, max_queue: int | None = None) -> Path:
    """A model repository at ``root`` holding a copy of the shipped digits model."""
    target = root / "digits"
    shutil.copytree(MODELS / "digits", target, ignore=shutil.ignore_patterns("build.py"))
    if max_queue is not None:
        manifest = target / "model.toml"
        manifest.write_text(f"max_queue = {max_queue}\n" + manifest.read_text())
    return root


SLOW_INPUT_WIDTH = 4
_SLOW_MANIFEST = """description = "test model: runtime set by the input (x[:, 0] = loop iterations)"
max_batch_rows = 64
max_wait_ms = 2.0

[[inputs]]
name = "x"
dtype = "float32"
shape = [-1, {width}]

[[outputs]]
name = "y"
dtype = "float32"
shape = [-1, 1]

[versions.1]
sha256 = "{sha}"
"""


def build_slow_model(hidden: int = 1024) -> bytes:
    """An ONNX model whose runtime is set by its input: the largest ``x[:, 0]`` of a batch
    is the trip count of a Loop that multiplies a [N, hidden] state by a [hidden, hidden]
    matrix. ONNX has no sleep; this is the honest stand-in for a slow or hung model."""
    import onnx
    from onnx import TensorProto as T
    from onnx import helper as h
    from onnx import numpy_helper as nh

    rng = np.random.default_rng(0)
    weights = (rng.standard_normal((hidden, hidden)) / np.sqrt(hidden)).astype(np.float32)
    body = h.make_graph(
        [h.make_node("MatMul", ["s_in", "W"], ["m"]),
         h.make_node("Tanh", ["m"], ["s_out"]),
         h.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body",
        [h.make_tensor_value_info("i", T.INT64, []),
         h.make_tensor_value_info("cond_in", T.BOOL, []),
         h.make_tensor_value_info("s_in", T.FLOAT, None)],
        [h.make_tensor_value_info("cond_out", T.BOOL, []),
         h.make_tensor_value_info("s_out", T.FLOAT, None)],
    )

    def const(name: str, value: Any) -> Any:
        return h.make_node("Constant", [], [name], value=nh.from_array(np.array(value)))

    nodes = [
        const("start", np.array([0], np.int64)), const("end", np.array([1], np.int64)),
        const("axis", np.array([1], np.int64)), const("cond", np.array(True)),
        const("reps", np.array([1, hidden // SLOW_INPUT_WIDTH], np.int64)),
        h.make_node("Slice", ["x", "start", "end", "axis"], ["first"]),
        h.make_node("ReduceMax", ["first"], ["most"], keepdims=0),
        h.make_node("Cast", ["most"], ["trips"], to=T.INT64),
        h.make_node("Tile", ["x", "reps"], ["s0"]),
        h.make_node("Loop", ["trips", "cond", "s0"], ["s_final"], body=body),
        h.make_node("ReduceMean", ["s_final"], ["y"], axes=[1], keepdims=1),
    ]
    graph = h.make_graph(
        nodes, "slow",
        [h.make_tensor_value_info("x", T.FLOAT, ["N", SLOW_INPUT_WIDTH])],
        [h.make_tensor_value_info("y", T.FLOAT, ["N", 1])],
        [nh.from_array(weights, "W")],
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)],
                         producer_name="inferq-fault-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def write_slow_model(root: Path, name: str = "slow") -> bytes:
    """Add the slow model to the repository at ``root``; return its bytes."""
    data = build_slow_model()
    (root / name / "1").mkdir(parents=True, exist_ok=True)
    (root / name / "1" / "model.onnx").write_bytes(data)
    (root / name / "model.toml").write_text(_SLOW_MANIFEST.format(
        width=SLOW_INPUT_WIDTH, sha=hashlib.sha256(data).hexdigest()))
    return data


def seconds_per_iteration(model: bytes, iterations: int = 3000) -> float:
    """Measure the slow model here, on one thread as the workers run it."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    x = slow_input(iterations)
    session.run(None, {"x": x})  # warm
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        session.run(None, {"x": x})
        best = min(best, time.perf_counter() - started)
    return best / iterations


def slow_input(iterations: int) -> np.ndarray[Any, Any]:
    x = np.zeros((1, SLOW_INPUT_WIDTH), dtype=np.float32)
    x[0, 0] = iterations
    return x


def raw_job(job_id: str, model: str, inputs: dict[str, Any], queue: str,
            version: int | None = None, **kw: Any) -> bytes:
    """A single-job Celery message, as any Celery client would send it."""
    return wire.build_message(task=wire.TASK_NAME, task_id=job_id, args=[model, inputs],
                                  kwargs={"version": version}, queue=queue, **kw)


def json_doc(raw: bytes | None) -> dict[str, Any]:
    assert raw is not None
    doc: dict[str, Any] = json.loads(raw)
    return doc
