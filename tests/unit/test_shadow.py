"""Shadow runs on fakeredis: sampling, comparison, the bounded backlog, what is stored, and
the route field that holds the setting (changed and rolled back with the route)."""

from __future__ import annotations

import importlib.util
import threading
from types import SimpleNamespace
from typing import Any

import fakeredis
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from producer import wire
from producer.errors import InternalError
from producer.wire.routes import Guard, Route, Shadow
from workers.ops import routes
from workers.ops.metrics import LifecycleMetrics
from workers.serving.observers import Batch
from workers.serving.shadow import ShadowObserver, compare, read_report, sampled

needs_lua = pytest.mark.skipif(importlib.util.find_spec("lupa") is None,
                               reason="fakeredis runs Lua only with 'lupa'")


def test_sampling_is_repeatable_and_close_to_the_rate() -> None:
    ids = [wire.new_id() for _ in range(20_000)]
    picked = [i for i in ids if sampled(i, 0.1)]
    assert 0.09 < len(picked) / len(ids) < 0.11
    assert picked == [i for i in ids if sampled(i, 0.1)]
    assert all(sampled(i, 1.0) for i in ids[:100])
    assert not any(sampled(i, 0.0) for i in ids[:100])


def test_sampling_is_independent_of_the_traffic_split() -> None:
    from producer.wire.routes import choose

    ids = [wire.new_id() for _ in range(20_000)]
    to_v1 = [i for i in ids if choose({1: 90, 2: 10}, i) == 1]
    # The shadow sample of the jobs sent to v1 is still 10%, not skewed by the split's hash.
    assert 0.09 < sum(sampled(i, 0.1) for i in to_v1) / len(to_v1) < 0.11


def test_compare_labels_and_differences() -> None:
    primary = {"label": np.array([3, 4], np.int64),
               "probabilities": np.array([[0.9, 0.1], [0.4, 0.6]], np.float32)}
    shadow = {"label": np.array([3, 5], np.int64),
              "probabilities": np.array([[0.8, 0.2], [0.4, 0.6]], np.float32)}
    diff = compare(primary, shadow)
    assert diff.labels == {"label": ([3, 4], [3, 5])}
    assert diff.labels_agree() is False
    biggest, mean = diff.outputs["probabilities"]
    assert biggest == pytest.approx(0.1, abs=1e-6)
    assert mean == pytest.approx(0.05, abs=1e-6)
    assert diff.max_abs == pytest.approx(0.1, abs=1e-6)  # the label output is left out
    assert compare(primary, primary).labels_agree() is True
    assert compare(primary, primary).max_abs == 0.0


def test_compare_missing_output_wrong_shape_and_nan() -> None:
    a = {"y": np.array([[1.0, np.nan]], np.float32)}
    assert compare(a, {}).outputs["y"][0] == float("inf")
    assert compare(a, {"y": np.zeros((2, 2), np.float32)}).outputs["y"][0] == float("inf")
    # NaN in both is the same answer; NaN against a number is not.
    assert compare(a, {"y": np.array([[1.0, np.nan]], np.float32)}).max_abs == 0.0
    assert compare(a, {"y": np.array([[1.0, 2.0]], np.float32)}).max_abs == float("inf")
    # A float output of one value per row is not a label.
    assert compare({"s": np.zeros(3, np.float32)}, {"s": np.ones(3, np.float32)}).labels == {}


class FakeModel:
    """Doubles its input: ``y = 2 * x``, label = row sum rounded."""

    def __init__(self, factor: float = 2.0) -> None:
        self.factor, self.calls = factor, 0

    def run(self, feeds: dict[str, np.ndarray[Any, Any]]) -> dict[str, np.ndarray[Any, Any]]:
        self.calls += 1
        x = feeds["x"]
        return {"label": np.rint(x.sum(axis=1) * self.factor).astype(np.int64),
                "y": x * self.factor}


class Book:
    def __init__(self, route: Route | None) -> None:
        self.route = route

    def get(self, model: str) -> Route | None:
        return self.route


def batch_of(n: int, version: int = 1) -> tuple[Batch, list[Any]]:
    jobs, outcomes = [], []
    for i in range(n):
        x = np.full((1, 2), float(i), np.float32)
        jobs.append(SimpleNamespace(job=SimpleNamespace(id=f"job-{i}"), inputs={"x": x},
                                    rows=1))
        outcomes.append({"label": np.rint(x.sum(axis=1) * 2).astype(np.int64), "y": x * 2})
    return Batch("m", version, "cpu", jobs, n, started=100.0, finished=100.0 + 0.001 * n), \
        outcomes


def done(obs: ShadowObserver, batch: Batch, outcomes: list[Any]) -> None:
    """A batch ran, and its results were stored (the writer runs the hand-off)."""
    obs.batch_done(batch, outcomes)
    work = obs.handoff()
    if work is not None:
        work()


def observer(route: Route | None, **kw: Any) -> tuple[ShadowObserver, Any, LifecycleMetrics]:
    client = fakeredis.FakeRedis()
    metrics = LifecycleMetrics(CollectorRegistry())
    stop = threading.Event()
    stop.set()  # no background thread: the test runs each step itself
    obs = ShadowObserver("m", Book(route), client, metrics, stop, **kw)
    return obs, client, metrics


def counter(metrics: LifecycleMetrics, outcome: str, version: str = "2") -> float:
    return metrics.shadow_jobs.get(("m", version, outcome), 0)


def test_sampled_jobs_are_compared_and_stored() -> None:
    obs, client, metrics = observer(Route(shadow=Shadow(2, 1.0)))
    shadow_model = FakeModel(3.0)
    obs.bind(lambda: {1: FakeModel(), 2: shadow_model})
    batch, outcomes = batch_of(5)
    outcomes[4] = InternalError("boom")  # failed jobs are never shadowed
    obs.batch_done(batch, outcomes)
    assert not obs.backlog  # not before the results are stored
    work = obs.handoff()
    assert work is not None and obs.handoff() is None
    work()
    assert len(obs.backlog) == 4
    while obs.backlog:
        obs.step()
    assert shadow_model.calls == 1  # the waiting jobs ran as one batch
    report = read_report(client, "m", 2)
    assert report.counts["compared"] == 4
    assert report.counts["labels_compared"] == 4
    assert report.counts["labels_agree"] == 1  # only the all-zero row gives the same label
    assert report.counts["rows"] == 4
    assert client.ttl("inferq:shadow:m:2") > 0
    # The most different job first: row 3, |3*3 - 3*2| = 3.
    top, score = report.top[0]
    assert top["job_id"] == "job-3" and score == pytest.approx(3.0)
    assert top["primary_version"] == 1 and top["shadow_version"] == 2
    assert top["labels"]["label"] == {"primary": [12], "shadow": [18]}
    assert counter(metrics, "compared") == 4
    assert metrics.shadow_labels[("m", "2", "disagree")] == 3
    assert metrics.abs_diff._counts[("m", "2", "y")].sum() == 4


def test_nothing_is_shadowed_without_a_shadow_or_on_the_shadow_version() -> None:
    obs, _, _ = observer(Route())
    done(obs, *batch_of(3))
    assert not obs.backlog and obs.handoff() is None
    obs, _, _ = observer(Route(shadow=Shadow(1, 1.0)))
    done(obs, *batch_of(3, version=1))
    assert not obs.backlog


def test_a_full_backlog_drops_and_counts() -> None:
    obs, client, metrics = observer(Route(shadow=Shadow(2, 1.0)), backlog=2)
    obs.bind(lambda: {2: FakeModel()})
    done(obs, *batch_of(5))
    assert len(obs.backlog) == 2
    assert counter(metrics, "dropped") == 3
    while obs.backlog:
        obs.step()
    assert read_report(client, "m", 2).counts["dropped"] == 3


def test_a_shadow_version_not_loaded_counts_as_failed() -> None:
    obs, client, metrics = observer(Route(shadow=Shadow(2, 1.0)))
    obs.bind(dict)
    done(obs, *batch_of(2))
    obs.step()
    assert read_report(client, "m", 2).counts["failed"] == 2
    assert counter(metrics, "failed") == 2


def test_groups_stop_at_max_rows() -> None:
    obs, _, _ = observer(Route(shadow=Shadow(2, 1.0)), max_rows=3)
    done(obs, *batch_of(7))
    assert [len(obs.take()) for _ in range(3)] == [3, 3, 1]


def test_route_json_is_unchanged_without_shadow_or_guard() -> None:
    plain = Route({1: 90.0, 2: 10.0}, {"stable": 1}, 3, 1.0, "me", "")
    assert b"shadow" not in plain.to_json() and b"guard" not in plain.to_json()
    full = Route({1: 90.0, 2: 10.0}, {}, 3, shadow=Shadow(2, 0.25),
                 guard=Guard(0.05, None, 5, 20))
    assert Route.from_json(full.to_json()) == full
    assert full.baseline() == 1


@needs_lua
def test_shadow_changes_go_through_history_and_rollback() -> None:
    import json

    client = fakeredis.FakeRedis()
    client.hset(wire.MODELS_KEY, "m", json.dumps({"versions": [1, 2]}))
    routes.set_split(client, "m", {1: 1.0})
    on = routes.set_shadow(client, "m", 2, 0.1)
    assert on.shadow == Shadow(2, 0.1) and on.split == {1: 1.0}
    # A route change keeps the shadow; turning it off and rolling back restores it.
    assert routes.set_split(client, "m", {1: 50, 2: 50}).shadow == Shadow(2, 0.1)
    assert routes.set_shadow(client, "m", None).shadow is None
    back = routes.rollback(client, "m")
    assert back is not None and back.shadow == Shadow(2, 0.1)
    with pytest.raises(Exception, match="sample"):
        routes.set_shadow(client, "m", 2, 1.5)
