"""The gateway's tensors (KServe v2 JSON, base64, msgpack) and options, in and out."""

from __future__ import annotations

import base64
import typing

import msgpack
import numpy as np
import pytest

from producer import wire
from producer.errors import InvalidInput
from producer.jobs import JobResult
from workers.gateway import payloads, schemas


def t(**changes: object) -> dict[str, object]:
    return {"name": "x", "datatype": "FP32", "shape": [2, 3], "data": list(range(6)),
            **changes}


def test_every_kserve_datatype_maps_to_a_wire_dtype() -> None:
    assert set(payloads.DATATYPES.values()) == set(wire.DTYPES)
    assert set(typing.get_args(schemas.Datatype)) == set(payloads.DATATYPES)
    for kind, dtype in payloads.DATATYPES.items():
        assert payloads.datatype(dtype) == kind


def test_json_tensor_flat_nested_and_binary() -> None:
    name, flat = payloads.json_tensor(t())
    assert name == "x" and flat.dtype == np.float32 and flat.shape == (2, 3)
    _, nested = payloads.json_tensor(t(data=[[0, 1, 2], [3, 4, 5]]))
    np.testing.assert_array_equal(flat, nested)
    raw = np.arange(6, dtype="<i8").tobytes()
    _, binary = payloads.json_tensor(t(datatype="INT64", data=base64.b64encode(raw).decode(),
                                       parameters={"binary": True}))
    assert binary.dtype == np.int64 and binary.tolist() == [[0, 1, 2], [3, 4, 5]]
    _, flags = payloads.json_tensor(t(datatype="BOOL", shape=[2], data=[True, False]))
    assert flags.dtype == np.bool_


@pytest.mark.parametrize(("changes", "message"), [
    ({"datatype": "BYTES"}, "datatype 'BYTES'"),
    ({"datatype": None}, "datatype None"),
    ({"shape": [2, -1]}, "shape must be"),
    ({"shape": [1] * 9}, "shape must be"),
    ({"shape": [4, 4]}, "holds 16 values, data has 6"),
    ({"data": "AAAA"}, "data must be a list"),
    ({"data": ["a", "b", "c", "d", "e", "f"]}, "not a list of FP32"),
    ({"data": "not base64!", "parameters": {"binary": True}}, "not valid base64"),
    ({"data": "AAAA", "parameters": {"binary": True}}, "needs 24 bytes, got 3"),
    ({"data": [1, 2], "parameters": {"binary": True}}, "base64 text"),
    ({"name": ""}, "non-empty string 'name'"),
    ({"parameters": [1]}, "parameters must be an object"),
])
def test_json_tensor_refusals(changes: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        payloads.json_tensor(t(**changes))


def test_job_options() -> None:
    job = payloads.json_job({"inputs": [t()], "version": "2", "deadline_s": 1.5, "priority": 9})
    assert (job.version, job.deadline_s, job.priority) == (2, 1.5, 9)
    assert payloads.json_job({"inputs": [t()], "version": "stable"}).version == "stable"
    assert payloads.json_job({"inputs": [t()], "version": "latest"}).version == "latest"
    assert payloads.json_job({"inputs": [t()]}).version is None
    for body, message in (
        ({"inputs": [t()], "version": True}, "version must be"),
        ({"inputs": [t()], "version": ""}, "version must be"),
        ({"inputs": [t()], "deadline_s": 0}, "deadline_s"),
        ({"inputs": [t()], "deadline_s": "1"}, "deadline_s"),
        ({"inputs": [t()], "priority": 10}, "priority"),
        ({"inputs": [t()], "priority": True}, "priority"),
        ({"inputs": []}, "non-empty list"),
        ({"inputs": [t(), t()]}, "given twice"),
        ([1], "JSON object"),
    ):
        with pytest.raises(InvalidInput, match=message):
            payloads.json_job(body)


def test_msgpack_job_and_batch() -> None:
    arr = np.ones((1, 64), np.float32)
    body = payloads.unpack(msgpack.packb({"inputs": {"pixels": wire.encode_tensor(arr)},
                                          "priority": 2}, use_bin_type=True))
    job = payloads.job(body, payloads.MSGPACK)
    np.testing.assert_array_equal(job.inputs["pixels"], arr)
    assert job.priority == 2
    with pytest.raises(InvalidInput, match="needs 256 bytes"):
        payloads.msgpack_job({"inputs": {"pixels": {"dtype": "float32", "shape": [1, 64],
                                                    "data": b"x"}}})
    with pytest.raises(InvalidInput, match="not valid msgpack"):
        payloads.unpack(b"\xc1")
    jobs, options = payloads.batch({"jobs": [{"inputs": [t()]}] * 3, "version": 1},
                                   "application/json")
    assert len(jobs) == 3 and options.version == 1 and options.inputs == {}
    with pytest.raises(InvalidInput, match="at most"):
        payloads.batch({"jobs": [{"inputs": [t()]}] * (payloads.MAX_BATCH_JOBS + 1)},
                       "application/json")


def test_outputs_json_and_msgpack() -> None:
    result = JobResult("j", {"label": np.array([3], np.int64),
                             "p": np.array([[0.25, 0.75]], np.float32)}, "m", 2, "w", 1, {})
    assert payloads.json_outputs(result) == [
        {"name": "label", "datatype": "INT64", "shape": [1], "data": [3]},
        {"name": "p", "datatype": "FP32", "shape": [1, 2], "data": [0.25, 0.75]}]
    packed = msgpack.unpackb(payloads.pack({"outputs": payloads.msgpack_outputs(result)}))
    np.testing.assert_array_equal(wire.decode_tensor(packed["outputs"]["p"]), result["p"])


def test_examples_fit_their_signature() -> None:
    specs = [wire.TensorSpec("seq", "int64", (-1, -1, 8)), wire.TensorSpec("flag", "bool", (-1,))]
    job = payloads.json_job({"inputs": [payloads.example(s) for s in specs]})
    assert job.inputs["seq"].shape == (1, 1, 8) and job.inputs["flag"].tolist() == [False]
    assert wire.check_inputs(specs, job.inputs) == 1
