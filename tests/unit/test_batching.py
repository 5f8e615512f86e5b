"""Batching: the flush policy, how many jobs a batch takes, collate and split."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from workers.serving.batching import (
    BackgroundCap,
    BatchPolicy,
    collate,
    online_first,
    split,
    take,
)

POLICY = BatchPolicy(max_rows=8, max_wait_s=0.01)


@pytest.mark.parametrize(
    ("rows", "waited_s", "queue_empty", "flush"),
    [
        # A lone job with nothing behind it goes at once, whatever the wait budget.
        (1, 0.0, True, True),
        # Full (or over-full) batches go at once, even while more is waiting.
        (8, 0.0, False, True),
        (9, 0.0, False, True),
        (8, 0.0, True, True),
        # Jobs keep arriving and the batch is not full: wait, up to max_wait_s.
        (1, 0.0, False, False),
        (7, 0.009, False, False),
        (7, 0.01, False, True),
        (1, 5.0, False, True),
        # The queue ran dry: flush what there is.
        (7, 0.0, True, True),
        # Nothing buffered never flushes, however long or empty.
        (0, 0.0, True, False),
        (0, 100.0, True, False),
        (0, 100.0, False, False),
        (-1, 100.0, True, False),
    ],
)
def test_should_flush(rows: int, waited_s: float, queue_empty: bool, flush: bool) -> None:
    assert POLICY.should_flush(rows, waited_s, queue_empty) is flush


def test_zero_wait_policy_flushes_any_rows_at_once() -> None:
    policy = BatchPolicy(max_rows=64, max_wait_s=0.0)
    assert policy.should_flush(1, 0.0, False)
    assert not policy.should_flush(0, 0.0, False)


@pytest.mark.parametrize(
    ("row_counts", "max_rows", "taken"),
    [
        ([], 8, 0),
        ([1], 8, 1),
        ([20], 8, 1),  # larger than a batch: still taken, alone
        ([20, 1], 8, 1),
        ([8], 8, 1),
        ([4, 4], 8, 2),  # fits exactly
        ([4, 4, 1], 8, 2),
        ([3, 3, 3], 8, 2),
        ([2, 10, 1], 8, 1),  # stops at the first job that does not fit: order is kept
        ([1] * 10, 4, 4),
        ([1, 1, 1], 1, 1),
    ],
)
def test_take(row_counts: list[int], max_rows: int, taken: int) -> None:
    assert take(row_counts, max_rows) == taken


def test_take_never_exceeds_max_rows_past_the_first_job() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        counts = [int(c) for c in rng.integers(1, 12, size=int(rng.integers(1, 10)))]
        n = take(counts, 16)
        assert 1 <= n <= len(counts)
        assert n == 1 or sum(counts[:n]) <= 16
        assert n == len(counts) or sum(counts[: n + 1]) > 16


def _job(rows: int, seed: int) -> dict[str, np.ndarray[Any, Any]]:
    return {
        "a": np.arange(rows * 4, dtype=np.float32).reshape(rows, 4) + 100 * seed,
        "b": np.full(rows, seed, dtype=np.int64),
        "unused": np.zeros(1),
    }


def _model(feeds: dict[str, np.ndarray[Any, Any]]) -> dict[str, np.ndarray[Any, Any]]:
    """A fake model: row-wise outputs of rank 1, 2 and 3."""
    a, b = feeds["a"], feeds["b"]
    return {
        "sum": a.sum(axis=1),
        "double": a * 2,
        "ids": b + 1,
        "cube": np.stack([a, a], axis=1),
    }


def test_collate_split_round_trip() -> None:
    row_counts = [1, 3, 2, 1]
    jobs = [_job(r, i) for i, r in enumerate(row_counts)]

    batch = collate(jobs, ["a", "b"])
    assert set(batch) == {"a", "b"}
    assert batch["a"].shape == (7, 4) and batch["b"].shape == (7,)

    parts = split(_model(batch), row_counts)
    assert len(parts) == len(jobs)
    for job, part, rows in zip(jobs, parts, row_counts, strict=True):
        alone = _model(job)
        assert set(part) == set(alone)
        for name, arr in part.items():
            assert arr.shape[0] == rows
            np.testing.assert_array_equal(arr, alone[name])


def test_collate_single_job_passes_arrays_through() -> None:
    job = _job(2, 0)
    batch = collate([job], ["a", "b"])
    assert set(batch) == {"a", "b"}
    assert batch["a"] is job["a"]


@pytest.mark.parametrize("row_counts", [[3, 3], [6, 1], [7]])
def test_split_rejects_row_disagreement(row_counts: list[int]) -> None:
    outputs = {"ok": np.zeros(sum(row_counts)), "bad": np.zeros((5, 2))}
    with pytest.raises(ValueError, match=r"output 'bad' has shape \[5, 2\]"):
        split(outputs, row_counts)


def test_split_rejects_scalar_output() -> None:
    with pytest.raises(ValueError, match="output 'score'"):
        split({"score": np.ones(())}, [1])


def test_split_empty() -> None:
    assert split({"x": np.zeros((0, 3))}, []) == []


# --- online first, and the cap on background rows -------------------------------------------


def test_online_jobs_form_the_batch_alone_whenever_any_wait() -> None:
    waiting = ["b1", "o1", "b2", "o2"]
    assert online_first(waiting, lambda w: w.startswith("b")) == ["o1", "o2"]
    assert online_first(["b1", "b2"], lambda w: w.startswith("b")) == ["b1", "b2"]


def test_background_runs_are_full_size_until_online_jobs_are_seen() -> None:
    cap = BackgroundCap(BatchPolicy(max_rows=256, max_wait_s=0.002, background_run_s=0.001,
                                    online_recent_s=1.0))
    assert cap.rows(now=100.0) == 256, "nothing measured yet"
    cap.observe(rows=256, seconds=0.004)  # 15.6 us a row
    assert cap.rows(now=100.0) == 256, "no online job seen"
    cap.saw_online(now=100.0)
    assert cap.rows(now=100.5) == 64, "about 1 ms of model time"
    assert cap.rows(now=101.0) == 256, "online traffic stopped a second ago"


def test_the_background_cap_follows_the_model_and_stays_in_bounds() -> None:
    cap = BackgroundCap(BatchPolicy(max_rows=16, max_wait_s=0.002, background_run_s=0.001))
    cap.saw_online(now=0.0)
    cap.observe(rows=4, seconds=0.008)  # 2 ms a row: the smallest run, a sixteenth
    assert cap.rows(now=0.0) == 1
    big = BackgroundCap(BatchPolicy(max_rows=256, max_wait_s=0.002, background_run_s=0.001))
    big.saw_online(now=0.0)
    big.observe(rows=4, seconds=0.008)
    assert big.rows(now=0.0) == 16
    small = BackgroundCap(BatchPolicy(max_rows=4, max_wait_s=0.002, background_run_s=0.001))
    small.saw_online(now=0.0)
    small.observe(rows=4, seconds=0.008)
    assert small.rows(now=0.0) == 1, "one row, never none"
    for _ in range(40):  # the model got faster: the average follows
        cap.observe(rows=100, seconds=0.0001)
    assert cap.rows(now=0.0) == 16, "never more than max_rows"
    cap.observe(rows=0, seconds=1.0)
    cap.observe(rows=5, seconds=0.0)
    assert cap.rows(now=0.0) == 16, "empty or untimed runs teach nothing"
