"""InferenceClient.map and its window, against a fake client that answers out of order."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pytest

from producer import InferenceClient
from producer.errors import InternalError, InvalidInput, JobFailed, JobTimeout
from producer.jobs import JobHandle
from producer.mapping import Window, map_rows
from producer.submission import ModelInfo
from producer.wire import JobResult

SIGNATURE = {"versions": [1], "max_batch_rows": 4,
             "inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 2]}],
             "outputs": [{"name": "y", "dtype": "float32", "shape": [-1]}]}


class FakeClient:
    """Answers a random part of the jobs asked about, in random order; y = x[:, 0] + x[:, 1].

    A job whose first value is negative fails INTERNAL; one whose first value is 999 is
    refused at submit; ``never`` jobs are never answered. ``consumed`` is set by the test:
    how many jobs the caller has had all outcomes of.
    """

    def __init__(self, seed: int = 0) -> None:
        self.rng = random.Random(seed)
        self.jobs: dict[str, np.ndarray] = {}
        self.answered: set[str] = set()
        self.submits = 0
        self.consumed = 0
        self.most_outstanding = 0
        self.never = False

    def model(self, name: str, version: int | None = None) -> ModelInfo:
        return ModelInfo(name, SIGNATURE)

    def submit(self, model: str, inputs: Mapping[str, Any], *, version: int | None = None,
               priority: int = 0) -> JobHandle:
        x = np.asarray(inputs["x"], np.float32)
        if x.ndim == 1:
            x = x[np.newaxis]
        if x.shape[1:] != (2,) or float(x[0, 0]) == 999:
            raise InvalidInput("bad input")
        job_id = f"job{len(self.jobs)}"
        self.jobs[job_id] = x
        self.submits += 1
        self.most_outstanding = max(self.most_outstanding, len(self.jobs) - self.consumed)
        return JobHandle(self, job_id, model)  # type: ignore[arg-type]

    def submit_many(self, model: str, inputs: Sequence[Mapping[str, Any]], *,
                    version: int | None = None, priority: int = 0,
                    jobs_per_message: int = 32) -> list[JobHandle]:
        for item in inputs:  # all or nothing, as the real call's one transaction
            x = np.atleast_2d(np.asarray(item["x"], np.float32))
            if x.shape[1:] != (2,) or float(x[0, 0]) == 999:
                raise InvalidInput("bad input")
        return [self.submit(model, i, version=version, priority=priority) for i in inputs]

    def as_completed(self, job_ids: Sequence[str], timeout: float = 60.0, *,
                     just_submitted: bool = False
                     ) -> Iterator[tuple[str, JobResult | JobFailed]]:
        ids = [i for i in job_ids if i not in self.answered and not self.never]
        self.rng.shuffle(ids)
        for job_id in ids[:self.rng.randint(0, len(ids))]:
            self.answered.add(job_id)
            x = self.jobs[job_id]
            if x[0, 0] < 0:
                yield job_id, InternalError("model failed", job_id=job_id)
            else:
                yield job_id, JobResult(job_id, {"y": x[:, 0] + x[:, 1]}, "m", 1, "w",
                                        len(x))
        if len(ids) and not all(i in self.answered for i in job_ids):
            raise JobTimeout("not yet", [i for i in job_ids if i not in self.answered])


def _map(client: FakeClient, rows: Any, **kw: Any) -> Iterator[JobResult | JobFailed]:
    return map_rows(client, "m", rows, **kw)  # type: ignore[arg-type]


def test_in_order_with_at_most_max_in_flight_outstanding() -> None:
    client = FakeClient()
    rows = [{"x": [float(i), 1.0]} for i in range(203)]
    out = []
    for i, outcome in enumerate(_map(client, rows, chunk_rows=4, max_in_flight=3), 1):
        assert isinstance(outcome, JobResult)
        out.append(float(outcome["y"][0]))
        assert outcome["y"].shape == (1,)  # one row's outputs, batch axis kept
        client.consumed = i // 4
        # submitted and not yet handed back, answered or not: never above the bound
        assert client.submits - client.consumed <= 3
    assert out == [i + 1.0 for i in range(203)]
    assert client.submits == 51  # 50 jobs of 4 rows, 1 of 3
    assert client.most_outstanding <= 3


def test_lazy_the_model_at_once_rows_as_consumed() -> None:
    client = FakeClient()
    outcomes = _map(client, ({"x": [1.0, 2.0]} for _ in range(100)), chunk_rows=5,
                    max_in_flight=2)
    assert client.submits == 0
    next(outcomes)
    assert client.submits == 2


def test_chunk_rows_defaults_to_the_models_batch() -> None:
    client = FakeClient()
    list(_map(client, [{"x": [1.0, 2.0]}] * 9))
    assert client.submits == 3  # max_batch_rows 4: 4 + 4 + 1


def test_failures_are_shared_by_their_chunk_only() -> None:
    client = FakeClient()
    rows = [{"x": [1.0, 1.0]}] * 4 + [{"x": [-1.0, 1.0]}] + [{"x": [1.0, 1.0]}] * 3 \
        + [{"x": [999.0, 0.0]}] + [{"x": [2.0, 2.0]}] * 2
    out = list(_map(client, rows, chunk_rows=4, max_in_flight=2))
    kinds = [type(o).__name__ for o in out]
    assert kinds == ["JobResult"] * 4 + ["InternalError"] * 4 + ["InvalidInput"] * 3
    assert out[4] is out[7]  # one failure per job, handed to each of its rows
    assert out[8].job_id is None  # refused at submit, before any job existed
    assert client.submits == 2


def test_items_of_other_shapes_start_their_own_job() -> None:
    client = FakeClient()
    rows = [{"x": [1.0, 1.0]}, {"x": [[1.0, 1.0], [2.0, 2.0]]}, {"x": [1.0, 2.0, 3.0]},
            {"x": [3.0, 3.0]}]
    out = list(_map(client, rows, chunk_rows=8))
    assert [type(o).__name__ for o in out] == ["JobResult", "JobResult", "InvalidInput",
                                               "JobResult"]
    assert out[1]["y"].tolist() == [2.0, 4.0]  # a two-row item gets both rows back
    assert client.submits == 2  # rows 0-1 together, row 3 alone; row 2 refused


def test_window_times_out_unanswered_jobs() -> None:
    client = FakeClient()
    client.never = True
    window: Window[int] = Window(client, "m", max_in_flight=2, timeout=0.05)  # type: ignore[arg-type]
    window.submit(0, {"x": [1.0, 1.0]})
    window.wait(poll_s=0.01)
    with pytest.raises(JobTimeout) as exc:
        for _ in range(100):
            window.wait(poll_s=0.01)
            time.sleep(0.01)
    assert window.drop(exc.value.job_ids) == [0]
    assert window.free == 2


def test_map_is_a_client_method() -> None:
    assert InferenceClient.map.__doc__ and "input order" in InferenceClient.map.__doc__
