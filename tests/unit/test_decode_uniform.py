"""Jobs of one message decoded together: the same arrays as one at a time, and a fall back
to one at a time whenever the jobs differ or one of them is bad."""

from __future__ import annotations

from typing import Any

import numpy as np

from producer import wire
from producer.errors import InvalidInput
from producer.wire import TensorSpec
from workers.serving.validation import decode_columns, decode_inputs, decode_uniform

SPECS = [TensorSpec("pixels", "float32", (-1, 4)), TensorSpec("ids", "int64", (-1, 2))]
LIMIT = 1 << 20


def job(rows: int = 1, seed: int = 0, **override: Any) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    inputs = {"pixels": wire.encode_tensor(rng.random((rows, 4)).astype(np.float32)),
              "ids": wire.encode_tensor(rng.integers(0, 9, (rows, 2)))}
    inputs.update(override)
    return inputs


def assert_as_alone(inputs: dict[str, Any], got: tuple[dict[str, Any], int]) -> None:
    """``got`` (decoded with other jobs) is what decoding ``inputs`` alone gives: 2 rows."""
    arrays, rows = got
    alone, alone_rows = decode_inputs(inputs, SPECS, {}, max_tensor_bytes=LIMIT,
                                      reject_nonfinite=True)
    assert rows == alone_rows == 2
    for name in ("pixels", "ids"):
        assert arrays[name].dtype == alone[name].dtype
        np.testing.assert_array_equal(arrays[name], alone[name])
        assert not arrays[name].flags.writeable


def test_alike_jobs_decode_as_they_would_one_at_a_time() -> None:
    jobs = [job(2, seed) for seed in range(5)]
    together = decode_uniform(jobs, SPECS, max_tensor_bytes=LIMIT, reject_nonfinite=True)
    assert together is not None
    for inputs, got in zip(jobs, together, strict=True):
        assert_as_alone(inputs, got)


def test_jobs_that_differ_or_a_bad_job_go_one_at_a_time() -> None:
    nan = np.full((1, 4), np.nan, np.float32)
    cases = [
        [job(), job(rows=2)],                                    # different shapes
        [job(), job(pixels=wire.encode_tensor(nan))],            # NaN in one job
        [job(), job(pixels=wire.encode_tensor(np.zeros((1, 4))))],  # float64
        [job(), {"pixels": job()["pixels"]}],                    # an input missing
        [job(), job(pixels={"ref": "inferq:blob:x", "dtype": "float32", "shape": [1, 4]})],
        [job(), job(pixels=wire.encode_tensor(np.zeros((1, 4), np.float32), text=True))],
        [job(pixels=wire.encode_tensor(np.zeros((1, 5), np.float32)))] * 2,  # wrong width
    ]
    for jobs in cases:
        assert decode_uniform(jobs, SPECS, max_tensor_bytes=LIMIT,
                              reject_nonfinite=True) is None, jobs
    # NaN allowed by the settings: decoded together.
    assert decode_uniform([job(), job(pixels=wire.encode_tensor(nan))], SPECS,
                          max_tensor_bytes=LIMIT, reject_nonfinite=False) is not None
    # Larger than the tensor limit: one at a time, where the job is refused.
    assert decode_uniform([job(), job()], SPECS, max_tensor_bytes=8,
                          reject_nonfinite=True) is None


# --- bulk messages sent as columns ------------------------------------------------------------

def columns_delivery(jobs: list[dict[str, Any]], versions: list[Any] | None = None,
                     ids: list[str] | None = None) -> wire.Delivery:
    """A bulk message of ``jobs`` as the client sends alike jobs, parsed as a worker does."""
    job_ids = [f"job-{i}" for i in range(len(jobs))]
    entries = wire.columns_entries(job_ids, jobs, versions or [None] * len(jobs))
    assert entries is not None, "alike jobs travel as columns"
    if ids is not None:
        entries["ids"] = ids
    delivery = wire.Delivery(queue="inferq.m", ids=job_ids, model="m")
    wire.attach_entries(delivery, wire.pack_body(entries, "msgpack"))
    return delivery


def test_columns_decode_as_each_job_would_alone() -> None:
    jobs = [job(2, seed) for seed in range(5)]
    delivery = columns_delivery(jobs)
    assert delivery.failed == [] and delivery.columns is not None
    decoded = decode_columns(delivery.columns, [j.column_row or 0 for j in delivery.jobs],
                             SPECS, max_tensor_bytes=LIMIT, reject_nonfinite=True)
    for inputs, got in zip(jobs, decoded, strict=True):
        assert not isinstance(got, Exception)
        assert_as_alone(inputs, got)


def test_a_nan_row_of_columns_fails_its_job_alone() -> None:
    nan = np.full((1, 4), np.nan, np.float32)
    jobs = [job(), job(pixels=wire.encode_tensor(nan)), job(seed=2)]
    delivery = columns_delivery(jobs)
    assert delivery.columns is not None
    decoded = decode_columns(delivery.columns, [0, 1, 2], SPECS, max_tensor_bytes=LIMIT,
                             reject_nonfinite=True)
    assert not isinstance(decoded[0], Exception) and not isinstance(decoded[2], Exception)
    assert isinstance(decoded[1], InvalidInput) and "NaN or Inf" in decoded[1].message
    allowed = decode_columns(delivery.columns, [1], SPECS, max_tensor_bytes=LIMIT,
                             reject_nonfinite=False)
    assert not isinstance(allowed[0], Exception)


def test_columns_that_break_the_signature_or_the_limit_fail_every_job() -> None:
    wide = [job(pixels=wire.encode_tensor(np.zeros((1, 5), np.float32)))] * 3
    delivery = columns_delivery(wide)
    assert delivery.columns is not None
    decoded = decode_columns(delivery.columns, [0, 1, 2], SPECS, max_tensor_bytes=LIMIT,
                             reject_nonfinite=True)
    assert all(isinstance(d, InvalidInput) and "dimension 1 must be 4" in d.message
               for d in decoded)
    delivery = columns_delivery([job(), job()])
    assert delivery.columns is not None
    decoded = decode_columns(delivery.columns, [0, 1], SPECS, max_tensor_bytes=8,
                             reject_nonfinite=True)
    assert all(isinstance(d, InvalidInput) and "the limit is 8" in d.message for d in decoded)


def test_columns_that_do_not_match_their_message_fail_every_job() -> None:
    delivery = columns_delivery([job(), job()], ids=["job-0", "someone-else"])
    assert delivery.jobs == [] and [i for i, _ in delivery.failed] == ["job-0", "job-1"]
    assert "do not match their job ids" in str(delivery.failed[0][1])
    delivery = columns_delivery([job(), job(), job(), job()], versions=[1, "two", [3], True])
    assert [j.id for j in delivery.jobs] == ["job-0"] and delivery.jobs[0].version == 1
    assert [i for i, _ in delivery.failed] == ["job-1", "job-2", "job-3"], \
        "a bad version fails its job alone"


def test_jobs_that_differ_are_not_sent_as_columns() -> None:
    ids = ["a", "b"]
    assert wire.columns_entries(ids, [job(), job(rows=2)], [None, None]) is None
    text = job(pixels=wire.encode_tensor(np.zeros((1, 4), np.float32), text=True))
    assert wire.columns_entries(ids, [text, text], [None, None]) is None
    ref = job(pixels={"ref": "inferq:blob:x", "dtype": "float32", "shape": [1, 4]})
    assert wire.columns_entries(ids, [job(), ref], [None, None]) is None
    assert wire.columns_entries(ids, [job(), {"pixels": job()["pixels"]}], [None, None]) is None
