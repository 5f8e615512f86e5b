"""Per-version stats and guardrails on fakeredis: minute buckets, the latency quantile,
promote's judgement, and a guard that rolls a split back once (one worker wins)."""

from __future__ import annotations

import importlib.util
import json
from types import SimpleNamespace
from typing import Any

import fakeredis
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from producer import wire
from producer.errors import InternalError, InvalidInput
from producer.wire.routes import Guard
from workers.ops import routes, versionstats
from workers.ops.metrics import LifecycleMetrics
from workers.ops.versionstats import (
    LATENCY_MS,
    VersionStats,
    Window,
    breaches,
    bucket,
    judge,
    read_window,
    stats_key,
)
from workers.serving.observers import Batch
from workers.serving.routing import RouteBook

needs_lua = pytest.mark.skipif(importlib.util.find_spec("lupa") is None,
                               reason="fakeredis runs Lua only with 'lupa'")


def window(ok: int, failed: int, latency_ms: float) -> Window:
    w = Window(ok, failed)
    w.latency[bucket(latency_ms / 1000)] = ok + failed
    return w


def test_buckets_and_quantile() -> None:
    assert bucket(0.0) == 0 and bucket(0.0005) == 0 and bucket(0.0006) == 1
    assert bucket(100.0) == len(LATENCY_MS)
    assert LATENCY_MS[-1] > 60_000
    w = Window()
    w.latency[bucket(0.003)] = 99
    w.latency[bucket(0.150)] = 1
    assert 3 / 1.25 < (w.quantile_ms(0.5) or 0) <= 3 * 1.25
    assert w.quantile_ms(0.99) == pytest.approx(LATENCY_MS[bucket(0.003)])
    assert 150 / 1.25 < (w.quantile_ms(0.999) or 0) <= 150 * 1.25
    assert Window().quantile_ms(0.99) is None
    assert Window(3, 1).error_rate == 0.25


def test_judge_error_rate_and_p99_margins() -> None:
    current = window(990, 10, 4)  # 1% errors, p99 in (2, 5] ms
    assert judge(window(985, 15, 4), current, 0.01, 0.2) == []  # +0.5 points: fine
    refusals = judge(window(970, 30, 4), current, 0.01, 0.2)
    assert len(refusals) == 1 and "error rate 3.0% vs 1.0%" in refusals[0]
    slow = judge(window(1000, 0, 40), current, 0.01, 0.2)
    assert len(slow) == 1 and slow[0].startswith("p99")
    assert judge(Window(), current, 0.01, 0.2) == []  # nothing to compare


def test_breaches_wait_for_min_jobs() -> None:
    guard = Guard(error_rate=0.05, p99_ms=50, window_min=5, min_jobs=20)
    assert breaches(guard, window(5, 5, 1)) == []  # 10 jobs: too few to judge
    assert breaches(guard, window(15, 5, 1)) == ["error rate 25.0% > 5.0%"]
    assert breaches(guard, window(30, 0, 150))[0].startswith("p99")
    assert breaches(guard, window(30, 1, 10)) == []


def pending(job_id: str, enqueued_at: float | None, picked_at: float) -> Any:
    return SimpleNamespace(job=SimpleNamespace(id=job_id, enqueued_at=enqueued_at),
                           picked_at=picked_at, rows=1)


def test_observer_counts_once_and_flushes_minute_buckets() -> None:
    client = fakeredis.FakeRedis()
    now = [6000.5]  # minute 100
    stats = VersionStats(client, "m", flush_s=1.0, clock=lambda: now[0])
    jobs = [pending("a", 5999.99, 6000.0), pending("b", None, 6000.0), pending("c", None, 6000.0)]
    batch = Batch("m", 2, "cpu", jobs, 3, started=6000.2, finished=6000.3)
    stats.batch_started(batch)
    failure = InternalError("boom")
    stats.job_failed("c", failure, 2)  # inside the batch: counted by batch_done
    stats.batch_done(batch, [{"y": np.zeros(1)}, {"y": np.zeros(1)}, failure])
    stats.job_failed("z", InvalidInput("nan"), 2)  # refused at intake: failed, no latency
    stats.job_failed("y", InvalidInput("?"), None)  # no version: not a version's job
    work = stats.handoff()
    assert work is not None
    work()
    assert stats.handoff() is None  # nothing new
    key = stats_key("m", 2, 100)
    assert client.ttl(key) > 3000
    got = read_window(client, "m", 2, 5, now=now[0])
    assert (got.ok, got.failed) == (2, 2)
    assert sum(got.latency) == 3  # the refused job has no latency
    # a: 310 ms enqueued to computed; b, c: 300 ms from pick-up.
    assert got.latency[bucket(0.31)] == 3
    # Within flush_s of the last flush, counts wait (the heartbeat flushes leftovers).
    stats.job_failed("w", InvalidInput("nan"), 2)
    now[0] += 0.5
    assert stats.handoff() is None
    now[0] += 60  # minute 101
    stats.job_failed("v", InvalidInput("nan"), 2)
    stats.flush()
    assert read_window(client, "m", 2, 5, now=now[0]).failed == 4
    assert read_window(client, "m", 2, 1, now=now[0]).failed == 1  # the latest minute only
    assert read_window(client, "m", 2, 5, now=now[0], since=now[0]).failed == 1


def advertise(client: Any) -> None:
    client.hset(wire.MODELS_KEY, "m", json.dumps({"versions": [1, 2]}))


def record(client: Any, version: int, ok: int, failed: int, latency_s: float = 0.003) -> None:
    stats = VersionStats(client, "m")
    jobs = [pending(f"{version}-{i}", None, 0.0) for i in range(ok + failed)]
    import time

    finished = time.time()
    for p in jobs:
        p.picked_at = finished - latency_s
    outcomes: list[Any] = [{"y": np.zeros(1)}] * ok + [InternalError("x")] * failed
    stats.batch_done(Batch("m", version, "cpu", jobs, len(jobs), started=finished,
                           finished=finished), outcomes)
    stats.flush()


@needs_lua
def test_promote_refuses_a_worse_candidate_unless_forced() -> None:
    client = fakeredis.FakeRedis()
    advertise(client)
    routes.set_split(client, "m", {1: 1.0})
    # No recent jobs of v2: promoted, with nothing compared.
    review = routes.review_promotion(client, "m", 2)
    assert review.current == 1 and not review.compared and review.refusals == []
    new = routes.promote(client, "m", 2, review=review)
    assert new.split == {2: 1.0} and new.aliases["stable"] == 2
    routes.rollback(client, "m")
    record(client, 1, ok=100, failed=0)
    record(client, 2, ok=80, failed=20)
    review = routes.review_promotion(client, "m", 2)
    assert review.compared
    with pytest.raises(routes.PromotionRefused, match=r"error rate 20\.0% vs 0\.0%"):
        routes.promote(client, "m", 2, review=review)
    assert routes.current(client, "m").split == {1: 1.0}  # unchanged
    # A looser margin lets it through; so does force.
    looser = routes.review_promotion(client, "m", 2, max_error_increase=0.5)
    assert routes.promote(client, "m", 2, review=looser).split == {2: 1.0}
    routes.rollback(client, "m")
    forced = routes.promote(client, "m", 2, review=review, force=True)
    assert forced.split == {2: 1.0} and "forced" in forced.note
    # Promoting the current version compares nothing.
    assert routes.review_promotion(client, "m", 2).refusals == []


@needs_lua
def test_a_breached_guard_rolls_back_once() -> None:
    client = fakeredis.FakeRedis()
    advertise(client)
    routes.set_split(client, "m", {1: 1.0})
    guarded = routes.set_split(client, "m", {1: 90, 2: 10}, guard=Guard(0.05, None, 5, 20))
    assert guarded.guard is not None
    books = [RouteBook(client, ["m"]), RouteBook(client, ["m"])]
    for book in books:
        book.refresh()
    metrics = LifecycleMetrics(CollectorRegistry())
    record(client, 2, ok=15, failed=3)  # 18 jobs: below min_jobs
    assert versionstats.check_guards(books[0], [], metrics, "w0") == []
    record(client, 2, ok=0, failed=2)
    # Both workers saw the breach at the same revision: one rolls back.
    won = versionstats.check_guards(books[0], [], metrics, "w0")
    lost = versionstats.check_guards(books[1], [], metrics, "w1")
    assert len(won) == 1 and won[0].split == {1: 1.0} and lost == []
    now = routes.current(client, "m")
    assert now.split == {1: 1.0} and now.by == "guard@w0" and now.note.startswith("guard: v2")
    assert metrics.route_rollbacks[("m",)] == 1
    # The restored route has no guard: nothing more happens.
    books[1].refresh()
    assert versionstats.check_guards(books[1], [], metrics, "w1") == []
