"""Jobs of one message decoded together: the same arrays as one at a time, and a fall back
to one at a time whenever the jobs differ or one of them is bad."""

from __future__ import annotations

from typing import Any

import numpy as np

from producer import wire
from producer.wire import TensorSpec
from workers.serving.validation import decode_inputs, decode_uniform

SPECS = [TensorSpec("pixels", "float32", (-1, 4)), TensorSpec("ids", "int64", (-1, 2))]
LIMIT = 1 << 20


def job(rows: int = 1, seed: int = 0, **override: Any) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    inputs = {"pixels": wire.encode_tensor(rng.random((rows, 4)).astype(np.float32)),
              "ids": wire.encode_tensor(rng.integers(0, 9, (rows, 2)))}
    inputs.update(override)
    return inputs


def test_alike_jobs_decode_as_they_would_one_at_a_time() -> None:
    jobs = [job(2, seed) for seed in range(5)]
    together = decode_uniform(jobs, SPECS, max_tensor_bytes=LIMIT, reject_nonfinite=True)
    assert together is not None
    for inputs, (arrays, rows) in zip(jobs, together, strict=True):
        alone, alone_rows = decode_inputs(inputs, SPECS, {}, max_tensor_bytes=LIMIT,
                                          reject_nonfinite=True)
        assert rows == alone_rows == 2
        for name in ("pixels", "ids"):
            assert arrays[name].dtype == alone[name].dtype
            np.testing.assert_array_equal(arrays[name], alone[name])
            assert not arrays[name].flags.writeable


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
