"""The producer client and the workers' result store against fakeredis (no real Redis)."""

from __future__ import annotations

import importlib.util
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fakeredis
import numpy as np
import pytest
import redis

import producer.client
from producer import wire
from producer.client import InferenceClient, ModelInfo
from producer.errors import (
    InternalError,
    InvalidInput,
    JobFailed,
    JobTimeout,
    ModelNotFound,
    ResourceExhausted,
    Unavailable,
    UnknownJob,
)
from producer.jobs import JobHandle, JobResult, JobStatus

QUEUE = wire.queue_name("digits")
SIGNATURE = {
    "description": "digits",
    "versions": [1, 2],
    "inputs": [{"name": "pixels", "dtype": "float32", "shape": [-1, 64]}],
    "outputs": [
        {"name": "label", "dtype": "int64", "shape": [-1]},
        {"name": "probabilities", "dtype": "float32", "shape": [-1, 10]},
    ],
    "max_batch_rows": 64,
}
HAS_LUPA = importlib.util.find_spec("lupa") is not None
needs_lua = pytest.mark.skipif(
    not HAS_LUPA,
    reason="fakeredis runs Lua scripts only with the optional 'lupa' package, which is not "
    "installed; ResultStore.store is one Lua script",
)


@pytest.fixture
def server() -> fakeredis.FakeServer:
    return fakeredis.FakeServer()


@pytest.fixture
def r(server: fakeredis.FakeServer) -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis(server=server)


@pytest.fixture
def make_client(
    server: fakeredis.FakeServer, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Any]:
    urls: list[str] = []

    def fake_redis(url: str, timeout: float) -> fakeredis.FakeRedis:
        urls.append(url)
        return fakeredis.FakeRedis(server=server)

    monkeypatch.setattr(producer.client, "_redis", fake_redis)
    clients: list[InferenceClient] = []

    def make(**kwargs: Any) -> InferenceClient:
        client = InferenceClient(**kwargs)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def client(make_client: Any) -> InferenceClient:
    return make_client()  # type: ignore[no-any-return]


def advertise(r: fakeredis.FakeRedis, model: str = "digits", live: bool = True,
              **changes: Any) -> None:
    """What a worker's heartbeat writes: the signature, and (``live``) itself as a server
    of the model until its heartbeat expires."""
    r.hset(wire.MODELS_KEY, model, json.dumps({**SIGNATURE, **changes}))
    if live:
        r.zadd(wire.live_key(model), {"cpu0@test": wire.now() + wire.HEARTBEAT_TTL_S})


def queued(r: fakeredis.FakeRedis, queue: str = QUEUE) -> list[wire.Delivery]:
    """Messages on ``queue``, oldest first (the order a worker pops them in), parsed, with
    the entries of bulk messages read from their blob as a worker does."""
    out = [wire.parse_message(raw, queue) for raw in reversed(r.lrange(queue, 0, -1))]
    for delivery in out:
        if delivery.entries_ref is not None:
            wire.attach_entries(delivery, r.get(delivery.entries_ref))
    return out


def success(job_id: str, label: list[int]) -> bytes:
    probs = np.zeros((len(label), 10), np.float32)
    probs[np.arange(len(label)), label] = 1.0
    return wire.success_document(job_id, {
        "outputs": {
            "label": wire.encode_tensor(np.array(label, np.int64), text=True),
            "probabilities": wire.encode_tensor(probs, text=True),
        },
        "model": "digits",
        "version": 2,
        "worker": "cpu0@test",
        "batch_size": 7,
        "timings_ms": {"queued": 1.0, "batch_wait": None, "inference": 2.0, "total": 3.0},
    })


# --- submitting ---------------------------------------------------------------------------------


@pytest.mark.parametrize("serializer", ["msgpack", "json"])
def test_submit_one_job(
    make_client: Any, r: fakeredis.FakeRedis, serializer: str
) -> None:
    advertise(r)
    client = make_client(serializer=serializer)
    x = np.arange(64, dtype=np.float32)
    before = wire.now()
    handle = client.submit("digits", {"pixels": x}, version=2, deadline=30)

    assert r.llen(QUEUE) == 1
    [delivery] = queued(r)
    assert delivery.failed == []
    assert delivery.notify == client.client_id
    [job] = delivery.jobs
    assert (job.id, job.model, job.version) == (handle.id, "digits", 2)
    assert job.enqueued_at is not None and before <= job.enqueued_at <= wire.now()
    assert job.deadline is not None and 29 < job.deadline - before < 31
    arr = wire.decode_tensor(job.inputs["pixels"])
    assert arr.shape == (1, 64), "a single example gains the batch axis"
    np.testing.assert_array_equal(arr[0], x)
    envelope = json.loads(r.lindex(QUEUE, 0))
    assert envelope["content-type"] == wire.CONTENT_TYPES[serializer]
    assert envelope["properties"]["reply_to"] == client.client_id
    assert isinstance(handle, JobHandle) and handle.model == "digits"


@needs_lua
def test_submit_reloads_a_push_script_that_redis_forgot(
    client: InferenceClient, r: fakeredis.FakeRedis
) -> None:
    advertise(r)
    big = np.zeros((1, 64), np.float32)
    client.submit("digits", {"pixels": big})
    r.script_flush()  # as after a Redis restart: the script cache is empty
    handles = client.submit_many("digits", [{"pixels": big}] * 3)
    assert r.llen(QUEUE) == 2  # pushed once each: the retried transaction pushed nothing twice
    assert [j.id for d in queued(r)[1:] for j in d.jobs] == [h.id for h in handles]


def test_submit_keeps_an_existing_batch_axis(client: InferenceClient, r: Any) -> None:
    advertise(r)
    client.submit("digits", {"pixels": np.ones((5, 64), np.float32)})
    [delivery] = queued(r)
    assert wire.decode_tensor(delivery.jobs[0].inputs["pixels"]).shape == (5, 64)
    assert delivery.jobs[0].version is None
    assert delivery.jobs[0].deadline is None


def test_submit_many_chunks_messages_and_keeps_order(client: InferenceClient, r: Any) -> None:
    advertise(r)
    items = [{"pixels": np.full(64, i, np.float32)} for i in range(70)]
    handles = client.submit_many("digits", items, jobs_per_message=32, version=1)

    assert r.llen(QUEUE) == 3
    ids = [h.id for h in handles]
    assert len(ids) == 70 and len(set(ids)) == 70
    deliveries = queued(r)
    assert [len(d.jobs) for d in deliveries] == [32, 32, 6]
    jobs = [job for d in deliveries for job in d.jobs]
    assert [j.id for j in jobs] == ids
    assert all(d.failed == [] and d.notify == client.client_id for d in deliveries)
    # Alike jobs travel as columns: one array per input, a row of it per job.
    assert all(d.columns is not None and d.columns["pixels"].shape == (len(d.jobs), 1, 64)
               for d in deliveries)
    rows = [(d, job) for d in deliveries for job in d.jobs]
    for i, (delivery, job) in enumerate(rows):
        assert job.version == 1 and job.inputs is None
        assert delivery.columns is not None and job.column_row is not None
        arr = delivery.columns["pixels"][job.column_row]
        assert arr.shape == (1, 64) and float(arr[0, 0]) == i


def test_jobs_not_alike_travel_one_entry_each(client: InferenceClient, r: Any) -> None:
    advertise(r)
    items = [{"pixels": np.full((1 + i % 2, 64), i, np.float32)} for i in range(4)]
    handles = client.submit_many("digits", items)
    [delivery] = queued(r)
    assert delivery.columns is None
    for i, job in enumerate(delivery.jobs):
        assert job.id == handles[i].id
        arr = wire.decode_tensor(job.inputs["pixels"])
        assert arr.shape == (1 + i % 2, 64) and float(arr[0, 0]) == i


def test_large_tensors_of_a_bulk_submit_travel_inside_its_entries(
    make_client: Any, r: Any
) -> None:
    # One job alone puts a large tensor in a key of its own; a bulk message's entries are
    # one raw blob already, so its tensors stay in it: the worker reads them in one MGET.
    advertise(r)
    client = make_client(blob_threshold=1024)
    big = np.arange(64 * 64, dtype=np.float32).reshape(64, 64)
    alone = client.submit("digits", {"pixels": big})
    assert r.exists(wire.blob_key(alone.id, "pixels"))
    r.delete(QUEUE)
    before = set(r.scan_iter(wire.BLOB_KEY_PREFIX + "*"))
    handles = client.submit_many("digits", [{"pixels": big}, {"pixels": big + 1}])
    [delivery] = queued(r)
    [entries] = set(r.scan_iter(wire.BLOB_KEY_PREFIX + "*")) - before
    assert entries.decode() == delivery.entries_ref
    assert delivery.columns is not None and all(not j.refs for j in delivery.jobs)
    assert [j.id for j in delivery.jobs] == [h.id for h in handles]
    assert np.array_equal(delivery.columns["pixels"][1], big + 1)


def test_submit_many_with_nothing(client: InferenceClient, r: Any) -> None:
    assert client.submit_many("digits", []) == []
    assert r.llen(QUEUE) == 0


def test_unknown_model_is_refused_at_submit(client: InferenceClient, r: Any) -> None:
    advertise(r, "other")
    with pytest.raises(ModelNotFound, match=r"'digits' is not served; served: \['other'\]"):
        client.submit("digits", {"pixels": np.zeros(64, np.float32)})
    with pytest.raises(ModelNotFound):
        client.submit_many("digits", [{"pixels": np.zeros(64, np.float32)}])
    assert r.llen(QUEUE) == 0


def test_unknown_version_is_refused_at_submit(client: InferenceClient, r: Any) -> None:
    advertise(r)
    with pytest.raises(ModelNotFound, match=r"no version 9; versions: \[1, 2\]"):
        client.submit("digits", {"pixels": np.zeros(64, np.float32)}, version=9)
    assert r.llen(QUEUE) == 0
    client.submit("digits", {"pixels": np.zeros(64, np.float32)}, version=2)
    assert r.llen(QUEUE) == 1


def test_new_version_is_seen_after_a_refresh(client: InferenceClient, r: Any) -> None:
    advertise(r)
    client.submit("digits", {"pixels": np.zeros(64, np.float32)})  # caches versions [1, 2]
    advertise(r, versions=[1, 2, 3])
    client.models()  # an explicit refresh
    client.submit("digits", {"pixels": np.zeros(64, np.float32)}, version=3)
    assert r.llen(QUEUE) == 2


@pytest.mark.parametrize(
    ("inputs", "match"),
    [
        ({"pixels": np.zeros(64, np.float64)}, "expected float32, got float64"),
        ({"pixels": [[0.0] * 63]}, "dimension 1 must be 64, got 63"),
        ({"pixels": np.zeros((2, 63), np.float32)}, "dimension 1 must be 64, got 63"),
        ({"pixels": np.zeros((0, 64), np.float32)}, "empty batch"),
        ({"image": np.zeros(64, np.float32)}, r"missing \['pixels'\]"),
        ({}, "non-empty mapping"),
    ],
)
def test_invalid_input_is_refused_at_submit(
    client: InferenceClient, r: Any, inputs: dict[str, Any], match: str
) -> None:
    advertise(r)
    with pytest.raises(InvalidInput, match=match):
        client.submit("digits", inputs)
    assert r.llen(QUEUE) == 0


def test_input_kinds_checked_once_still_refuse_others(client: InferenceClient, r: Any
                                                      ) -> None:
    """The client remembers input kinds (names, dtypes, shapes) it checked: a kind that
    passed is not checked again, one that failed is refused every time."""
    advertise(r)
    good = {"pixels": np.zeros((2, 64), np.float32)}
    client.submit_many("digits", [good, good])
    [info] = client._catalog.live.values()
    assert len(info.checked) == 1
    for _ in range(2):
        with pytest.raises(InvalidInput, match="dimension 1 must be 64, got 63"):
            client.submit("digits", {"pixels": np.zeros((2, 63), np.float32)})
        with pytest.raises(InvalidInput, match="expected float32, got float64"):
            client.submit("digits", {"pixels": np.zeros((2, 64), np.float64)})
    assert len(info.checked) == 1
    client.submit("digits", good)
    assert r.llen(QUEUE) == 2


def test_unsupported_dtype_is_refused_even_without_signatures(make_client: Any) -> None:
    client = make_client(queue_without_workers=True)
    with pytest.raises(InvalidInput, match="not supported"):
        client.submit("digits", {"pixels": np.zeros(4, np.complex64)})
    with pytest.raises(InvalidInput, match="not supported"):
        client.submit("digits", {"pixels": ["a", "b"]})


def test_no_validation_without_signatures_when_queueing_for_workers(
    make_client: Any, r: Any
) -> None:
    client = make_client(queue_without_workers=True)
    handle = client.submit("digits", {"anything": np.zeros(3, np.float64)}, version=7)
    [delivery] = queued(r)
    [job] = delivery.jobs
    assert (job.id, job.version) == (handle.id, 7)
    arr = wire.decode_tensor(job.inputs["anything"])
    assert arr.shape == (3,) and arr.dtype == np.float64  # passed on exactly as given


def test_no_live_worker_fails_at_once(client: InferenceClient, r: Any) -> None:
    """Nothing advertised, or a model whose workers all stopped: refused before anything
    is enqueued, naming the model and what to do."""
    with pytest.raises(Unavailable, match=r"no live worker serves model 'digits'.*inferq worker"):
        client.submit("digits", {"pixels": np.zeros(64, np.float32)})
    advertise(r, live=False)  # registered by a worker that has since stopped
    with pytest.raises(Unavailable, match="INFERQ_QUEUE_WITHOUT_WORKERS"):
        client.submit("digits", {"pixels": np.zeros(64, np.float32)})
    assert client.models() == {}
    assert r.llen(QUEUE) == 0


def test_an_expired_heartbeat_is_not_a_live_worker(client: InferenceClient, r: Any) -> None:
    advertise(r)
    r.zadd(wire.live_key("digits"), {"cpu0@test": wire.now() - 1})  # its heartbeat expired
    with pytest.raises(Unavailable):
        client.submit("digits", {"pixels": np.zeros(64, np.float32)})
    r.zadd(wire.live_key("digits"), {"cpu1@test": wire.now() + 15})  # another one is live
    client.models()
    assert client.submit("digits", {"pixels": np.zeros(64, np.float32)}).id


def test_queueing_for_workers_that_scale_from_zero(
    make_client: Any, r: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("INFERQ_QUEUE_WITHOUT_WORKERS", "1")
    client = make_client()
    advertise(r, live=False)
    # Still checked against the signature the model registered...
    with pytest.raises(InvalidInput):
        client.submit("digits", {"pixels": np.zeros(8, np.float32)})
    # ... and queued for the workers to come.
    client.submit("digits", {"pixels": np.zeros(64, np.float32)})
    assert r.llen(QUEUE) == 1
    # A model no worker ever registered is still unknown.
    with pytest.raises(ModelNotFound, match="registered: \\['digits'\\]"):
        client.submit("digitz", {"pixels": np.zeros(64, np.float32)})


def test_validate_false_skips_signatures(make_client: Any, r: Any) -> None:
    advertise(r, "other")
    client = make_client(validate=False)
    client.submit("digits", {"pixels": np.zeros(64, np.float64)})
    assert r.llen(QUEUE) == 1


def test_bad_serializer() -> None:
    with pytest.raises(ValueError, match="serializer"):
        InferenceClient(serializer="pickle")


def test_urls_from_environment(make_client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERQ_BROKER_URL", "redis://broker:1/0")
    monkeypatch.delenv("INFERQ_RESULT_URL", raising=False)
    client = make_client()
    assert (client.broker_url, client.result_url) == ("redis://broker:1/0", "redis://broker:1/0")
    monkeypatch.setenv("INFERQ_RESULT_URL", "redis://results:2/0")
    client = make_client()
    assert client.result_url == "redis://results:2/0"


# --- models --------------------------------------------------------------------------------------


def test_models(client: InferenceClient, r: Any) -> None:
    advertise(r)
    advertise(r, "other", versions=[5], max_batch_rows=1)
    models = client.models()
    assert sorted(models) == ["digits", "other"]
    digits = models["digits"]
    assert digits.versions == [1, 2]
    assert [s.name for s in digits.inputs] == ["pixels"]
    assert digits.inputs[0].shape == (-1, 64)
    assert [s.name for s in digits.outputs] == ["label", "probabilities"]
    assert digits.max_batch_rows == 64
    assert models["other"].versions == [5]


def test_model_info_reads_what_workers_advertise() -> None:
    from workers.repository import load_manifest

    manifest = load_manifest(Path(__file__).resolve().parents[2] / "models" / "digits")
    info = ModelInfo("digits", json.loads(json.dumps(manifest.signature())))
    assert info.versions == sorted(manifest.versions)
    assert tuple(info.inputs) == manifest.inputs
    assert tuple(info.outputs) == manifest.outputs
    assert info.max_batch_rows == manifest.max_batch_rows


# --- reading results ------------------------------------------------------------------------------


def test_outcomes_and_results(client: InferenceClient, r: Any) -> None:
    r.set(wire.result_key("ok"), success("ok", [3, 1]))
    r.set(wire.result_key("bad"), wire.failure_document(
        "bad", InvalidInput("input 'pixels': expected float32, got float64")))

    ok, bad = client.outcomes(["ok", "bad"], timeout=1)
    assert isinstance(ok, JobResult)
    assert ok.id == "ok"
    assert isinstance(ok["label"], np.ndarray)
    assert ok["label"].tolist() == [3, 1]
    assert ok.outputs["probabilities"].shape == (2, 10)
    assert (ok.model, ok.version, ok.worker, ok.batch_size) == ("digits", 2, "cpu0@test", 7)
    assert ok.timings_ms == {"queued": 1.0, "batch_wait": None, "inference": 2.0, "total": 3.0}
    assert isinstance(bad, JobFailed)
    assert (bad.job_id, bad.code) == ("bad", "INVALID_ARGUMENT")
    assert bad.message == "input 'pixels': expected float32, got float64"

    [only] = client.results(["ok"], timeout=1)
    assert only.outputs["label"].tolist() == [3, 1]
    with pytest.raises(JobFailed, match="job bad failed: INVALID_ARGUMENT") as info:
        client.results(["ok", "bad"], timeout=1)
    assert info.value.code == "INVALID_ARGUMENT"
    assert JobHandle(client, "ok", "digits").result(timeout=1).id == "ok"


def test_outcomes_keep_the_callers_order_and_duplicates(client: InferenceClient, r: Any) -> None:
    for i in range(5):
        r.set(wire.result_key(f"j{i}"), success(f"j{i}", [i]))
    ids = ["j3", "j0", "j4", "j3", "j1", "j2"]
    got = client.results(ids, timeout=1)
    assert [res.id for res in got] == ids
    assert [int(res["label"][0]) for res in got] == [3, 0, 4, 3, 1, 2]


def test_plain_celery_failure_is_internal(client: InferenceClient, r: Any) -> None:
    doc = {"status": "FAILURE", "task_id": "x",
           "result": {"exc_type": "ZeroDivisionError", "exc_message": ["division by zero"]}}
    r.set(wire.result_key("x"), json.dumps(doc))
    [failed] = client.outcomes(["x"], timeout=1)
    assert isinstance(failed, JobFailed) and failed.code == InternalError.code
    assert "ZeroDivisionError" in failed.message


def accept(r: Any, *job_ids: str) -> None:
    """What a submit records for each job it enqueues."""
    for job_id in job_ids:
        r.set(wire.accepted_key(job_id), 1)


def test_timeout_when_nothing_arrives(client: InferenceClient, r: Any) -> None:
    r.set(wire.result_key("done"), success("done", [1]))
    accept(r, "never")
    started = time.monotonic()
    with pytest.raises(JobTimeout, match=r"1 of 2 jobs have no result after 0.2s"):
        client.outcomes(["done", "never"], timeout=0.2)
    assert 0.15 <= time.monotonic() - started < 2.0


def test_as_completed_yields_each_job_once(client: InferenceClient, r: Any) -> None:
    r.set(wire.result_key("a"), success("a", [1]))
    accept(r, "b")
    got: list[str] = []
    with pytest.raises(JobTimeout, match="1 of 2 jobs"):
        for job_id, outcome in client.as_completed(["a", "b", "a"], timeout=0.2):
            assert isinstance(outcome, JobResult) and outcome.id == job_id
            got.append(job_id)
    assert got == ["a"]


def test_result_written_while_waiting_is_picked_up(client: InferenceClient, r: Any) -> None:
    accept(r, "late")

    def worker() -> None:
        r.set(wire.result_key("late"), success("late", [9]))
        r.rpush(wire.NOTIFY_KEY_PREFIX + client.client_id, "late")

    timer = threading.Timer(0.05, worker)
    timer.start()
    try:
        started = time.monotonic()
        [result] = client.results(["late"], timeout=5)
        assert time.monotonic() - started < 2.0
        assert result["label"].tolist() == [9]
    finally:
        timer.cancel()
        timer.join(timeout=5)


def test_status(client: InferenceClient, r: Any) -> None:
    assert client.status("j") is JobStatus.UNKNOWN
    accept(r, "j")
    assert client.status("j") is JobStatus.PENDING
    assert JobHandle(client, "j", "digits").status() is JobStatus.PENDING
    r.set(wire.result_key("j"), success("j", [1]))
    assert client.status("j") is JobStatus.SUCCESS
    r.set(wire.result_key("f"), wire.failure_document("f", InvalidInput("no")))
    assert client.status("f") is JobStatus.FAILURE


def test_separate_result_redis(make_client: Any, r: Any) -> None:
    client = make_client(broker_url="redis://a:1/0", result_url="redis://b:2/0")
    assert client._results is not client._broker
    r.set(wire.result_key("j"), success("j", [1]))
    assert client.status("j") is JobStatus.SUCCESS


# --- Redis down ----------------------------------------------------------------------------------


def test_connection_errors_become_unavailable(
    client: InferenceClient, server: fakeredis.FakeServer
) -> None:
    server.connected = False
    x = {"pixels": np.zeros(64, np.float32)}
    calls: list[Any] = [
        lambda: client.submit("digits", x),
        lambda: client.submit_many("digits", [x, x]),
        lambda: client.status("j"),
        lambda: client.outcomes(["j"], timeout=0.1),
        client.models,
    ]
    for call in calls:
        with pytest.raises(Unavailable, match="Redis did not answer") as info:
            call()
        assert info.value.code == "UNAVAILABLE"
        assert isinstance(info.value.__cause__, redis.exceptions.ConnectionError)


def test_timeouts_become_unavailable(client: InferenceClient, monkeypatch: Any) -> None:
    def slow(*args: Any, **kwargs: Any) -> Any:
        raise redis.exceptions.TimeoutError("Timeout reading from socket")

    monkeypatch.setattr(client._results, "get", slow)
    with pytest.raises(Unavailable):
        client.status("j")


# --- the workers' result store -------------------------------------------------------------


def test_result_store_with_nothing_to_store(r: fakeredis.FakeRedis) -> None:
    from workers.serving.writer import ResultStore

    assert ResultStore(r, 60).store([]) == 0


@needs_lua
def test_result_store_first_write_wins(r: fakeredis.FakeRedis) -> None:
    from workers.serving.writer import ResultStore

    store = ResultStore(r, 60)
    first = success("a", [1])
    assert store.store([("a", first, None), ("b", success("b", [2]), None)]) == 2
    assert store.store([("a", success("a", [7]), None)]) == 0
    assert r.get(wire.result_key("a")) == first
    assert 0 < r.ttl(wire.result_key("a")) <= 60
    assert 0 < r.ttl(wire.result_key("b")) <= 60


@needs_lua
def test_result_store_notifies_each_client(r: fakeredis.FakeRedis) -> None:
    from workers.serving.writer import ResultStore

    store = ResultStore(r, 30)
    c1, c2 = wire.Notify("c1"), wire.Notify("c2")
    docs = [("a", success("a", [1]), c1), ("b", success("b", [2]), c2),
            ("c", success("c", [3]), c1), ("d", success("d", [4]), None)]
    assert store.store(docs) == 4
    assert r.lrange(wire.NOTIFY_KEY_PREFIX + "c1", 0, -1) == [b"a", b"c"]
    assert r.lrange(wire.NOTIFY_KEY_PREFIX + "c2", 0, -1) == [b"b"]
    assert 0 < r.ttl(wire.NOTIFY_KEY_PREFIX + "c1") <= 30


@needs_lua
def test_result_store_acks_in_the_same_script(r: fakeredis.FakeRedis) -> None:
    from producer.wire import UNACKED, UNACKED_INDEX
    from workers.serving.writer import ResultStore

    for tag in ("t1", "t2", "keep"):
        r.hset(UNACKED, tag, "[]")
        r.zadd(UNACKED_INDEX, {tag: 1.0})
    r.set("inferq:blob:a:x", b"1")
    r.set("inferq:blob:b:x", b"2")
    store = ResultStore(r, 60)
    assert store.store([("a", success("a", [1]), wire.Notify("c1"))], ["t1", "t2"],
                       ["inferq:blob:a:x", "inferq:blob:b:x"]) == 1
    assert r.get(wire.result_key("a")) is not None
    assert r.lrange(wire.NOTIFY_KEY_PREFIX + "c1", 0, -1) == [b"a"]
    assert r.hkeys(UNACKED) == [b"keep"] and r.zrange(UNACKED_INDEX, 0, -1) == [b"keep"]
    assert not r.exists("inferq:blob:a:x", "inferq:blob:b:x")
    # A message whose jobs were all stored earlier is acked on its own.
    assert store.store([], ["keep"]) == 0
    assert not r.exists(UNACKED, UNACKED_INDEX)


@needs_lua
def test_client_reads_what_the_result_store_wrote(
    client: InferenceClient, r: fakeredis.FakeRedis
) -> None:
    from workers.serving.writer import ResultStore

    ResultStore(r, 60).store([("j", success("j", [5]), wire.Notify(client.client_id))])
    [result] = client.results(["j"], timeout=1)
    assert result["label"].tolist() == [5]


@needs_lua
def test_a_lone_jobs_result_comes_in_its_notification(
    client: InferenceClient, r: fakeredis.FakeRedis
) -> None:
    """submit() asks for its result inline; the client takes it from the notification and
    reads no result key (one round trip fewer on a lone job's path)."""
    from workers.serving.writer import ResultStore

    advertise(r)
    handle = client.submit("digits", {"pixels": np.ones((1, 64), np.float32)})
    delivery = wire.parse_message(r.rpop(QUEUE), QUEUE)
    assert delivery.notify_to == wire.Notify(client.client_id, wire.NOTIFY_INLINE_MAX)
    ResultStore(r, 60).store([(handle.id, success(handle.id, [4]), delivery.notify_to)])
    [entry] = r.lrange(wire.notify_key(client.client_id), 0, -1)
    assert wire.notify_entry(entry) == (handle.id, r.get(wire.result_key(handle.id)))
    r.delete(wire.result_key(handle.id))  # the client must not need it
    assert handle.result(timeout=1)["label"].tolist() == [4]


@needs_lua
def test_inline_results_only_when_small_and_stored_here(r: fakeredis.FakeRedis) -> None:
    from workers.serving.writer import ResultStore

    r.set(wire.result_key("old"), success("old", [1]))  # stored before: not this document
    small, big = success("small", [3]), success("big", [i % 10 for i in range(40)])
    to = wire.Notify("c", len(small))
    assert len(big) > len(small)
    docs = [("old", success("old", [2]), to), ("small", small, to),
            ("big", big, to), ("plain", success("plain", [4]), wire.Notify("c"))]
    assert ResultStore(r, 60).store(docs) == 3
    entries = [wire.notify_entry(e) for e in r.lrange(wire.notify_key("c"), 0, -1)]
    assert entries == [("old", None), ("small", docs[1][1]), ("big", None), ("plain", None)]


@needs_lua
def test_a_list_nobody_pops_keeps_few_documents(r: fakeredis.FakeRedis) -> None:
    """A producer that never waits (it reads results by ID) is not sent a copy of every
    result: past NOTIFY_INLINE_ENTRIES entries in its list, notifications are bare IDs."""
    from workers.serving.writer import ResultStore

    key, room = wire.notify_key("c"), wire.NOTIFY_INLINE_ENTRIES
    r.rpush(key, *(f"old{i}" for i in range(room - 2)))
    to = wire.Notify("c", wire.NOTIFY_INLINE_MAX)
    docs = [(f"j{i}", success(f"j{i}", [i]), to) for i in range(5)]
    assert ResultStore(r, 60).store(docs) == 5
    entries = [wire.notify_entry(e) for e in r.lrange(key, room - 2, -1)]
    assert entries == [("j0", docs[0][1]), ("j1", docs[1][1]),
                       ("j2", None), ("j3", None), ("j4", None)]


def test_notify_docs_header_is_read_and_bounded() -> None:
    def parsed(value: Any) -> int:
        raw = wire.build_message(task=wire.TASK_NAME, task_id="j", args=["m", {}],
                                 kwargs={}, queue="inferq.m",
                                 headers={wire.HEADER_NOTIFY: "c",
                                          wire.HEADER_NOTIFY_DOCS: value})
        delivery = wire.parse_message(raw, "inferq.m")
        assert delivery.notify == "c"
        return delivery.notify_docs

    assert parsed(512) == 512
    assert parsed(10**9) == wire.NOTIFY_INLINE_LIMIT
    assert parsed(-5) == parsed("512") == parsed(True) == parsed(None) == 0


def test_nested_lists_take_the_model_dtype(client: InferenceClient, r: Any) -> None:
    advertise(r)
    client.submit("digits", {"pixels": [[1.0] * 64]})
    job = wire.parse_message(r.rpop(QUEUE), QUEUE).jobs[0]
    arr = wire.decode_tensor(job.inputs["pixels"])
    assert arr.dtype == np.float32 and arr.shape == (1, 64)


def test_blob_ttl_follows_the_visibility_timeout_workers_advertise(
    make_client: Any, r: Any
) -> None:
    """By-reference data must outlive a redelivery: the producer takes the serving workers'
    visibility timeout from their advertisement, never from its own environment."""
    client = make_client(blob_ttl=60)
    big = np.zeros((1, 64), np.float32)
    advertise(r, visibility_timeout=1000)
    client.models()
    client.submit("digits", {"pixels": big.repeat(100, axis=0)})
    (key,) = [k for k in r.keys(wire.BLOB_KEY_PREFIX + "*")]
    assert 3990 <= r.ttl(key) <= 4000  # 4 x the advertised 1000 s, above the caller's 60 s
    r.delete(key)
    advertise(r, visibility_timeout=5)
    client.models()
    client.submit("digits", {"pixels": big.repeat(100, axis=0)})
    (key,) = [k for k in r.keys(wire.BLOB_KEY_PREFIX + "*")]
    assert 55 <= r.ttl(key) <= 60  # the caller's own floor wins over 4 x 5 s


def test_blob_ttl_ignores_the_producers_environment(
    make_client: Any, r: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("INFERQ_VISIBILITY_TIMEOUT", "100000")
    client = make_client(blob_ttl=60)
    advertise(r)  # a worker that advertises no visibility timeout: the default applies
    client.models()
    client.submit("digits", {"pixels": np.zeros((100, 64), np.float32)})
    (key,) = [k for k in r.keys(wire.BLOB_KEY_PREFIX + "*")]
    assert r.ttl(key) <= 4 * wire.DEFAULT_VISIBILITY_TIMEOUT_S


def test_an_unknown_job_is_an_outcome_at_once(client: InferenceClient, r: Any) -> None:
    """An ID with no result and no acceptance record is answered, not waited on."""
    r.set(wire.result_key("done"), success("done", [1]))
    started = time.monotonic()
    done, unknown = client.outcomes(["done", "no-such-job"], timeout=30)
    assert time.monotonic() - started < 1
    assert isinstance(done, JobResult)
    assert isinstance(unknown, UnknownJob) and unknown.job_id == "no-such-job"
    assert isinstance(unknown, JobFailed) and unknown.code == "NOT_FOUND"
    with pytest.raises(UnknownJob, match="no such job"):
        client.results(["no-such-job"], timeout=30)


def test_submit_records_acceptance_until_the_result(client: InferenceClient, r: Any) -> None:
    from workers.serving.writer import ResultStore

    advertise(r)
    client.models()
    one = client.submit("digits", {"pixels": np.zeros(64, np.float32)}).id
    many = [h.id for h in client.submit_many("digits", [{"pixels": np.zeros(64, np.float32)}
                                                        for _ in range(40)])]
    assert all(client.status(i) is JobStatus.PENDING for i in [one, *many])
    assert 0 < r.ttl(wire.accepted_key(one)) <= client.blob_ttl
    if HAS_LUPA:
        ResultStore(r, 60).commit([(one, success(one, [1]), None)], [], [])
        assert not r.exists(wire.accepted_key(one)), "the result takes the marker's place"
        assert client.status(one) is JobStatus.SUCCESS


def test_a_refused_submit_records_no_acceptance(client: InferenceClient, r: Any) -> None:
    advertise(r, max_queue=1)
    client.models()
    client.submit("digits", {"pixels": np.zeros(64, np.float32)})
    with pytest.raises(ResourceExhausted):
        client.submit_many("digits", [{"pixels": np.zeros(64, np.float32)}] * 3)
    assert len(r.keys(wire.ACCEPTED_KEY_PREFIX + "*")) == 1


def test_priority_goes_to_kombus_priority_list(client: InferenceClient, r: Any) -> None:
    advertise(r, max_queue=3)
    client.models()
    low = client.submit("digits", {"pixels": np.zeros(64, np.float32)}, priority=9)
    client.submit_many("digits", [{"pixels": np.zeros(64, np.float32)}], priority=4)
    lowest = wire.priority_queue(QUEUE, 9)
    assert lowest == QUEUE + "\x06\x169"
    [raw] = r.lrange(lowest, 0, -1)
    envelope = json.loads(raw)
    assert envelope["headers"]["id"] == low.id and envelope["properties"]["priority"] == 9
    assert r.llen(wire.priority_queue(QUEUE, 4)) == 1 and r.llen(QUEUE) == 0
    client.submit("digits", {"pixels": np.zeros(64, np.float32)})
    # The bound counts every list of the queue: 3 waiting, the 4th is refused.
    with pytest.raises(ResourceExhausted):
        client.submit("digits", {"pixels": np.zeros(64, np.float32)}, priority=9)
    with pytest.raises(InvalidInput, match="priority"):
        client.submit("digits", {"pixels": np.zeros(64, np.float32)}, priority=10)
