"""Routes against a real worker: splits for jobs that name no version, aliases, promote and
rollback in one step, route changes reaching the worker within a second."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
from click.testing import CliRunner

from producer import InferenceClient, wire
from producer.errors import ModelNotFound
from producer.wire.routes import choose
from tests.conftest import WorkerProcess
from workers.launch.cli import main
from workers.launch.redisproc import RedisServer
from workers.ops import routes

pytestmark = pytest.mark.integration

PIXELS = {"pixels": wire.encode_tensor(np.zeros((1, 64), np.float32))}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, redis.Redis]]:
    with RedisServer(appendonly=True) as server:
        worker = WorkerProcess(server.url, tmp_path_factory.mktemp("routes")).start()
        try:
            yield server.url, redis.Redis.from_url(server.url)
        finally:
            worker.stop()


def plain_jobs(r: redis.Redis, n: int) -> list[str]:
    """``n`` jobs as a plain Celery client sends them: no version, no inferq headers."""
    ids = [wire.new_id() for _ in range(n)]
    messages = [wire.build_message(task=wire.TASK_NAME, task_id=i, args=["digits", PIXELS],
                                   kwargs={"version": None}, queue="inferq.digits")
                for i in ids]
    for start in range(0, n, 500):
        r.lpush("inferq.digits", *messages[start:start + 500])
    return ids


def versions_of(r: redis.Redis, ids: list[str], timeout: float = 60) -> list[tuple[int, str]]:
    deadline = time.monotonic() + timeout
    while True:
        docs = r.mget([wire.result_key(i) for i in ids])
        if all(docs) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    out = []
    for job_id, doc in zip(ids, docs, strict=True):
        result = wire.read_result(job_id, doc)
        assert isinstance(result, wire.JobResult), result
        out.append((result.version, str(result.route)))
    return out


def test_a_split_divides_unpinned_jobs_by_weight(served: tuple[str, redis.Redis]) -> None:
    _, r = served
    route = routes.set_split(r, "digits", {1: 90, 2: 10}, by="test")
    time.sleep(1.0)  # a route change reaches every worker within a second
    got = versions_of(r, plain_jobs(r, 4000))
    share = sum(1 for v, _ in got if v == 1) / len(got)
    assert abs(share - 0.90) <= 0.015, share
    assert {label for _, label in got} == {f"split:{route.rev}"}
    # One step back: no route, the latest version answers again.
    back = routes.rollback(r, "digits", by="test")
    assert back is not None and back.rev == route.rev + 1 and not back.split
    time.sleep(1.0)
    assert {v for v, _ in versions_of(r, plain_jobs(r, 50))} == {2}


def test_promote_and_rollback_from_the_command_line(served: tuple[str, redis.Redis]) -> None:
    url, r = served
    env = {"INFERQ_BROKER_URL": url}
    runner = CliRunner()
    out = runner.invoke(main, ["alias", "digits", "canary", "2"], env=env)
    assert out.exit_code == 0, out.output
    # --force: the guardrail would compare the p99 of two identical versions here, which is
    # noise (the refusal and its figures are tested in test_shadow_guard.py).
    out = runner.invoke(main, ["promote", "digits", "1", "--force"], env=env)
    assert out.exit_code == 0, out.output
    assert "route 1=100" in out.output and "stable=1" in out.output
    time.sleep(1.0)
    assert {v for v, _ in versions_of(r, plain_jobs(r, 20))} == {1}
    out = runner.invoke(main, ["rollback", "digits"], env=env)
    assert out.exit_code == 0, out.output
    out = runner.invoke(main, ["routes", "digits"], env=env)
    assert out.exit_code == 0 and "canary=2" in out.output and "rollback" in out.output
    out = runner.invoke(main, ["route", "digits", "7=100"], env=env)
    assert out.exit_code != 0 and "no version [7]" in out.output


def test_a_redelivered_job_keeps_the_version_it_was_given(
    served: tuple[str, redis.Redis], tmp_path: Path
) -> None:
    _, r = served
    routes.set_split(r, "digits", {1: 50, 2: 50}, by="test")
    time.sleep(1.0)
    [job_id] = plain_jobs(r, 1)
    [(first, _)] = versions_of(r, [job_id])
    pinned = r.get(wire.pin_key(job_id))
    assert pinned is not None and int(pinned) == first
    routes.set_split(r, "digits", {3 - first: 1}, by="test")  # the other version only
    routes.rollback(r, "digits")


def test_the_client_pins_aliases_and_splits_at_submit(served: tuple[str, redis.Redis]) -> None:
    url, r = served
    routes.set_alias(r, "digits", "canary", 2, by="test")
    route = routes.set_split(r, "digits", {1: 90, 2: 10}, by="test")
    client = InferenceClient(url)
    x = {"pixels": np.zeros((1, 64), np.float32)}
    try:
        # An alias resolves at submit and is pinned: the result names it.
        canary = client.submit("digits", x, version="canary").result(timeout=30)
        assert (canary.version, canary.route) == (2, "alias:canary")
        with pytest.raises(ModelNotFound, match="no alias 'champion'"):
            client.submit("digits", x, version="champion")
        # No version: the split, each job by a hash of its ID, exactly as a worker would.
        handles = client.submit_many("digits", [x] * 10_000)
        results = client.results([h.id for h in handles], timeout=120)
        share = sum(1 for res in results if res.version == 1) / len(results)
        assert abs(share - 0.90) <= 0.015, share
        assert {res.route for res in results} == {f"split:{route.rev}"}
        assert all(res.version == choose(route.split, res.id) for res in results)
        # Sticky: one route_key, one version, whichever job carries it.
        sticky = [client.submit("digits", x, route_key="user-7") for _ in range(20)]
        assert {h.result(timeout=30).version for h in sticky} == {choose(route.split, "user-7")}
    finally:
        client.close()
        routes.rollback(r, "digits", by="test")
