"""Shadow and guardrails against a real Redis and a real worker serving digits v1 and v2:
the shadow version is compared on every job and never answers; a guarded split whose
candidate breaks is rolled back by the worker; promote refuses a worse candidate unless
forced."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import redis
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from producer import wire
from producer.errors import JobFailed
from tests.conftest import WorkerProcess
from workers.launch.cli import main
from workers.launch.redisproc import RedisServer
from workers.ops import routes
from workers.serving.shadow import read_report

pytestmark = pytest.mark.integration


class Served:
    def __init__(self, url: str, worker: WorkerProcess) -> None:
        self.url, self.worker = url, worker
        self.r = redis.Redis.from_url(url)
        self.env = {"INFERQ_BROKER_URL": url, "INFERQ_RESULT_URL": url}

    def cli(self, *args: str) -> Any:
        return CliRunner().invoke(main, list(args), env=self.env)

    def route_reached_worker(self, rev: int) -> None:
        """Wait until the worker logged the route change to ``rev``."""
        wait_for(lambda: any(rec.get("event") == "route_changed" and rec.get("rev") == rev
                             for rec in self.worker.log_records()), what=f"route rev {rev}")

    def metric(self, name: str, **labels: str) -> float:
        """The value of one sample the worker exposes (0 when it has none)."""
        [port] = [rec["port"] for rec in self.worker.log_records()
                  if rec.get("event") == "metrics_listening"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name == name and labels.items() <= s.labels.items())


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with RedisServer(appendonly=True) as server:
        worker = WorkerProcess(server.url, tmp_path_factory.mktemp("shadow")).start()
        try:
            yield Served(server.url, worker)
        finally:
            worker.stop()


def wait_for(condition: Callable[[], Any], timeout: float = 20.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = condition()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def send(r: redis.Redis, rows: list[np.ndarray[Any, Any]], version: int | None) -> list[str]:
    """Jobs as a plain Celery client sends them (NaN and all: the worker is the judge)."""
    ids = [wire.new_id() for _ in rows]
    r.lpush("inferq.digits", *[
        wire.build_message(task=wire.TASK_NAME, task_id=job_id,
                           args=["digits", {"pixels": wire.encode_tensor(row[None, :])}],
                           kwargs={"version": version}, queue="inferq.digits")
        for job_id, row in zip(ids, rows, strict=True)])
    return ids


def results(r: redis.Redis, ids: list[str], timeout: float = 30) -> list[Any]:
    docs = wait_for(lambda: (d if all(d := r.mget([wire.result_key(i) for i in ids])) else None),
                    timeout, "results")
    return [wire.read_result(i, d) for i, d in zip(ids, docs, strict=True)]


def pixels(n: int, seed: int = 0) -> list[np.ndarray[Any, Any]]:
    rng = np.random.default_rng(seed)
    return list(rng.integers(0, 17, size=(n, 64)).astype(np.float32))


def test_the_shadow_is_compared_and_never_answers(served: Served) -> None:
    out = served.cli("shadow", "digits", "2", "--sample", "1.0")
    assert out.exit_code == 0 and "shadow v2 at 1" in out.output, out.output
    served.route_reached_worker(routes.current(served.r, "digits").rev)
    got = results(served.r, send(served.r, pixels(60), version=1))
    assert {res.version for res in got} == {1}  # never an answer from the shadow
    report = wait_for(lambda: (rep if (rep := read_report(served.r, "digits", 2)).counts.get(
        "compared", 0) + rep.counts.get("dropped", 0) >= 60 else None), what="60 compared")
    assert report.counts["compared"] == 60 and "dropped" not in report.counts
    assert report.counts["labels_compared"] == report.counts["compared"]
    assert report.top and report.top[0][0]["primary_version"] == 1
    out = served.cli("shadow", "report", "digits")
    assert out.exit_code == 0 and "labels agree:" in out.output and "most different" in out.output
    assert served.metric("inferq_shadow_jobs_total", model="digits", version="2",
                         outcome="compared") == 60
    assert served.metric("inferq_shadow_abs_diff_count", model="digits", version="2",
                         output="probabilities") == 60
    assert served.metric("inferq_shadow_labels_total", model="digits", version="2") == 60
    out = served.cli("shadow", "digits", "--off")
    assert out.exit_code == 0 and "shadow" not in out.output.split("(rev")[1], out.output


def test_a_guarded_split_rolls_back_when_its_candidate_breaks(served: Served) -> None:
    assert served.cli("route", "digits", "1").exit_code == 0
    out = served.cli("route", "digits", "1=50", "2=50", "--rollback-on-error-rate", "0.05",
                     "--guard-min-jobs", "20")
    assert out.exit_code == 0 and "guard: roll back on error rate > 0.05" in out.output, \
        out.output
    guarded = routes.current(served.r, "digits")
    served.route_reached_worker(guarded.rev)
    # Healthy unpinned jobs: both versions answer, nothing breaches.
    assert {res.version for res in results(served.r, send(served.r, pixels(40), None))} == {1, 2}
    assert routes.current(served.r, "digits").rev == guarded.rev
    # Now v2 fails: jobs pinned to it with NaN inputs, refused by the worker.
    bad = [np.full(64, np.nan, np.float32)] * 30
    failed = results(served.r, send(served.r, bad, version=2))
    assert all(isinstance(res, JobFailed) for res in failed)
    back = wait_for(lambda: (r if (r := routes.current(served.r, "digits")).rev > guarded.rev
                             else None), timeout=20, what="the guard's rollback")
    assert back.split == {1: 1.0} and back.by.startswith("guard@") and "v2" in back.note
    assert any(rec.get("event") == "route_rolled_back" and rec.get("version") == 2
               for rec in served.worker.log_records())
    assert served.metric("inferq_route_rollbacks_total", model="digits") == 1


def test_promote_refuses_a_worse_candidate_unless_forced(served: Served) -> None:
    # v2 failed most of its recent jobs (the test above); v1 none.
    results(served.r, send(served.r, pixels(20, seed=1), version=1))
    out = served.cli("promote", "digits", "2")
    assert out.exit_code != 0 and "not promoting digits v2: error rate" in out.output, out.output
    assert routes.current(served.r, "digits").split == {1: 1.0}
    out = served.cli("promote", "digits", "2", "--force")
    assert out.exit_code == 0 and "forced over" in out.output and "route 2=100" in out.output
    out = served.cli("rollback", "digits")
    assert out.exit_code == 0, out.output
