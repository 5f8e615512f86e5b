"""Each ``except`` clause a service writes, proven against a real worker process.

One worker process serves this module (2-core CI machines: it is stopped, started and
replaced as a test needs, never run beside a second one). It uses its own database of the
session's redis-server, so the session's ``shared_worker`` (database 0) never takes these
jobs, and a queue nobody consumes really has no consumer.

The worker runs a short profile: batches may run 1 s (``INFERQ_BATCH_TIME_LIMIT``), past
which the process exits so its jobs are redelivered; unacked messages come back after 3 s
(the least the 3x rule allows); a job may be started twice (``INFERQ_MAX_EXECUTIONS``).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
from sklearn.datasets import load_digits

from producer import (
    DeadlineExceeded,
    InferenceClient,
    InvalidInput,
    JobFailed,
    JobStatus,
    JobTimeout,
    Poisoned,
)
from tests.conftest import WorkerProcess
from tests.faults.harness import copy_digits, slow_input, write_slow_model
from workers.launch.redisproc import RedisServer
from workers.ops import deadletter

pytestmark = pytest.mark.integration

#: This module's database on the session's redis-server (the shared worker uses 0).
DB = 11
PROFILE = {
    "INFERQ_VISIBILITY_TIMEOUT": "3",
    "INFERQ_RESTORE_INTERVAL": "0.5",
    "INFERQ_BATCH_TIME_LIMIT": "1",
    "INFERQ_MAX_EXECUTIONS": "2",
}
#: Exit status of a worker whose batch ran past INFERQ_BATCH_TIME_LIMIT.
BATCH_TIME_LIMIT_EXIT = 70
PIXELS = load_digits().data[:1].astype(np.float32)


class Serving:
    """The module's one worker slot: at most one worker process at a time."""

    def __init__(self, url: str, repo: Path, log_dir: Path) -> None:
        self.url, self.repo, self.log_dir = url, repo, log_dir
        self.worker: WorkerProcess | None = None
        self.exits: list[int] = []

    def alive(self) -> bool:
        return (self.worker is not None and self.worker.proc is not None
                and self.worker.proc.poll() is None)

    def start(self) -> WorkerProcess:
        """A running worker (a new process, with a new hostname, if none runs)."""
        if not self.alive():
            self.reap()
            # A fresh hostname: a dead worker's key would make wait_ready pass at once.
            worker = WorkerProcess(self.url, self.log_dir, model_dir=self.repo, **PROFILE)
            self.worker = worker
            worker.start()
        assert self.worker is not None
        return self.worker

    def reap(self) -> None:
        """Record how a worker that exited by itself ended."""
        if self.worker is not None and self.worker.proc is not None:
            code = self.worker.proc.poll()
            if code is not None:
                self.exits.append(code)
                self.worker = None

    def stop(self) -> None:
        """Warm shutdown: no worker consumes any queue until the next start."""
        if self.worker is not None:
            assert self.worker.stop() == 0, self.worker.log()
            self.worker = None

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.log_dir.glob("*.log")))


@pytest.fixture(scope="module")
def serving(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[Serving]:
    url = f"redis://127.0.0.1:{redis_server.port}/{DB}"
    redis.Redis.from_url(url).flushdb()
    repo = copy_digits(tmp_path_factory.mktemp("models"))
    write_slow_model(repo)
    slot = Serving(url, repo, tmp_path_factory.mktemp("worker-logs"))
    slot.start()
    yield slot
    if slot.alive():
        slot.stop()
    redis.Redis.from_url(url).flushdb()


@pytest.fixture
def client(serving: Serving) -> Iterator[InferenceClient]:
    with InferenceClient(serving.url) as c:
        yield c


def _wait_done(serving: Serving, client: InferenceClient, job_id: str, timeout: float) -> float:
    """Wait for a result, restarting the worker whenever it exits, as a supervisor would."""
    started = time.monotonic()
    while client.status(job_id) is JobStatus.PENDING:
        assert time.monotonic() - started < timeout, (
            f"no result for {job_id} after {timeout}s; exits {serving.exits}\n{serving.logs()}")
        if not serving.alive():
            serving.start()
        time.sleep(0.05)
    return time.monotonic() - started


# --- except JobTimeout ---------------------------------------------------------------------


def test_except_job_timeout_when_nothing_consumes_the_queue(serving: Serving) -> None:
    """A job on a queue no worker serves: the caller's wait ends in JobTimeout naming it,
    which neither ``except JobFailed`` nor ``except DeadlineExceeded`` catches."""
    serving.start()
    unserved = f"unserved-{uuid.uuid4().hex[:8]}"
    with InferenceClient(serving.url, validate=False) as blind:
        handle = blind.submit(unserved, {"pixels": PIXELS})
        caught = None
        started = time.monotonic()
        try:
            try:
                handle.result(timeout=0.3)
            except DeadlineExceeded:
                caught = "DeadlineExceeded"
            except JobFailed:
                caught = "JobFailed"
        except JobTimeout as exc:
            caught = exc
        waited = time.monotonic() - started
    assert isinstance(caught, JobTimeout), caught
    assert caught.job_ids == [handle.id]
    assert caught.code == "WAIT_TIMEOUT"
    assert handle.id in str(caught)
    assert 0.3 <= waited < 3.0
    # Not a failure of the job: it is still pending, with no result written.
    assert handle.status() is JobStatus.PENDING


def test_results_timeout_lists_only_the_pending_ids(
    serving: Serving, client: InferenceClient
) -> None:
    serving.start()
    unserved = f"unserved-{uuid.uuid4().hex[:8]}"
    done = client.submit("digits", {"pixels": PIXELS})
    done.result(timeout=30)
    with InferenceClient(serving.url, validate=False) as blind:
        stuck = [blind.submit(unserved, {"pixels": PIXELS}) for _ in range(2)]
    ids = [done.id, stuck[0].id, stuck[1].id]
    with pytest.raises(JobTimeout) as caught:
        client.results(ids, timeout=0.5)
    assert not isinstance(caught.value, JobFailed)
    assert sorted(caught.value.job_ids) == sorted(h.id for h in stuck)
    assert done.id not in caught.value.job_ids
    with pytest.raises(JobTimeout) as again:
        client.outcomes(ids, timeout=0.3)
    assert sorted(again.value.job_ids) == sorted(h.id for h in stuck)


# --- except InvalidInput -------------------------------------------------------------------


def test_except_invalid_input_for_a_job_the_worker_refuses(serving: Serving) -> None:
    """The client does not check (validate=False); the worker refuses int64 pixels."""
    worker = serving.start()
    with InferenceClient(serving.url, validate=False) as blind:
        handle = blind.submit("digits", {"pixels": PIXELS.astype(np.int64)})
        with pytest.raises(InvalidInput) as caught:
            handle.result(timeout=30)
        # The worker wrote the model into the document (outcomes does not fill it in).
        [outcome] = blind.outcomes([handle.id], timeout=5)
    error = caught.value
    assert isinstance(error, JobFailed) and error.code == "INVALID_ARGUMENT"
    assert error.job_id == handle.id and error.model == "digits"
    assert handle.id in str(error)
    assert type(outcome) is InvalidInput
    assert outcome.job_id == handle.id and outcome.model == "digits"
    assert handle.status() is JobStatus.FAILURE
    assert worker.proc is not None and worker.proc.poll() is None  # refused, not crashed


# --- except DeadlineExceeded ---------------------------------------------------------------


def test_except_deadline_exceeded_for_a_job_queued_past_its_deadline(serving: Serving) -> None:
    serving.stop()
    # The worker is stopped: the job waits for it (as for workers that scale from zero).
    with InferenceClient(serving.url, queue_without_workers=True) as client:
        handle = client.submit("digits", {"pixels": PIXELS}, deadline=0.3)
        time.sleep(0.6)  # nobody consumes: the deadline passes while the job waits
        serving.start()
        with pytest.raises(DeadlineExceeded) as caught:
            handle.result(timeout=30)
        [outcome] = client.outcomes([handle.id], timeout=5)
        # A job with a deadline still in the future runs normally on the same worker.
        ok = client.submit("digits", {"pixels": PIXELS}, deadline=30).result(timeout=30)
    error = caught.value
    assert isinstance(error, JobFailed) and not isinstance(error, JobTimeout)
    assert error.code == "DEADLINE_EXCEEDED"
    assert error.job_id == handle.id and error.model == "digits"
    assert type(outcome) is DeadlineExceeded and outcome.model == "digits"
    assert ok.model == "digits"


# --- except Poisoned -----------------------------------------------------------------------


def test_except_poisoned_for_a_job_that_kills_its_worker_every_time(
    serving: Serving, client: InferenceClient
) -> None:
    """A job of the slow test model that runs far past the batch time limit: its worker
    exits (status 70) each time it runs it, and the test restarts the worker as a
    supervisor would. Started twice (INFERQ_MAX_EXECUTIONS=2), it then fails POISONED
    without running a third time, and waits in the dead-letter list."""
    serving.start()
    serving.exits.clear()
    handle = client.submit("slow", {"x": slow_input(200_000)})  # minutes of work
    _wait_done(serving, client, handle.id, timeout=90)
    caught = None
    try:
        handle.result(timeout=5)
    except Poisoned as exc:
        caught = exc
    except JobFailed as exc:  # pragma: no cover - the wrong clause: fail below
        caught = exc
    assert type(caught) is Poisoned, (caught, serving.exits)
    assert caught.code == "POISONED"
    assert caught.job_id == handle.id and caught.model == "slow"
    [outcome] = client.outcomes([handle.id], timeout=5)
    assert type(outcome) is Poisoned and outcome.model == "slow"
    assert serving.exits == [BATCH_TIME_LIMIT_EXIT] * 2, serving.logs()
    r = redis.Redis.from_url(serving.url)
    assert handle.id in {e["id"] for e in deadletter.entries(r)}
    # The worker that refused it is still serving.
    assert serving.alive()
    assert client.submit("digits", {"pixels": PIXELS}).result(timeout=30).model == "digits"
