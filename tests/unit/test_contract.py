"""The wire contract: tensors, Celery envelopes, per-job failures, result documents.

Golden files under ``tests/golden/`` pin the wire format. After a deliberate contract
change, rewrite them with ``INFERQ_REGEN_GOLDEN=1 pytest tests/unit/test_contract.py``
and review the diff.
"""

from __future__ import annotations

import base64
import json
import math
import os
import pathlib
import pickle
import time
import tracemalloc
from datetime import datetime, timezone
from typing import Any

import kombu.serialization
import msgpack
import numpy as np
import pytest
from celery import Celery

from producer import wire
from producer.errors import InvalidInput, JobFailed
from producer.wire import Delivery, JobResult, TensorSpec
from producer.wire import read_result as parse_result

GOLDEN = pathlib.Path(__file__).resolve().parents[1] / "golden"
REGEN = os.environ.get("INFERQ_REGEN_GOLDEN") == "1"
QUEUE = wire.queue_name("digits")
FIXED_TAG = "00000000-0000-0000-0000-000000000000"
FIXED_DATE = "2000-01-01T00:00:00+00:00"
ALL_DTYPES = sorted(wire.DTYPES)
SHAPES: list[tuple[int, ...]] = [(2, 3), (), (0,), (3, 0, 2), (5,), (1,) * 7 + (2,)]


# --- helpers ---------------------------------------------------------------------------


def sample(dtype: str, shape: tuple[int, ...]) -> np.ndarray[Any, Any]:
    """Values that exercise every byte of ``dtype`` (extremes, NaN, inf where they exist)."""
    dt = np.dtype(dtype)
    values: list[Any]
    if dt.kind == "b":
        values = [True, False, False]
    elif dt.kind in "iu":
        info = np.iinfo(dt)
        values = [info.min, info.max, 1, 0, info.max // 3]
    else:
        finfo = np.finfo(dt)
        values = [-1.5, 0.0, float(finfo.max), float(finfo.tiny), np.inf, np.nan, 258.25]
    return np.resize(np.array(values, dtype=dt), math.prod(shape)).reshape(shape)


def same(a: np.ndarray[Any, Any], b: np.ndarray[Any, Any]) -> bool:
    return a.shape == b.shape and np.array_equal(a, b, equal_nan=a.dtype.kind == "f")


def envelope(
    body: bytes,
    *,
    content_type: str = wire.CONTENT_TYPES["json"],
    task: str = wire.TASK_NAME,
    job_id: str = "job-1",
    headers: dict[str, Any] | None = None,
) -> bytes:
    """A kombu Redis transport envelope around an already serialized body."""
    return json.dumps({
        "body": base64.b64encode(body).decode("ascii"),
        "content-encoding": "utf-8",
        "content-type": content_type,
        "headers": {"lang": "py", "task": task, "id": job_id, **(headers or {})},
        "properties": {"body_encoding": "base64", "delivery_tag": FIXED_TAG},
    }).encode()


def json_body(args: list[Any], kwargs: dict[str, Any] | None = None) -> bytes:
    return json.dumps([args, kwargs or {}, {}]).encode()


def pixels(rows: int = 1, *, text: bool = True) -> wire.Tensor:
    return wire.encode_tensor(np.ones((rows, 4), np.float32), text=text)


def bulk_message(ids: list[str], entries: list[Any], serializer: str = "json") -> bytes:
    body = wire.pack_body([["digits", entries], {}, {}], serializer)
    return envelope(
        body,
        content_type=wire.CONTENT_TYPES[serializer],
        task=wire.BULK_TASK_NAME,
        job_id="message-1",
        headers={wire.HEADER_JOB_IDS: ids},
    )


def failed_codes(delivery: Delivery) -> dict[str, str]:
    return {job_id: err.code for job_id, err in delivery.failed}


# --- tensors -----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("byteorder", ["<", ">"])
@pytest.mark.parametrize("text", [False, True], ids=["binary", "base64"])
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_tensor_round_trip(dtype: str, text: bool, byteorder: str, shape: tuple[int, ...]) -> None:
    original = sample(dtype, shape)
    arr = original.astype(original.dtype.newbyteorder(byteorder))
    encoded = wire.encode_tensor(arr, text=text)

    assert encoded["dtype"] == dtype
    assert encoded["shape"] == list(shape)
    assert isinstance(encoded["data"], str if text else bytes)
    raw = base64.b64decode(encoded["data"]) if text else encoded["data"]
    assert raw == original.astype(original.dtype.newbyteorder("<")).tobytes()

    decoded = wire.decode_tensor(encoded)
    assert decoded.dtype.str[0] in "<|", "decoded arrays must be little-endian"
    assert decoded.dtype.name == dtype
    assert same(decoded, original)
    assert not decoded.flags.writeable


def test_round_trip_of_non_contiguous_views() -> None:
    base = np.arange(24, dtype=">i4").reshape(4, 6)
    for view in (base.T, base[:, ::2], base[::-1]):
        decoded = wire.decode_tensor(wire.encode_tensor(view))
        assert same(decoded, np.asarray(view))


@pytest.mark.parametrize(
    "arr",
    [
        np.array([object()], dtype=object),
        np.array(["abc"]),
        np.array([1 + 2j], dtype=np.complex64),
        np.zeros(2, dtype=[("a", "<f4")]),
        np.zeros(1, dtype="V8"),
        np.array(["2020-01-01"], dtype="datetime64[D]"),
    ],
    ids=["object", "str", "complex64", "structured", "void", "datetime"],
)
def test_encode_refuses_unsupported_dtypes(arr: np.ndarray[Any, Any]) -> None:
    with pytest.raises(InvalidInput, match="not supported"):
        wire.encode_tensor(arr)


GOOD = {"dtype": "float32", "shape": [2, 2], "data": bytes(16)}


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"dtype": "object"}, "dtype 'object' is not one of"),
        ({"dtype": "<U3"}, "dtype '<U3' is not one of"),
        ({"dtype": "complex64"}, "dtype 'complex64' is not one of"),
        ({"dtype": "V8"}, "dtype 'V8' is not one of"),
        ({"dtype": [["a", "<f4"], ["b", "<i4"]]}, "is not one of"),
        ({"dtype": "<f4"}, "is not one of"),
        ({"dtype": "float"}, "is not one of"),
        ({"dtype": None}, "is not one of"),
        ({"shape": "2,2"}, "shape must be a list"),
        ({"shape": 4}, "shape must be a list"),
        ({"shape": None}, "shape must be a list"),
        ({"shape": [2, -2]}, "ints in \\[0, "),
        ({"shape": [True, 4]}, "ints in \\[0, "),
        ({"shape": [2.0, 2]}, "ints in \\[0, "),
        ({"shape": [1] * (wire.MAX_RANK + 1), "data": bytes(4)},
         f"at most {wire.MAX_RANK}"),
        ({"data": bytes(15)}, r"needs 16 bytes, got 15"),
        ({"data": bytes(17)}, r"needs 16 bytes, got 17"),
        ({"shape": [0, 2]}, r"needs 0 bytes, got 16"),
        ({"data": "not base64!!"}, "not valid base64"),
        ({"data": "AAA"}, "not valid base64"),
        ({"data": "AAAAAAAA AAAAAAAA*AAAAAA=="}, "not valid base64"),  # no lenient decode
        ({"data": {"__type__": "base64", "__value__": "%%%%"}}, "not valid base64"),
        ({"data": 123}, "data must be bytes"),
        ({"data": None}, "data must be bytes"),
        ({"data": [0] * 16}, "data must be bytes"),
        ({"data": {"__type__": "bytes"}}, "data must be bytes"),
        ({"data": {"__type__": "pickle", "__value__": "AAAA"}}, "data must be bytes"),
        ({"data": {"__type__": "bytes", "__value__": 16}}, "data must be bytes"),
    ],
)
def test_decode_rejects(changes: dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidInput, match=match):
        wire.decode_tensor({**GOOD, **changes}, "input 'pixels'")


@pytest.mark.parametrize("key", ["dtype", "shape", "data"])
def test_decode_rejects_missing_field(key: str) -> None:
    obj = {k: v for k, v in GOOD.items() if k != key}
    with pytest.raises(InvalidInput):
        wire.decode_tensor(obj)


@pytest.mark.parametrize("obj", [None, [1, 2], "tensor", b"\x00" * 16])
def test_decode_rejects_non_mapping(obj: Any) -> None:
    with pytest.raises(InvalidInput, match="input 'x': expected a mapping"):
        wire.decode_tensor(obj, "input 'x'")


@pytest.mark.parametrize("changes", [{"dtype": "object"}, {"shape": [-1]}, {"data": bytes(3)}])
def test_decode_errors_name_the_tensor(changes: dict[str, Any]) -> None:
    with pytest.raises(InvalidInput, match="input 'pixels'") as info:
        wire.decode_tensor({**GOOD, **changes}, "input 'pixels'")
    assert info.value.code == "INVALID_ARGUMENT"


@pytest.mark.parametrize(
    ("arr", "form"),
    [
        (np.arange(8, dtype=np.uint8), "bytes"),  # valid UTF-8: kombu writes it as text
        (np.array([1.0, -2.5], dtype=np.float32), "base64"),  # 0x80, 0xc0: not UTF-8
    ],
)
def test_decode_accepts_kombu_json_bytes_forms(arr: np.ndarray[Any, Any], form: str) -> None:
    _, _, text = kombu.serialization.dumps(wire.encode_tensor(arr), serializer="json")
    plain = json.loads(text)  # what a worker sees: the standard library, no kombu hooks
    assert plain["data"]["__type__"] == form
    assert same(wire.decode_tensor(plain), arr)


def test_decode_accepts_zero_dim_and_empty() -> None:
    scalar = wire.decode_tensor({"dtype": "int64", "shape": [], "data": bytes(8)})
    assert scalar.shape == () and scalar == 0
    empty = wire.decode_tensor({"dtype": "float64", "shape": [0, 5], "data": b""})
    assert empty.shape == (0, 5)


# --- golden payloads ---------------------------------------------------------------------


def _golden(name: str, actual: Any) -> None:
    path = GOLDEN / name
    if REGEN:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(actual, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return
    assert path.is_file(), f"{path} is missing: run with INFERQ_REGEN_GOLDEN=1 to write it"
    assert actual == json.loads(path.read_text(encoding="utf-8")), (
        f"the wire format no longer matches {path}; if the change is deliberate, rerun with "
        "INFERQ_REGEN_GOLDEN=1 and review the diff"
    )


def _normalised_message(raw: bytes) -> dict[str, Any]:
    doc = json.loads(raw)
    assert isinstance(doc["properties"]["delivery_tag"], str)
    doc["properties"]["delivery_tag"] = FIXED_TAG
    return doc  # type: ignore[no-any-return]


def _normalised_result(raw: bytes) -> dict[str, Any]:
    doc = json.loads(raw)
    assert datetime.fromisoformat(doc["date_done"]).tzinfo is not None
    doc["date_done"] = FIXED_DATE
    return doc  # type: ignore[no-any-return]


def golden_single(serializer: str) -> bytes:
    text = serializer == "json"
    tensors = {"pixels": wire.encode_tensor(np.arange(8, dtype=np.float32).reshape(2, 4) / 4,
                                                text=text)}
    return wire.build_message(
        task=wire.TASK_NAME,
        task_id="job-0001",
        args=["digits", tensors],
        kwargs={"version": 2},
        queue=QUEUE,
        serializer=serializer,
        headers={wire.HEADER_ENQUEUED_AT: 1700000000.25, wire.HEADER_NOTIFY: "client-1"},
        reply_to="client-1",
        expires=datetime(2030, 1, 1, tzinfo=timezone.utc),
        argsrepr="('digits', <1 tensors>)",
    )


def golden_bulk() -> bytes:
    ids = ["job-0002", "job-0003"]
    entries = [
        {"id": job_id, "inputs": {"pixels": wire.encode_tensor(
            np.full((1, 4), i, np.float32), text=True)}, "version": None}
        for i, job_id in enumerate(ids)
    ]
    return wire.build_message(
        task=wire.BULK_TASK_NAME,
        task_id="message-0001",
        args=["digits", entries],
        kwargs={},
        queue=QUEUE,
        serializer="json",
        headers={wire.HEADER_ENQUEUED_AT: 1700000000.5, wire.HEADER_NOTIFY: "client-1",
                 wire.HEADER_JOB_IDS: ids},
        reply_to="client-1",
        argsrepr="('digits', <2 jobs>)",
    )


def golden_success() -> bytes:
    return wire.success_document("job-0001", {
        "outputs": {
            "label": wire.encode_tensor(np.array([7, 3], np.int64), text=True),
            "probabilities": wire.encode_tensor(np.eye(2, 3, dtype=np.float32), text=True),
        },
        "model": "digits",
        "version": 2,
        "worker": "cpu0@host",
        "batch_size": 2,
        "timings_ms": {"queued": 1.5, "batch_wait": 0.25, "inference": 3.0, "total": 4.75},
    })


def golden_failure() -> bytes:
    return wire.failure_document(
        "job-0002", InvalidInput("input 'pixels': expected float32, got float64"))


@pytest.mark.parametrize("serializer", ["msgpack", "json"])
def test_golden_single_message(serializer: str) -> None:
    raw = golden_single(serializer)
    _golden(f"message_{serializer}.json", _normalised_message(raw))
    # ... and what the golden file holds still parses into the same job.
    stored = json.dumps(json.loads((GOLDEN / f"message_{serializer}.json").read_text()))
    delivery = wire.parse_message(stored, QUEUE)
    assert delivery.failed == []
    [job] = delivery.jobs
    assert (job.id, job.model, job.version) == ("job-0001", "digits", 2)
    assert job.enqueued_at == 1700000000.25
    assert job.deadline == datetime(2030, 1, 1, tzinfo=timezone.utc).timestamp()
    assert delivery.notify == "client-1"
    arr = wire.decode_tensor(job.inputs["pixels"])
    assert same(arr, np.arange(8, dtype=np.float32).reshape(2, 4) / 4)


def test_golden_bulk_message() -> None:
    _golden("message_bulk_json.json", _normalised_message(golden_bulk()))
    stored = (GOLDEN / "message_bulk_json.json").read_bytes()
    delivery = wire.parse_message(stored, QUEUE)
    assert [j.id for j in delivery.jobs] == ["job-0002", "job-0003"]
    assert [float(wire.decode_tensor(j.inputs["pixels"])[0, 0]) for j in delivery.jobs] == [
        0.0, 1.0]


def test_golden_success_document() -> None:
    _golden("result_success.json", _normalised_result(golden_success()))
    stored = (GOLDEN / "result_success.json").read_bytes()
    result = parse_result("job-0001", stored)
    assert isinstance(result, JobResult)
    assert result.outputs["label"].tolist() == [7, 3]
    assert result.outputs["probabilities"].shape == (2, 3)
    assert (result.model, result.version, result.worker, result.batch_size) == (
        "digits", 2, "cpu0@host", 2)


def test_golden_failure_document() -> None:
    _golden("result_failure.json", _normalised_result(golden_failure()))
    stored = (GOLDEN / "result_failure.json").read_bytes()
    failed = parse_result("job-0002", stored)
    assert isinstance(failed, JobFailed)
    assert failed.code == "INVALID_ARGUMENT"
    assert failed.message == "input 'pixels': expected float32, got float64"


def test_build_message_delivery_tags_are_unique() -> None:
    tags = {json.loads(golden_single("json"))["properties"]["delivery_tag"] for _ in range(3)}
    assert len(tags) == 3


# --- messages from a real Celery client --------------------------------------------------


def celery_message(serializer: str, inputs: dict[str, Any], **options: Any) -> bytes:
    """A message built the way Celery builds it, stored the way kombu's Redis transport does."""
    app = Celery(broker="memory://")
    headers, properties, body, _ = app.amqp.as_task_v2(
        "celery-job-1", wire.TASK_NAME, ["digits", inputs], {"version": 2}, **options)
    content_type, encoding, payload = kombu.serialization.dumps(body, serializer=serializer)
    data = payload.encode("utf-8") if isinstance(payload, str) else payload
    return json.dumps({
        "body": base64.b64encode(data).decode("ascii"),
        "content-encoding": encoding,
        "content-type": content_type,
        "headers": headers,
        "properties": {
            **properties,
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": QUEUE},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": FIXED_TAG,
        },
    }).encode()


@pytest.mark.parametrize("serializer", ["msgpack", "json"])
def test_message_from_a_real_celery_client(serializer: str) -> None:
    pix = np.arange(128, dtype=np.float32).reshape(2, 64) / 3
    mask = np.arange(2, dtype=np.uint8)
    inputs = {"pixels": wire.encode_tensor(pix), "mask": wire.encode_tensor(mask)}
    raw = celery_message(serializer, inputs)
    if serializer == "json":  # both of kombu's bytes forms really occur in this message
        body = base64.b64decode(json.loads(raw)["body"]).decode()
        assert '"__type__": "bytes"' in body and '"__type__": "base64"' in body

    delivery = wire.parse_message(raw, QUEUE)
    assert delivery.failed == []
    [job] = delivery.jobs
    assert (job.id, job.model, job.version) == ("celery-job-1", "digits", 2)
    assert job.enqueued_at is None
    assert job.deadline is None
    assert delivery.notify is None
    assert not delivery.redelivered
    assert same(wire.decode_tensor(job.inputs["pixels"]), pix)
    assert same(wire.decode_tensor(job.inputs["mask"]), mask)


def test_celery_expires_becomes_the_deadline() -> None:
    expires = datetime(2031, 5, 6, 7, 8, 9, tzinfo=timezone.utc)
    raw = celery_message("json", {"pixels": pixels(text=False)}, expires=expires)
    [job] = wire.parse_message(raw, QUEUE).jobs
    assert job.deadline == expires.timestamp()


def test_minimal_message_parses() -> None:
    raw = json.dumps({
        "body": base64.b64encode(json_body(["digits", {"pixels": pixels()}])).decode(),
        "content-type": "application/json",
        "headers": {"lang": "py", "task": wire.TASK_NAME, "id": "min-1"},
        "properties": {"body_encoding": "base64"},
    })
    delivery = wire.parse_message(raw, QUEUE)
    assert delivery.failed == []
    [job] = delivery.jobs
    assert (job.id, job.model, job.version, job.enqueued_at, job.deadline) == (
        "min-1", "digits", None, None, None)
    assert wire.decode_tensor(job.inputs["pixels"]).shape == (1, 4)


def test_envelope_json_accepts_but_orjson_refuses_still_parses() -> None:
    """A lone surrogate in a header (json.dumps escapes it; orjson refuses it) or a NaN does
    not make a readable message unreadable."""
    raw = json.dumps({
        "body": base64.b64encode(json_body(["digits", {"pixels": pixels()}])).decode(),
        "content-type": "application/json",
        "headers": {"task": wire.TASK_NAME, "id": "odd-1", "argsrepr": "('\ud800',)",
                    "x-score": float("nan")},
        "properties": {"body_encoding": "base64"},
    })
    assert "\\ud800" in raw and "NaN" in raw
    delivery = wire.parse_message(raw, QUEUE)
    assert delivery.failed == []
    [job] = delivery.jobs
    assert (job.id, job.model) == ("odd-1", "digits")


def test_envelope_with_a_lone_surrogate_is_built_and_parsed() -> None:
    raw = wire.build_message(task=wire.TASK_NAME, task_id="odd-2", args=["digits", {}],
                             kwargs={"version": None}, queue=QUEUE, serializer="json",
                             argsrepr="('\ud800',)")
    assert b"\\ud800" in raw
    assert wire.parse_message(raw, QUEUE).ids == ["odd-2"]


def test_plain_text_body_without_body_encoding_parses() -> None:
    raw = json.dumps({
        "body": json_body(["digits", {"pixels": pixels()}]).decode(),
        "content-type": "application/json",
        "headers": {"task": wire.TASK_NAME, "id": "plain-1"},
    })
    [job] = wire.parse_message(raw, QUEUE).jobs
    assert job.id == "plain-1"


def test_header_stamps_and_redelivery() -> None:
    raw = json.loads(envelope(
        json_body(["digits", {"pixels": pixels()}]),
        headers={wire.HEADER_ENQUEUED_AT: 12.5, wire.HEADER_NOTIFY: "client-9",
                 "expires": "2030-01-01T00:00:00"},
    ))
    raw["properties"]["redelivered"] = True
    delivery = wire.parse_message(json.dumps(raw), QUEUE)
    [job] = delivery.jobs
    assert job.enqueued_at == 12.5
    # A naive ISO time is UTC.
    assert job.deadline == datetime(2030, 1, 1, tzinfo=timezone.utc).timestamp()
    assert delivery.notify == "client-9"
    assert delivery.redelivered
    assert delivery.queue == QUEUE


# --- per-job failures ----------------------------------------------------------------------


def test_bulk_message_with_garbage_body_fails_every_job() -> None:
    raw = envelope(b"\xc1\xc1 not msgpack", content_type=wire.CONTENT_TYPES["msgpack"],
                   task=wire.BULK_TASK_NAME,
                   headers={wire.HEADER_JOB_IDS: ["a", "b", "c"]})
    delivery = wire.parse_message(raw, QUEUE)
    assert delivery.jobs == []
    assert [i for i, _ in delivery.failed] == ["a", "b", "c"]
    assert all(isinstance(e, InvalidInput) for _, e in delivery.failed)


class Canary:
    """Unpickling this writes ``path``: proof that a payload was (not) unpickled."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (pathlib.Path.write_text, (self.path, "unpickled"))


def test_canary_really_writes_when_unpickled(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "proof"
    pickle.loads(pickle.dumps(Canary(path)))  # the test of the test
    assert path.read_text() == "unpickled"


@pytest.mark.parametrize("bulk", [False, True])
def test_pickle_is_refused_and_never_loaded(tmp_path: pathlib.Path, bulk: bool) -> None:
    canary = tmp_path / "canary"
    payload = pickle.dumps((("digits", Canary(canary)), {}, {}))
    ids: dict[str, Any] = {wire.HEADER_JOB_IDS: ["p1", "p2"]} if bulk else {}
    raw = envelope(payload, content_type="application/x-python-serialize",
                   task=wire.BULK_TASK_NAME if bulk else wire.TASK_NAME,
                   job_id="p1", headers=ids)
    delivery = wire.parse_message(raw, QUEUE)
    assert delivery.jobs == []
    assert failed_codes(delivery) == dict.fromkeys(["p1", "p2"] if bulk else ["p1"],
                                                   "INVALID_ARGUMENT")
    assert "refused" in delivery.failed[0][1].message
    assert not canary.exists(), "a pickle payload was unpickled"


def test_yaml_is_refused(tmp_path: pathlib.Path) -> None:
    canary = tmp_path / "canary"
    payload = f"!!python/object/apply:pathlib.Path.write_text ['{canary}', 'x']".encode()
    delivery = wire.parse_message(envelope(payload, content_type="application/x-yaml"), QUEUE)
    assert delivery.jobs == []
    [(job_id, error)] = delivery.failed
    assert job_id == "job-1" and isinstance(error, InvalidInput)
    assert "application/x-yaml" in error.message
    assert not canary.exists()


def test_unknown_task_fails_the_job() -> None:
    raw = envelope(json_body(["digits", {"pixels": pixels()}]), task="proj.tasks.add")
    delivery = wire.parse_message(raw, QUEUE)
    assert delivery.jobs == []
    [(job_id, error)] = delivery.failed
    assert job_id == "job-1"
    assert isinstance(error, InvalidInput) and "unknown task 'proj.tasks.add'" in error.message


@pytest.mark.parametrize(
    "bomb",
    [
        b"\xdd\x7f\xff\xff\xff",  # array32 of 2**31 - 1 items
        b"\xdf\x80\x00\x00\x00",  # map32 of 2**31 pairs
        b"\xdb\x80\x00\x00\x00",  # str32 of 2**31 bytes
        b"\xc6\xff\xff\xff\xff",  # bin32 of 2**32 - 1 bytes
        b"\x92\xdd\x7f\xff\xff\xff",  # nested: [array32 of 2**31 - 1, ...]
    ],
    ids=["array32", "map32", "str32", "bin32", "nested"],
)
def test_msgpack_bomb_fails_fast_and_small(bomb: bytes) -> None:
    body = (bomb + b"\x00" * 20)[:20]
    raw = envelope(body, content_type=wire.CONTENT_TYPES["msgpack"])
    tracemalloc.start()
    started = time.perf_counter()
    try:
        delivery = wire.parse_message(raw, QUEUE)
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert delivery.jobs == []
    assert failed_codes(delivery) == {"job-1": "INVALID_ARGUMENT"}
    assert elapsed < 1.0
    assert peak < 8 * 1024 * 1024, f"decoding a 20-byte body allocated {peak} bytes"


def test_bulk_entry_with_wrong_id_fails_alone() -> None:
    entries = [
        {"id": "a", "inputs": {"pixels": pixels()}, "version": 1},
        {"id": "not-b", "inputs": {"pixels": pixels()}, "version": 1},
        {"id": "c", "inputs": {"pixels": pixels(3)}, "version": None},
    ]
    delivery = wire.parse_message(bulk_message(["a", "b", "c"], entries), QUEUE)
    assert [(j.id, j.version) for j in delivery.jobs] == [("a", 1), ("c", None)]
    assert failed_codes(delivery) == {"b": "INVALID_ARGUMENT"}
    assert "does not match its job id" in delivery.failed[0][1].message


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        ("not a mapping", "does not match its job id"),
        ({"id": "b", "inputs": {}, "version": "2"}, "version must be an integer"),
        ({"id": "b", "inputs": {}, "version": True}, "version must be an integer"),
        ({"id": "b", "inputs": {}, "version": 1.5}, "version must be an integer"),
        ({"id": "b", "inputs": {}, "enqueued_at": "yesterday"}, "yesterday"),
    ],
)
def test_one_bad_bulk_entry_fails_alone(entry: Any, match: str) -> None:
    good = {"id": "a", "inputs": {"pixels": pixels()}}
    delivery = wire.parse_message(bulk_message(["a", "b"], [good, entry]), QUEUE)
    assert [j.id for j in delivery.jobs] == ["a"]
    [(job_id, error)] = delivery.failed
    assert job_id == "b" and isinstance(error, InvalidInput)
    assert match in error.message


def test_bulk_entries_count_mismatch_fails_every_job() -> None:
    entries = [{"id": "a", "inputs": {}}]
    delivery = wire.parse_message(bulk_message(["a", "b"], entries), QUEUE)
    assert delivery.jobs == []
    assert failed_codes(delivery) == {"a": "INVALID_ARGUMENT", "b": "INVALID_ARGUMENT"}


def test_bulk_entries_keep_their_own_enqueued_at() -> None:
    entries = [{"id": "a", "inputs": {}, "enqueued_at": 5.0}, {"id": "b", "inputs": {}}]
    raw = json.loads(bulk_message(["a", "b"], entries))
    raw["headers"][wire.HEADER_ENQUEUED_AT] = 9.0
    delivery = wire.parse_message(json.dumps(raw), QUEUE)
    assert [j.enqueued_at for j in delivery.jobs] == [5.0, 9.0]


def test_json_body_with_kombu_bytes_forms() -> None:
    text_arr = np.arange(64, dtype=np.uint8).reshape(1, 64)  # UTF-8-decodable -> "bytes"
    bin_arr = np.array([[0.5, -1.0, 2.0, 3.5]], np.float32)  # not UTF-8 -> "base64"
    entries = [
        {"id": "a", "inputs": {"x": wire.encode_tensor(text_arr)}},
        {"id": "b", "inputs": {"x": wire.encode_tensor(bin_arr)}},
    ]
    _, _, payload = kombu.serialization.dumps(
        [["digits", entries], {}, {}], serializer="json")
    assert '"__type__": "bytes"' in payload and '"__type__": "base64"' in payload
    raw = envelope(payload.encode(), task=wire.BULK_TASK_NAME,
                   headers={wire.HEADER_JOB_IDS: ["a", "b"]})
    delivery = wire.parse_message(raw, QUEUE)
    assert delivery.failed == []
    a, b = delivery.jobs
    assert same(wire.decode_tensor(a.inputs["x"]), text_arr)
    assert same(wire.decode_tensor(b.inputs["x"]), bin_arr)


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b'{"args": []}', "protocol-2"),
        (b"[1]", "protocol-2"),
        (b'[["digits"], {}, {}]', "args must be"),
        (b'[["digits", {}], [2], {}]', "kwargs a mapping"),
        (b'[["digits", {}], {}, {}', "undecodable"),
        (b"\xff\xfe", "undecodable"),
    ],
)
def test_malformed_bodies_fail_the_job(body: bytes, match: str) -> None:
    delivery = wire.parse_message(envelope(body), QUEUE)
    assert delivery.jobs == []
    [(job_id, error)] = delivery.failed
    assert job_id == "job-1" and isinstance(error, InvalidInput)
    assert match in error.message


def test_msgpack_with_non_string_map_keys_fails_the_job() -> None:
    body = msgpack.packb([["digits", {1: 2}], {}, {}])
    raw = envelope(body, content_type=wire.CONTENT_TYPES["msgpack"])
    assert failed_codes(wire.parse_message(raw, QUEUE)) == {"job-1": "INVALID_ARGUMENT"}


def test_bad_expires_fails_the_job() -> None:
    raw = envelope(json_body(["digits", {}]), headers={"expires": "next tuesday"})
    assert failed_codes(wire.parse_message(raw, QUEUE)) == {"job-1": "INVALID_ARGUMENT"}


@pytest.mark.parametrize(
    "headers",
    [
        {"task": wire.TASK_NAME},
        {"task": wire.TASK_NAME, "id": ""},
        {"task": wire.TASK_NAME, "id": 7},
        {"task": wire.BULK_TASK_NAME, "id": "m"},
        {"task": wire.BULK_TASK_NAME, "id": "m", wire.HEADER_JOB_IDS: "a,b"},
        {"task": wire.BULK_TASK_NAME, "id": "m", wire.HEADER_JOB_IDS: ["a", ""]},
    ],
)
def test_message_without_usable_job_id_raises(headers: dict[str, Any]) -> None:
    raw = json.dumps({"body": "", "content-type": "application/json", "headers": headers})
    with pytest.raises(InvalidInput, match="no usable job id"):
        wire.parse_message(raw, QUEUE)


# Hostile and malformed input: each fails as InvalidInput, never as a stray exception.


@pytest.mark.parametrize("raw", [b"[]", b'"text"', b'{"headers": "x"}', b"5"])
def test_non_object_envelope_raises_invalid_input(raw: bytes) -> None:
    with pytest.raises(InvalidInput):
        wire.parse_message(raw, QUEUE)


def test_deeply_nested_json_body_fails_the_job() -> None:
    raw = envelope(b"[" * 100_000 + b"]" * 100_000)
    assert failed_codes(wire.parse_message(raw, QUEUE)) == {"job-1": "INVALID_ARGUMENT"}


def test_non_string_notify_header_is_not_passed_on() -> None:
    raw = envelope(json_body(["digits", {}]), headers={wire.HEADER_NOTIFY: 5})
    delivery = wire.parse_message(raw, QUEUE)
    assert delivery.notify is None or isinstance(delivery.notify, str)


@pytest.mark.parametrize("shape", [[0, 2**63], [0, 2**40, 2**40]])
def test_zero_size_tensor_with_huge_dims_is_invalid_input(shape: list[int]) -> None:
    with pytest.raises(InvalidInput):
        wire.decode_tensor({"dtype": "float32", "shape": shape, "data": b""})


# --- check_inputs --------------------------------------------------------------------------

SPECS = (TensorSpec("pixels", "float32", (-1, 64)), TensorSpec("mask", "uint8", (-1,)))


def inputs(rows: int = 3, **changes: Any) -> dict[str, Any]:
    base = {"pixels": np.zeros((rows, 64), np.float32), "mask": np.zeros(rows, np.uint8)}
    return {k: v for k, v in {**base, **changes}.items() if v is not None}


def test_check_inputs_returns_rows() -> None:
    assert wire.check_inputs(SPECS, inputs(3)) == 3
    assert wire.check_inputs(SPECS, inputs(1)) == 1


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        (inputs(mask=None), r"missing \['mask'\]"),
        (inputs(extra=np.zeros(3, np.uint8)), r"unknown \['extra'\]"),
        (inputs(pixels=np.zeros((3, 64), np.float64)), "'pixels': expected float32, got float64"),
        (inputs(pixels=np.zeros((3, 8, 8), np.float32)), "'pixels': expected rank 2"),
        (inputs(pixels=np.zeros(64, np.float32)), "'pixels': expected rank 2"),
        (inputs(pixels=np.zeros((3, 63), np.float32)), "dimension 1 must be 64, got 63"),
        (inputs(0), "empty batch"),
        (inputs(mask=np.zeros(2, np.uint8)), "disagree on the number of rows"),
    ],
    ids=["missing", "extra", "dtype", "rank-up", "rank-down", "fixed-dim", "empty", "rows"],
)
def test_check_inputs_rejects(arrays: dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidInput, match=match):
        wire.check_inputs(SPECS, arrays)


def test_check_inputs_without_batch_axis_counts_one_row() -> None:
    specs = [TensorSpec("image", "uint8", (2, 3))]
    assert wire.check_inputs(specs, {"image": np.zeros((2, 3), np.uint8)}) == 1
    with pytest.raises(InvalidInput, match="dimension 0 must be 2"):
        wire.check_inputs(specs, {"image": np.zeros((3, 3), np.uint8)})


def test_tensor_spec_json_round_trip() -> None:
    spec = TensorSpec("pixels", "float32", (-1, 64))
    assert spec.to_json() == {"name": "pixels", "dtype": "float32", "shape": [-1, 64]}
    assert TensorSpec.from_json(spec.to_json()) == spec


def test_names_and_keys() -> None:
    assert wire.queue_name("digits") == "inferq.digits"
    assert wire.result_key("abc") == "celery-task-meta-abc"


def test_bulk_entries_by_reference() -> None:
    entries = [{"id": i, "inputs": {"x": wire.encode_tensor(np.ones((1, 2), np.float32))},
                "version": None} for i in ("a", "b")]
    raw = wire.build_message(
        task=wire.BULK_TASK_NAME, task_id="m", args=["digits", {"ref": "inferq:blob:m:e"}],
        kwargs={}, queue=QUEUE, headers={wire.HEADER_JOB_IDS: ["a", "b"]})
    delivery = wire.parse_message(raw, QUEUE)
    assert delivery.entries_ref == "inferq:blob:m:e" and delivery.jobs == []
    wire.attach_entries(delivery, wire.pack_body(entries, "msgpack"))
    assert [j.id for j in delivery.jobs] == ["a", "b"] and delivery.failed == []
    gone = wire.parse_message(raw, QUEUE)
    wire.attach_entries(gone, None)
    assert [(i, e.code) for i, e in gone.failed] == [("a", "INVALID_ARGUMENT"),
                                                     ("b", "INVALID_ARGUMENT")]
    outside = wire.build_message(
        task=wire.BULK_TASK_NAME, task_id="m", args=["digits", {"ref": "celery-task-meta-x"}],
        kwargs={}, queue=QUEUE, headers={wire.HEADER_JOB_IDS: ["a"]})
    refused = wire.parse_message(outside, QUEUE)
    assert refused.entries_ref is None and [i for i, _ in refused.failed] == ["a"]
