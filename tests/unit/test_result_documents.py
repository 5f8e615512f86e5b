"""A batch's result documents built from parts are byte for byte the documents the contract
defines (success_document of success_result), whatever the outputs, stamps and IDs."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from producer import wire
from producer.errors import InvalidInput


def contract(job_id: str, outputs: dict[str, Any], *, batch_size: int,
             enqueued_at: float | None, picked_at: float, route: str | None,
             stamps: dict[str, float], date_done: str) -> bytes:
    timings = wire.timings_ms(enqueued_at=enqueued_at, picked_at=picked_at, **stamps)
    result = wire.success_result(outputs, model="m\u00e9", version=3, worker="cpu0@h\"x",
                                 batch_size=batch_size, timings=timings, route=route)
    return wire.success_document(job_id, result, date_done)


@pytest.mark.parametrize("route", [None, "split:4", "alias:can\"ary"])
def test_documents_from_parts_are_the_contracts(route: str | None) -> None:
    rng = np.random.default_rng(1)
    stamps = {"started": 1000.0042, "finished": 1000.0071, "stored": 1000.0093}
    date_done = "2026-11-29T22:00:00.123456+00:00"
    docs = wire.SuccessDocuments(model="m\u00e9", version=3, worker="cpu0@h\"x",
                                 date_done=date_done, **stamps)
    cases: list[tuple[str, dict[str, Any], float | None, float]] = [
        ("job-1", {"logits": rng.random((1, 10), dtype=np.float32)}, 999.9, 1000.001),
        ("j\"\u00fc\\2", {"logits": rng.random((3, 10), dtype=np.float32),
                          "label": rng.integers(0, 9, (3,))}, None, 1000.0041),
        ("job-3", {"flag": np.array([[True], [False]]),
                   "big": np.arange(4, dtype=">f8").reshape(2, 2)}, 1000.0, 1000.0),
        ("job-4", {"logits": rng.random((1, 10), dtype=np.float32)}, 1000.5, 1000.001),
        ("job-5", {"logits": rng.random((1, 10), dtype=np.float32)}, 999.9, 1000.001),
    ]
    for job_id, outputs, enqueued_at, picked_at in cases:
        rows = len(next(iter(outputs.values())))
        got = docs.document(job_id, outputs, batch_size=rows + 5, enqueued_at=enqueued_at,
                            picked_at=picked_at, route=route)
        want = contract(job_id, outputs, batch_size=rows + 5, enqueued_at=enqueued_at,
                        picked_at=picked_at, route=route, stamps=stamps, date_done=date_done)
        assert got == want
        read = wire.read_result(job_id, got)
        assert isinstance(read, wire.JobResult) and read.route == route
        for name, array in outputs.items():
            np.testing.assert_array_equal(read.outputs[name], array)


def test_an_output_the_contract_cannot_carry_is_refused() -> None:
    docs = wire.SuccessDocuments(model="m", version=1, worker="w", started=1.0,
                                 finished=2.0, stored=3.0, date_done="now")
    with pytest.raises(InvalidInput, match="not supported"):
        docs.document("j", {"text": np.array(["a"])}, batch_size=1, enqueued_at=None,
                      picked_at=1.0, route=None)
