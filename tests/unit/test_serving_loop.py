"""The serving loop end to end in one process: real producer messages on fakeredis (with
Lua), the real reader, intake, batching, poison guard, result store and writer, and a fake
model in place of ONNX Runtime. Every assertion reads the state left in Redis."""

from __future__ import annotations

import base64
import importlib.util
import json
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from types import SimpleNamespace
from typing import Any

import fakeredis
import numpy as np
import pytest
import redis

import producer.client
import workers.serving.writer as writer_module
from producer import wire
from producer.client import InferenceClient
from producer.errors import InternalError, InvalidInput, JobFailed, ModelNotFound, Poisoned
from producer.wire import DLQ_KEY, UNACKED, UNACKED_INDEX, JobResult, TensorSpec
from workers.serving.batching import BatchPolicy, drain_size
from workers.serving.events import TaskEvents
from workers.serving.loop import ModelServer
from workers.serving.observers import Batch, Observer, Observers, Outcome
from workers.serving.service import model_server
from workers.serving.writer import ResultStore, ResultWriter
from workers.settings import Settings

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("lupa") is None,
    reason="fakeredis runs Lua scripts only with the optional 'lupa' package (fakeredis[lua]); "
    "the reader's drain and the result store are Lua scripts",
)

MODEL = "adder"
QUEUE = wire.queue_name(MODEL)
INPUTS = (TensorSpec("x", "float32", (-1, 4)),)
BROKER_URL = "redis://broker:6379/0"
RESULTS_URL = "redis://results:6379/0"
#: An input value the fake model raises on (an ordinary exception: the job fails INTERNAL).
MARKER = -999.0
#: An input value the fake model "crashes the worker" on: nothing in the loop catches it.
CRASH = -777.0


class Crash(BaseException):
    """Stands for a worker process dying in the middle of a batch."""


class FakeModel:
    """What the loop uses of a LoadedModel: ``run`` and ``provider``; ``y = x.sum(1)``."""

    provider = "FakeExecutionProvider"

    def __init__(self, version: int, calls: list[tuple[int, np.ndarray[Any, Any]]]) -> None:
        self.version = version
        self.calls = calls

    def run(self, feeds: dict[str, np.ndarray[Any, Any]]) -> dict[str, np.ndarray[Any, Any]]:
        x = feeds["x"]
        self.calls.append((self.version, x.copy()))
        if (x == CRASH).any():
            raise Crash
        if (x == MARKER).any():
            raise ValueError("marker value in the batch")
        return {"y": x.sum(axis=1, keepdims=True)}


def rows_of(n: int, seed: float) -> np.ndarray[Any, Any]:
    """``n`` rows of distinct float32 values, different for every ``seed``."""
    return (np.arange(n * 4, dtype=np.float32).reshape(n, 4) + np.float32(seed * 100))


class World:
    """Broker and results Redis (one server, or two), producer clients and model servers."""

    def __init__(self, separate: bool, monkeypatch: pytest.MonkeyPatch) -> None:
        self.separate = separate
        self.broker_server = fakeredis.FakeServer()
        self.results_server = fakeredis.FakeServer() if separate else self.broker_server
        self.broker = fakeredis.FakeRedis(server=self.broker_server)
        self.results = (fakeredis.FakeRedis(server=self.results_server) if separate
                        else self.broker)
        #: Every model call: (version, the batch's x).
        self.calls: list[tuple[int, np.ndarray[Any, Any]]] = []
        self.servers: list[ModelServer] = []
        self.clients: list[InferenceClient] = []

        def fake_redis(url: str, timeout: float) -> fakeredis.FakeRedis:
            server = self.results_server if url == RESULTS_URL else self.broker_server
            return fakeredis.FakeRedis(server=server)

        monkeypatch.setattr(producer.client, "_redis", fake_redis)

    # --- building ----------------------------------------------------------------------

    def client(self, **kwargs: Any) -> InferenceClient:
        # No worker heartbeat here: the loop under test is driven by hand.
        kwargs.setdefault("queue_without_workers", True)
        client = InferenceClient(BROKER_URL, RESULTS_URL if self.separate else BROKER_URL,
                                 **kwargs)
        self.clients.append(client)
        return client

    def server(self, *, max_rows: int = 8, max_wait_s: float = 60.0, max_executions: int = 3,
               observer: Observer | None = None, versions: Sequence[int] = (1,),
               store: ResultStore | None = None, reject_nonfinite: bool = False
               ) -> ModelServer:
        """A ModelServer wired as workers/serving/service.py wires it."""
        settings = Settings(max_executions=max_executions, max_tensor_bytes=1 << 20,
                            reject_nonfinite=reject_nonfinite, result_ttl_s=600)
        server = model_server(
            MODEL, {v: FakeModel(v, self.calls) for v in versions},  # type: ignore[misc]
            INPUTS, broker=self.broker, results=self.results, same_server=not self.separate,
            observer=observer or Observer(), policy=BatchPolicy(max_rows, max_wait_s),
            settings=settings, worker="cpu0@test", store=store)
        self.servers.append(server)
        return server

    def store(self) -> ResultStore:
        return ResultStore(self.results, 600, self.broker if self.separate else None)

    # --- reading Redis -----------------------------------------------------------------

    @property
    def batch_rows(self) -> list[int]:
        return [len(x) for _, x in self.calls]

    def result(self, job_id: str) -> JobResult | JobFailed | None:
        raw = self.results.get(wire.result_key(job_id))
        return None if raw is None else wire.read_result(job_id, raw)

    def ok(self, job_id: str) -> JobResult:
        got = self.result(job_id)
        assert isinstance(got, JobResult), f"job {job_id}: {got!r}"
        return got

    def unacked(self) -> set[str]:
        """Tags in kombu's in-flight records; the hash and the index must agree."""
        tags = {t.decode() for t in self.broker.hkeys(UNACKED)}
        assert tags == {t.decode() for t in self.broker.zrange(UNACKED_INDEX, 0, -1)}
        return tags

    def queued(self) -> int:
        return sum(int(self.broker.llen(q)) for q in wire.priority_queues(QUEUE))

    def dead_letters(self, client: Any = None) -> list[dict[str, Any]]:
        return [json.loads(e) for e in (client or self.broker).lrange(DLQ_KEY, 0, -1)]

    # --- running -----------------------------------------------------------------------

    def run(self, server: ModelServer, max_cycles: int = 200) -> None:
        """Cycle until the queue and the waiting jobs are empty, then let the writer finish."""
        for _ in range(max_cycles):
            server.cycle(block_s=0.01)
            if not self.queued() and not server._waiting:
                break
        else:
            pytest.fail("the loop did not empty the queue")
        settle(server.writer)

    def close(self) -> None:
        for server in self.servers:
            server.writer.close()
        for client in self.clients:
            client.close()


def settle(writer: ResultWriter, timeout: float = 5.0) -> None:
    """Wait until the writer thread has written everything handed to it."""
    deadline = time.monotonic() + timeout
    while writer._submitted != writer._finished:
        assert time.monotonic() < deadline, "the result writer did not finish"
        time.sleep(0.001)
    assert writer.error is None


def redeliver(raw: bytes, where: str = "headers") -> bytes:
    """``raw`` as it comes back after a crash, marked redelivered in ``where``."""
    envelope = json.loads(raw)
    envelope[where]["redelivered"] = True
    return json.dumps(envelope).encode()


def restore_unacked(broker: Any) -> int:
    """What kombu's visibility sweep does to messages whose worker died: put each back at
    the front of its queue, marked redelivered, and forget it as in flight."""
    restored = 0
    for tag, record in broker.hgetall(UNACKED).items():
        message, _exchange, queue = json.loads(record)
        message["headers"]["redelivered"] = True
        message["properties"]["delivery_info"]["redelivered"] = True
        broker.rpush(queue, json.dumps(message))
        broker.hdel(UNACKED, tag)
        broker.zrem(UNACKED_INDEX, tag)
        restored += 1
    return restored


@pytest.fixture(autouse=True)
def no_sigterm(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """The writer SIGTERMs its own process on a write it cannot retry: record it instead."""
    killed: list[int] = []
    monkeypatch.setattr(writer_module, "os", SimpleNamespace(
        getpid=lambda: 0, kill=lambda pid, sig: killed.append(sig)))
    yield killed
    assert killed == [], "the result writer failed and would have stopped the worker"


@pytest.fixture(params=["one-redis", "separate-results"])
def any_world(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
              ) -> Iterator[World]:
    world = World(request.param == "separate-results", monkeypatch)
    yield world
    world.close()


@pytest.fixture
def world(monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    world = World(False, monkeypatch)
    yield world
    world.close()


@pytest.fixture
def split_world(monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    world = World(True, monkeypatch)
    yield world
    world.close()


# --- hoarding and batch size --------------------------------------------------------------


def test_a_cycle_drains_only_what_its_batch_needs(world: World) -> None:
    client = world.client()
    ids = [client.submit(MODEL, {"x": rows_of(1, i)}).id for i in range(100)]
    server = world.server(max_rows=8)

    # The first look, with no estimate of message size yet, takes what 8 rows at the
    # assumed 8 rows per message need: one message.
    assert server.reader.wait(0.01)
    expected = drain_size(8, server.intake.rows_per_message)
    assert server._fill() is False
    assert len(world.unacked()) == expected == 1
    assert world.queued() == 99

    # The rest of the cycle tops the batch up to exactly 8 rows; with more in the queue, the
    # next batch's messages are taken while it runs (the look ahead), and no more.
    assert server.cycle(block_s=0.01) == 8
    settle(server.writer)
    assert world.batch_rows == [8]
    ahead = len(server._waiting)
    assert 0 < ahead <= 8
    assert world.queued() == 92 - ahead
    assert len(world.unacked()) == ahead, "every message of the batch that ran is acked"
    assert sum(world.result(i) is not None for i in ids) == 8

    # Every later cycle runs a batch and holds at most the next one.
    while world.queued() or server._waiting:
        server.cycle(block_s=0.01)
        settle(server.writer)
        assert len(world.unacked()) == len(server._waiting) <= 8, "at most a batch ahead"
    assert max(world.batch_rows) <= 8
    assert sum(world.batch_rows) == 100
    assert all(isinstance(world.result(i), JobResult) for i in ids)


def test_bigger_messages_than_estimated_are_not_drained_past_a_full_batch(world: World
                                                                        ) -> None:
    client = world.client()
    ids = [client.submit(MODEL, {"x": rows_of(4, i)}).id for i in range(10)]
    server = world.server(max_rows=8)
    server.intake.rows_per_message = 1.0  # learnt from earlier one-row messages

    # The estimate says 8 messages fill the batch: they are taken, two of them run.
    assert server.cycle(block_s=0.01) == 2
    settle(server.writer)
    assert world.batch_rows == [8]
    assert world.queued() == 2
    assert len(world.unacked()) == 6 == len(server._waiting)
    # With more than the batch about to run already waiting, the next cycles take nothing
    # more from Redis; once only that batch is left, the next one is taken while it runs.
    for batches, queued, held in ((2, 2, 4), (3, 2, 2), (4, 0, 2)):
        server.cycle(block_s=0.01)
        settle(server.writer)
        assert world.queued() == queued
        assert world.batch_rows == [8] * batches
        assert len(world.unacked()) == held
    world.run(server)
    assert world.batch_rows == [8] * 5
    assert all(world.ok(i).batch_size == 8 for i in ids)
    assert world.unacked() == set()


def test_multi_row_jobs_never_overfill_a_batch(world: World) -> None:
    client = world.client()
    sizes = [3, 3, 3, 5, 2, 9, 1, 4, 4, 7, 1]
    ids = [client.submit(MODEL, {"x": rows_of(n, i)}).id for i, n in enumerate(sizes)]
    world.run(world.server(max_rows=8))

    # A 9-row job is larger than a batch: it runs as batches of 8 and 1, its outputs joined
    # in order (checked below); no batch is ever over the limit.
    assert all(rows <= 8 for rows in world.batch_rows)
    assert world.ok(ids[sizes.index(9)]).batch_size == 8
    assert sum(world.batch_rows) == sum(sizes)
    for i, (job_id, n) in enumerate(zip(ids, sizes, strict=True)):
        np.testing.assert_array_equal(world.ok(job_id)["y"],
                                      rows_of(n, i).sum(axis=1, keepdims=True))
    assert world.unacked() == set()


def test_a_backlog_is_served_oldest_first(world: World) -> None:
    client = world.client()
    ids = [client.submit(MODEL, {"x": rows_of(1, i)}).id for i in range(20)]
    server = world.server(max_rows=4)
    server.intake.rows_per_message = 1.0  # a warm estimate: drain a full batch at once
    server.cycle(block_s=0.01)
    settle(server.writer)
    assert [i for i in ids if world.result(i) is not None] == ids[:4]


def test_a_message_on_a_priority_sub_queue_is_served(world: World) -> None:
    client = world.client()
    client.submit(MODEL, {"x": rows_of(1, 1)})
    message = world.broker.rpop(QUEUE)
    job_id = wire.parse_message(message, QUEUE).jobs[0].id
    world.broker.lpush(wire.priority_queues(QUEUE)[1], message)
    server = world.server()
    for _ in range(3):
        server.cycle(block_s=0.01)
    settle(server.writer)
    assert isinstance(world.result(job_id), JobResult)


# --- batching -------------------------------------------------------------------------------


def test_jobs_of_several_messages_share_one_model_call(any_world: World) -> None:
    world = any_world
    client = world.client()
    inputs = [rows_of(1, 0), rows_of(2, 1), rows_of(3, 2)]
    ids = [client.submit(MODEL, {"x": x}).id for x in inputs]
    bulk = [rows_of(1, 3), rows_of(1, 4)]
    ids += [h.id for h in client.submit_many(MODEL, [{"x": x} for x in bulk])]
    inputs += bulk
    world.run(world.server(max_rows=8))

    assert world.batch_rows == [8], "four messages, five jobs, one model call"
    # Every job's rows, each job's rows together (in which order the jobs come is the
    # concern of test_a_backlog_is_served_oldest_first).
    assert sorted(map(tuple, world.calls[0][1])) == sorted(map(tuple, np.concatenate(inputs)))
    for job_id, x in zip(ids, inputs, strict=True):
        result = world.ok(job_id)
        np.testing.assert_array_equal(result["y"], x.sum(axis=1, keepdims=True))
        assert (result.batch_size, result.model, result.version, result.worker) == (
            8, MODEL, 1, "cpu0@test")
    assert world.unacked() == set()
    assert not world.broker.keys(wire.BLOB_KEY_PREFIX + "*"), "bulk entries deleted"
    # The producer hears of every job through its notify list and reads the same results.
    assert [r.id for r in client.results(ids, timeout=1)] == ids


def test_versions_never_share_a_batch(world: World) -> None:
    client = world.client()
    pins = [1, 2, 1, None, 2, 1]  # None: the latest, 2
    ids = [client.submit(MODEL, {"x": rows_of(1, i)}, version=v).id
           for i, v in enumerate(pins)]
    world.run(world.server(max_rows=8, versions=(1, 2)))

    assert sorted((v, len(x)) for v, x in world.calls) == [(1, 3), (2, 3)]
    for job_id, pin in zip(ids, pins, strict=True):
        assert world.ok(job_id).version == (pin or 2)


# --- failures stay with their job -------------------------------------------------------


def test_a_job_the_model_fails_on_fails_alone(any_world: World) -> None:
    world = any_world
    client = world.client()
    inputs = [rows_of(1, 0), rows_of(2, 1), np.full((1, 4), MARKER, np.float32),
              rows_of(1, 3)]
    ids = [client.submit(MODEL, {"x": x}).id for x in inputs]
    world.run(world.server(max_rows=8))

    # One batch of all, then each job alone to find the one the model rejects.
    assert world.batch_rows[0] == 5 and sorted(world.batch_rows[1:]) == [1, 1, 1, 2]
    assert [len(x) for _, x in world.calls if (x == MARKER).any()] == [5, 1]
    failed = world.result(ids[2])
    assert isinstance(failed, InternalError) and isinstance(failed, JobFailed)
    assert (failed.code, failed.job_id, failed.model) == ("INTERNAL", ids[2], MODEL)
    assert "marker value" in failed.message
    for job_id, x in zip(ids, inputs, strict=True):
        if job_id != ids[2]:
            np.testing.assert_array_equal(world.ok(job_id)["y"], x.sum(axis=1, keepdims=True))
    assert world.unacked() == set()


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (np.zeros((1, 4), np.float64), "expected float32, got float64"),
        (np.zeros((1, 3), np.float32), "dimension 1 must be 4, got 3"),
        (np.zeros(4, np.float32), "expected rank 2"),
    ],
)
def test_a_job_with_bad_input_fails_alone(world: World, bad: np.ndarray[Any, Any],
                                          match: str) -> None:
    client = world.client()
    good = [rows_of(1, 0), rows_of(2, 1)]
    ids = [client.submit(MODEL, {"x": good[0]}).id, client.submit(MODEL, {"x": bad}).id,
           client.submit(MODEL, {"x": good[1]}).id]
    world.run(world.server(max_rows=8))

    failed = world.result(ids[1])
    assert isinstance(failed, InvalidInput)
    assert failed.code == "INVALID_ARGUMENT" and match in failed.message
    assert world.batch_rows == [3], "the bad job never reached the model"
    assert world.ok(ids[0]).batch_size == world.ok(ids[2]).batch_size == 3
    assert world.unacked() == set()


def test_early_failures_of_one_bulk_message(world: World) -> None:
    client = world.client()
    handles = client.submit_many(MODEL, [{"x": rows_of(1, 0)}, {"x": rows_of(1, 1)}])
    late = client.submit(MODEL, {"x": rows_of(1, 2)}, deadline=-1.0).id
    pinned = client.submit(MODEL, {"x": rows_of(1, 3)}, version=7).id
    world.run(world.server())

    assert world.result(late).code == "DEADLINE_EXCEEDED"  # type: ignore[union-attr]
    assert isinstance(world.result(pinned), ModelNotFound)
    assert [world.ok(h.id).batch_size for h in handles] == [2, 2]
    assert world.batch_rows == [2]


def test_a_bad_job_of_a_message_sent_as_columns_fails_alone(world: World) -> None:
    client = world.client()
    bad = rows_of(1, 2)
    bad[0, 0] = np.nan
    handles = client.submit_many(MODEL, [{"x": rows_of(1, 0)}, {"x": rows_of(1, 1)},
                                         {"x": bad}, {"x": rows_of(1, 3)}])
    assert wire.parse_message(world.broker.lindex(QUEUE, 0), QUEUE).entries_ref is not None
    world.run(world.server(reject_nonfinite=True))

    failed = world.result(handles[2].id)
    assert isinstance(failed, InvalidInput) and "NaN or Inf" in failed.message
    assert [world.ok(h.id).batch_size for h in (handles[0], handles[1], handles[3])] == [3] * 3
    assert world.batch_rows == [3]
    assert world.unacked() == set()


def test_an_unreadable_message_is_dead_lettered(any_world: World) -> None:
    world = any_world
    client = world.client()
    ok = client.submit(MODEL, {"x": rows_of(1, 0)}).id
    garbage = b"\x00not json at all"
    world.broker.lpush(QUEUE, garbage)
    no_id = json.dumps({"headers": {"task": wire.TASK_NAME}, "properties": {}}).encode()
    world.broker.lpush(QUEUE, no_id)
    after = client.submit(MODEL, {"x": rows_of(1, 1)}).id
    world.run(world.server())

    entries = world.dead_letters()
    assert [e["kind"] for e in entries] == ["message", "message"]
    assert {e["code"] for e in entries} == {"INVALID_ARGUMENT"}
    assert {base64.b64decode(e["message_b64"]) for e in entries} == {garbage, no_id}
    assert "not a JSON envelope" in " ".join(e["reason"] for e in entries)
    assert world.unacked() == set(), "dead-lettered messages are no longer in flight"
    assert world.ok(ok).batch_size == world.ok(after).batch_size == 2


# --- redelivery -------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["headers", "properties"])
def test_a_redelivered_job_with_a_result_is_not_run_again(world: World, where: str) -> None:
    client = world.client()
    job_id = client.submit(MODEL, {"x": rows_of(1, 0)}).id
    raw = world.broker.lindex(QUEUE, 0)
    server = world.server()
    world.run(server)
    stored = world.results.get(wire.result_key(job_id))
    assert world.batch_rows == [1]

    world.broker.rpush(QUEUE, redeliver(raw, where))
    world.run(server)

    assert world.batch_rows == [1], "the model did not run the job again"
    assert world.results.get(wire.result_key(job_id)) == stored
    assert world.unacked() == set() and world.queued() == 0, "the redelivery was acked"


def test_a_redelivered_bulk_message_runs_only_its_unfinished_jobs_alone(world: World) -> None:
    client = world.client()
    handles = client.submit_many(MODEL, [{"x": rows_of(1, i)} for i in range(3)])
    raw = world.broker.rpop(QUEUE)
    entries = wire.parse_message(raw, QUEUE).entries_ref
    assert entries is not None and world.broker.exists(entries)
    # The first job finished before the crash; the other two did not.
    first = wire.failure_document(handles[0].id, InvalidInput("stored before the crash"))
    world.results.set(wire.result_key(handles[0].id), first)
    world.broker.rpush(QUEUE, redeliver(raw))
    world.run(world.server(max_rows=8))

    assert world.batch_rows == [1, 1], "suspects run alone, the finished job not at all"
    assert world.results.get(wire.result_key(handles[0].id)) == first
    assert [world.ok(h.id).batch_size for h in handles[1:]] == [1, 1]
    assert world.unacked() == set()
    assert not world.broker.exists(entries), "the entries go with the ack"


def test_a_poisoned_job_is_dead_lettered_without_running(any_world: World) -> None:
    world = any_world
    client = world.client()
    bystander = client.submit(MODEL, {"x": rows_of(1, 0)}).id
    job_id = client.submit(MODEL, {"x": rows_of(1, 1)}).id
    raw = world.broker.lpop(QUEUE)
    world.broker.lpush(QUEUE, redeliver(raw))
    # Started once in a batch and twice more alone, each time killing its worker.
    world.broker.set(wire.attempts_key(job_id), 2)
    world.run(world.server(max_executions=3))

    poisoned = world.result(job_id)
    assert isinstance(poisoned, Poisoned) and poisoned.code == "POISONED"
    assert "started 3 times" in poisoned.message
    assert world.batch_rows == [1], "only the bystander ran"
    assert world.ok(bystander).batch_size == 1
    [entry] = world.dead_letters(world.broker)
    assert (entry["kind"], entry["id"], entry["code"]) == ("job", job_id, "POISONED")
    assert world.unacked() == set()


def test_a_job_that_keeps_crashing_its_worker_ends_poisoned(world: World) -> None:
    client = world.client()
    job_id = client.submit(MODEL, {"x": np.full((1, 4), CRASH, np.float32)}).id
    for attempt in range(3):
        server = world.server(max_executions=3)  # a fresh worker process each time
        with pytest.raises(Crash):
            world.run(server)
        assert len(world.calls) == attempt + 1, "one model call per start, then a crash"
        assert world.result(job_id) is None
        assert len(world.unacked()) == 1, "a crash leaves the message in flight"
        assert restore_unacked(world.broker) == 1
        assert world.broker.get(wire.attempts_key(job_id)) == (
            None if attempt == 0 else str(attempt).encode())

    server = world.server(max_executions=3)
    world.run(server)
    assert len(world.calls) == 3, "the fourth start never reached the model"
    assert isinstance(world.result(job_id), Poisoned)
    [entry] = world.dead_letters()
    assert entry["id"] == job_id
    # The entry carries a message that re-enqueues the job unchanged.
    message = wire.parse_message(base64.b64decode(entry["message_b64"]), QUEUE)
    [job] = message.jobs
    assert job.id == job_id
    np.testing.assert_array_equal(wire.decode_tensor(job.inputs["x"]),
                                  np.full((1, 4), CRASH, np.float32))
    assert world.unacked() == set() and world.queued() == 0


def test_poisoned_jobs_land_in_the_brokers_dead_letter_list(split_world: World) -> None:
    world = split_world
    job_id = world.client().submit(MODEL, {"x": rows_of(1, 1)}).id
    world.broker.rpush(QUEUE, redeliver(world.broker.rpop(QUEUE)))
    world.broker.set(wire.attempts_key(job_id), 5)
    world.run(world.server(max_executions=3))
    assert isinstance(world.result(job_id), Poisoned)
    assert [e["id"] for e in world.dead_letters(world.broker)] == [job_id]


# --- acks only after the results are stored ------------------------------------------------


def test_messages_are_acked_only_once_their_results_are_stored(world: World) -> None:
    """One Redis: results, acks and blob deletes in one script, retried on a failure."""
    client = world.client()
    big = rows_of(1024, 0)  # 16 KiB of float32: sent by reference
    big_id = client.submit(MODEL, {"x": big}).id
    bulk = [h.id for h in client.submit_many(MODEL, [{"x": rows_of(1, 1)},
                                                     {"x": rows_of(1, 2)}])]
    blobs = {k.decode() for k in world.broker.keys(wire.BLOB_KEY_PREFIX + "*")}
    assert wire.blob_key(big_id, "x") in blobs and len(blobs) == 2

    store = world.store()
    script = store._store
    entered, release = threading.Event(), threading.Event()
    seen: list[dict[str, Any]] = []

    def flaky(**kwargs: Any) -> Any:
        if not seen:
            entered.set()
            assert release.wait(5)
            seen.append(snapshot(world, [big_id, *bulk], blobs))
            raise redis.exceptions.ConnectionError("Redis went away")
        return script(**kwargs)

    store._store = flaky  # type: ignore[method-assign]
    server = world.server(max_rows=2048, store=store)
    assert server.reader.wait(0.01)
    assert server._fill() is True, "both messages in one drain"
    assert server._run_batch() == 3
    server._hand_off()  # to the writer thread
    try:
        assert entered.wait(5)
        # The write is under way and has not succeeded: everything is still in flight.
        state = snapshot(world, [big_id, *bulk], blobs)
        assert state == {"results": 0, "unacked": 2, "blobs": 2}
    finally:
        release.set()
    settle(server.writer)
    assert seen == [{"results": 0, "unacked": 2, "blobs": 2}], "the failed write left all"
    assert snapshot(world, [big_id, *bulk], blobs) == {"results": 3, "unacked": 0, "blobs": 0}
    np.testing.assert_array_equal(world.ok(big_id)["y"], big.sum(axis=1, keepdims=True))


def test_with_a_separate_broker_acks_follow_the_stored_results(split_world: World) -> None:
    world = split_world
    client = world.client()
    ids = [client.submit(MODEL, {"x": rows_of(1024, 0)}).id,
           client.submit(MODEL, {"x": rows_of(1, 1)}).id]
    blobs = {k.decode() for k in world.broker.keys(wire.BLOB_KEY_PREFIX + "*")}
    assert len(blobs) == 1

    store = world.store()
    ack = store.ack
    seen: list[dict[str, Any]] = []

    def flaky(tags: Sequence[str], blob_keys: Sequence[str] = ()) -> None:
        if not seen:
            seen.append(snapshot(world, ids, blobs))
            raise redis.exceptions.ConnectionError("broker went away")
        ack(tags, blob_keys)

    store.ack = flaky  # type: ignore[method-assign]
    world.run(world.server(max_rows=2048, store=store))

    # Results were stored before the ack was tried; the failed ack left the message and
    # its blob in place, and the retry (storing nothing twice) acked both together.
    assert seen == [{"results": 2, "unacked": 2, "blobs": 1}]
    assert snapshot(world, ids, blobs) == {"results": 2, "unacked": 0, "blobs": 0}
    assert not world.broker.exists(*[wire.result_key(i) for i in ids]), "results live apart"


def snapshot(world: World, ids: Sequence[str], blobs: set[str]) -> dict[str, Any]:
    return {
        "results": sum(bool(world.results.exists(wire.result_key(i))) for i in ids),
        "unacked": len(world.unacked()),
        "blobs": sum(bool(world.broker.exists(b)) for b in blobs),
    }


# --- observers ---------------------------------------------------------------------------------


class Recorder(Observer):
    """Records every hook; its hand-off work checks Redis when it runs."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.calls: list[tuple[str, Any]] = []
        self._done: list[str] = []
        #: What each hand-off found in Redis: (its job ids, how many have results).
        self.after_store: list[tuple[list[str], int]] = []

    def received(self, job_ids: Sequence[str], redelivered: bool) -> None:
        self.calls.append(("received", (list(job_ids), redelivered)))

    def batch_started(self, batch: Batch) -> None:
        self.calls.append(("batch_started", [p.job.id for p in batch.jobs]))

    def batch_done(self, batch: Batch, outcomes: Sequence[Outcome]) -> None:
        assert batch.started <= batch.finished
        self.calls.append(("batch_done", [
            (p.job.id, o.code if isinstance(o, JobFailed) else "ok")
            for p, o in zip(batch.jobs, outcomes, strict=True)]))
        self._done += [p.job.id for p, o in zip(batch.jobs, outcomes, strict=True)
                       if not isinstance(o, JobFailed)]

    def job_failed(self, job_id: str, error: JobFailed, version: int | None) -> None:
        self.calls.append(("job_failed", (job_id, error.code, version)))
        self._done.append(job_id)

    def handoff(self) -> Callable[[], None] | None:
        if not self._done:
            return None
        done, self._done = self._done, []

        def after() -> None:
            world = self.world
            stored = sum(bool(world.results.exists(wire.result_key(i))) for i in done)
            self.after_store.append((done, stored))

        return after


def test_observers_see_each_step_and_hand_off_after_the_store(world: World) -> None:
    client = world.client()
    recorder = Recorder(world)
    sent: list[tuple[str, dict[str, Any]]] = []
    events = TaskEvents(MODEL, sent.extend)
    a = client.submit(MODEL, {"x": rows_of(1, 0)}).id
    bad = client.submit(MODEL, {"x": np.zeros((1, 4), np.float64)}).id
    marked = client.submit(MODEL, {"x": np.full((1, 4), MARKER, np.float32)}).id
    b, c = (h.id for h in client.submit_many(MODEL, [{"x": rows_of(2, 1)},
                                                     {"x": rows_of(1, 2)}]))
    world.run(world.server(max_rows=8, observer=Observers([recorder, events])))

    calls = recorder.calls
    names = [name for name, _ in calls]
    # Each message once, before anything else is heard of its jobs (drain order aside).
    received = [args for name, args in calls if name == "received"]
    assert sorted(received) == sorted([([a], False), ([bad], False), ([marked], False),
                                       ([b, c], False)])
    assert names.index("received") == 0
    # Bad inputs fail after the version resolved: the failure carries it.
    assert calls.index(("job_failed", (bad, "INVALID_ARGUMENT", 1))) > calls.index(
        ("received", ([bad], False)))
    # One batch of every runnable job, the failure inside it reported between its start
    # and its end, with the version that ran it; outcomes line up with the batch's jobs.
    assert names.count("batch_started") == names.count("batch_done") == 1
    [started] = [args for name, args in calls if name == "batch_started"]
    [done] = [args for name, args in calls if name == "batch_done"]
    assert sorted(started) == sorted([a, marked, b, c])
    assert [job for job, _ in done] == started
    assert dict(done) == {a: "ok", marked: "INTERNAL", b: "ok", c: "ok"}
    assert started.index(b) + 1 == started.index(c), "a message's jobs stay together"
    assert (names.index("batch_started")
            < calls.index(("job_failed", (marked, "INTERNAL", 1)))
            < names.index("batch_done"))
    assert max(i for i, n in enumerate(names) if n == "received") < names.index(
        "batch_started")
    assert names.count("job_failed") == 2
    # Hand-off work ran once the results of its jobs were stored, for every job once.
    assert recorder.after_store
    assert all(stored == len(done) for done, stored in recorder.after_store)
    assert sorted(j for done, _ in recorder.after_store for j in done) == sorted(
        [a, bad, marked, b, c])
    assert world.unacked() == set()
    # Flower's events went out the same way, one task per job.
    kinds: dict[str, list[str]] = {}
    for kind, fields in sent:
        kinds.setdefault(fields["uuid"], []).append(kind)
    for job_id in (a, b, c):
        assert kinds[job_id] == ["task-received", "task-started", "task-succeeded"]
    assert kinds[marked] == ["task-received", "task-started", "task-failed"]
    assert kinds[bad] == ["task-received", "task-failed"]



def test_a_lone_batch_is_stored_before_its_observers_hear_of_it(world: World) -> None:
    """Nothing else waiting: the results are written first, then the observers run (the
    batch's log line and metrics cost its caller nothing), and what they hand off (Flower's
    events) still follows the store."""
    client = world.client()
    seen: list[int] = []

    class Looking(Recorder):
        def batch_done(self, batch: Batch, outcomes: Sequence[Outcome]) -> None:
            seen.append(sum(bool(world.results.exists(wire.result_key(p.job.id)))
                            for p in batch.jobs))
            super().batch_done(batch, outcomes)

    recorder = Looking(world)
    server = world.server(observer=recorder)
    job = client.submit(MODEL, {"x": rows_of(1, 0)}).id
    server.cycle(block_s=0.01)
    assert seen == [1], "stored before the observers ran"
    assert recorder.after_store == [([job], 1)]
    # Jobs still waiting behind a batch: the observers hear of it first, as before.
    ids = [h.id for h in client.submit_many(MODEL, [{"x": rows_of(1, i)} for i in range(6)])]
    server = world.server(max_rows=2, observer=recorder)
    server.intake.rows_per_message = 1.0
    server.cycle(block_s=0.01)
    settle(server.writer)
    assert seen[1] == 0
    assert sorted(j for done, _ in recorder.after_store[1:] for j in done) == sorted(ids[:2])

# --- shapes ---------------------------------------------------------------------------------


class MeanModel:
    """A sequence model: ``y = mean of x over its sequence axis`` (padding would change it)."""

    provider = "FakeExecutionProvider"

    def __init__(self) -> None:
        self.shapes: list[tuple[int, ...]] = []

    def run(self, feeds: dict[str, np.ndarray[Any, Any]]) -> dict[str, np.ndarray[Any, Any]]:
        self.shapes.append(feeds["x"].shape)
        return {"y": feeds["x"].mean(axis=1)}


def sequence_server(world: World, model: MeanModel) -> ModelServer:
    settings = Settings(max_tensor_bytes=1 << 20, reject_nonfinite=False, result_ttl_s=600)
    server = model_server(
        MODEL, {1: model},  # type: ignore[dict-item]
        (TensorSpec("x", "float32", (-1, -1, 2)),), broker=world.broker,
        results=world.results, same_server=True, observer=Observer(),
        policy=BatchPolicy(8, 60.0), settings=settings, worker="cpu0@test")
    world.servers.append(server)
    return server


def test_jobs_of_different_lengths_batch_by_length(world: World) -> None:
    client = world.client(validate=False)
    lengths = [3, 5, 3, 5, 3, 1]
    xs = [np.full((1, n, 2), i, np.float32) + np.arange(n, dtype=np.float32)[None, :, None]
          for i, n in enumerate(lengths)]
    ids = [h.id for h in client.submit_many(MODEL, [{"x": x} for x in xs])]
    model = MeanModel()
    world.run(sequence_server(world, model))
    # One model call per length, each with every job of that length: never concatenated
    # across lengths, never padded, never run one by one.
    assert sorted(model.shapes) == [(1, 1, 2), (2, 5, 2), (3, 3, 2)]
    for job_id, x, n in zip(ids, xs, lengths, strict=True):
        got = world.ok(job_id)
        np.testing.assert_allclose(got["y"], x.mean(axis=1))
        assert got.batch_size == lengths.count(n), "batch_size is the batch that ran"


def test_an_empty_sequence_is_invalid(world: World) -> None:
    client = world.client(validate=False)
    empty = client.submit(MODEL, {"x": np.zeros((1, 0, 2), np.float32)}).id
    fine = client.submit(MODEL, {"x": np.ones((1, 2, 2), np.float32)}).id
    world.run(sequence_server(world, MeanModel()))
    failed = world.result(empty)
    assert isinstance(failed, InvalidInput) and "dimension 1 is empty" in failed.message
    assert world.ok(fine)["y"].tolist() == [[1.0, 1.0]]


def test_a_job_larger_than_a_batch_runs_in_parts_joined_in_order(world: World) -> None:
    client = world.client()
    big = rows_of(20, 3)
    job_id = client.submit(MODEL, {"x": big}).id
    world.run(world.server(max_rows=8))
    assert world.batch_rows == [8, 8, 4]
    got = world.ok(job_id)
    np.testing.assert_array_equal(got["y"], big.sum(axis=1, keepdims=True))
    assert got.batch_size == 8


def test_higher_priority_messages_are_served_first(world: World) -> None:
    client = world.client()
    low = [client.submit(MODEL, {"x": rows_of(1, i)}, priority=9).id for i in range(6)]
    high = client.submit(MODEL, {"x": rows_of(1, 99)}, priority=0).id
    server = world.server(max_rows=2)
    server.intake.rows_per_message = 1.0
    server.cycle(block_s=0.01)
    settle(server.writer)
    assert world.result(high) is not None, "the online job went first"
    # ... in a batch of its own: an online job never waits for background rows.
    assert sum(world.result(i) is not None for i in low) == 0
    assert world.batch_rows == [1]
    world.run(server)
    assert all(world.result(i) is not None for i in low)


# --- online jobs ahead of background (priority 9) work ------------------------------------


def online_recently(server: ModelServer, rows: int) -> None:
    """As if online jobs were seen all test long and ``rows`` background rows filled the
    model time the policy gives a background run, whatever the fake model's real speed."""
    server._cap.seconds_per_row = server.policy.background_run_s / rows
    server._cap.saw_online(time.monotonic() + 3600)
    server._cap.observe = lambda rows, seconds: None  # type: ignore[method-assign]


def test_a_background_job_runs_in_slices_with_online_jobs_between(world: World) -> None:
    client = world.client()
    big = rows_of(20, 3)
    background = client.submit(MODEL, {"x": big}, priority=9).id
    server = world.server(max_rows=8)
    online_recently(server, 4)  # a background run is 4 rows
    server.cycle(block_s=0.01)
    settle(server.writer)
    assert world.batch_rows == [4] and world.result(background) is None
    assert len(world.unacked()) == 1, "the background job stays in flight between slices"
    online = client.submit(MODEL, {"x": rows_of(1, 7)}).id
    server.cycle(block_s=0.01)
    # The look for online jobs travels while a slice runs: the slice under way finishes,
    # then the online job goes before the next one.
    assert world.batch_rows == [4, 4] and world.result(online) is None
    server.cycle(block_s=0.01)
    settle(server.writer)
    assert world.batch_rows == [4, 4, 1], "the online job went before the next slice"
    assert world.ok(online)["y"].tolist() == rows_of(1, 7).sum(axis=1, keepdims=True).tolist()
    world.run(server)
    assert world.batch_rows == [4, 4, 1, 4, 4, 4]
    got = world.ok(background)
    np.testing.assert_array_equal(got["y"], big.sum(axis=1, keepdims=True))
    assert got.batch_size == 4
    assert world.unacked() == set()


def test_online_jobs_a_look_found_run_next_without_another_look(world: World) -> None:
    client = world.client()
    background = client.submit(MODEL, {"x": rows_of(6, 3)}, priority=9).id
    server = world.server(max_rows=8)
    online_recently(server, 4)
    server.cycle(block_s=0.01)
    online = client.submit(MODEL, {"x": rows_of(1, 7)}).id
    server.cycle(block_s=0.01)  # the last slice, with the look that finds the online job
    settle(server.writer)
    assert world.batch_rows == [4, 2] and world.result(background) is not None
    drains: list[Any] = []
    plain = server.reader.drain
    server.reader.drain = (  # type: ignore[method-assign]
        lambda *a, **k: drains.append(a) or plain(*a, **k))
    server.cycle(block_s=0.01)
    settle(server.writer)
    assert world.batch_rows == [4, 2, 1] and world.result(online) is not None
    assert drains == [], "nothing else was waiting when the look ran: no second look"


def test_the_drain_brings_the_blobs_a_message_names(world: World) -> None:
    client = world.client(blob_threshold=64)
    big = rows_of(8, 2)  # 96 bytes: by reference
    ids = [client.submit(MODEL, {"x": big}).id,
           *(h.id for h in client.submit_many(MODEL, [{"x": big}, {"x": big}]))]
    mgets: list[list[Any]] = []
    plain = world.broker.mget
    world.broker.mget = (  # type: ignore[method-assign]
        lambda keys, *more: mgets.append(list(keys)) or plain(keys, *more))
    server = world.server(max_rows=64)
    world.run(server)
    want = big.sum(axis=1, keepdims=True).tolist()
    assert all(world.ok(i)["y"].tolist() == want for i in ids)
    assert mgets == [], "a job's tensor and a bulk message's entries came with the drain"
    # A message without the header (another client's) still has its blobs read.
    other = client.submit(MODEL, {"x": big}).id
    raw = world.broker.rpop(QUEUE)
    assert raw is not None and f'"{wire.HEADER_BLOBS}":["'.encode() in raw
    world.broker.lpush(QUEUE, raw.replace(wire.HEADER_BLOBS.encode(), b"other_header"))
    world.run(server)
    assert world.ok(other)["y"].tolist() == want
    assert mgets == [[wire.blob_key(other, "x")]]
    # The script reads only blob keys, whatever a header names.
    world.results.set(wire.result_key("secret"), b"not yours")
    client.submit(MODEL, {"x": big})
    raw = world.broker.rpop(QUEUE)
    assert raw is not None
    world.broker.lpush(QUEUE, raw.replace(
        f'"{wire.HEADER_BLOBS}":["'.encode(),
        f'"{wire.HEADER_BLOBS}":["{wire.result_key("secret")}","'.encode()))
    [(_, _, brought)], _ = server.reader.drain(8)
    assert list(brought) == [k.decode() for k in world.broker.keys(wire.BLOB_KEY_PREFIX + "*")]


def test_blobs_over_the_drain_budget_are_read_with_mget(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    import workers.serving.reader as reader_module

    monkeypatch.setattr(reader_module, "DRAIN_BLOB_BYTES", 150)  # one 96-byte blob fits
    client = world.client(blob_threshold=64)
    big = rows_of(8, 2)
    ids = [client.submit(MODEL, {"x": big}).id for _ in range(2)]
    server = world.server(max_rows=64)
    drained, _ = server.reader.drain(8)
    assert [len(brought) for _, _, brought in drained] == [1, 0]
    mgets: list[list[Any]] = []
    plain = world.broker.mget
    world.broker.mget = (  # type: ignore[method-assign]
        lambda keys, *more: mgets.append(list(keys)) or plain(keys, *more))
    pending, failures = server.intake.take(drained, wire.now())
    assert failures == [] and [p.job.id for p in pending] == ids
    assert mgets == [[wire.blob_key(ids[1], "x")]]


def test_a_batch_jobs_blobs_are_read_with_mget_not_copied_through_the_script(
    world: World
) -> None:
    """A batch job's rows (the lowest priority) never pass through Lua, where every byte
    blocks Redis; an online job's blobs of the same size still come with the drain."""
    client = world.client(blob_threshold=64)
    big = rows_of(8, 2)
    online = client.submit(MODEL, {"x": big}).id
    batch = client.submit(MODEL, {"x": big}, priority=9).id
    server = world.server(max_rows=64)
    drained, left = server.reader.drain(8)
    assert left == 0 and [len(brought) for _, _, brought in drained] == [1, 0]
    mgets: list[list[Any]] = []
    plain = world.broker.mget
    world.broker.mget = (  # type: ignore[method-assign]
        lambda keys, *more: mgets.append(list(keys)) or plain(keys, *more))
    pending, failures = server.intake.take(drained, wire.now())
    assert failures == [] and [p.job.id for p in pending] == [online, batch]
    assert mgets == [[wire.blob_key(batch, "x")]]
    assert all(p.inputs["x"].tolist() == big.tolist() for p in pending)


def test_a_look_sent_ahead_is_read_back_even_after_redis_lost_its_scripts(
    world: World
) -> None:
    client = world.client()
    online = client.submit(MODEL, {"x": rows_of(1, 7)}).id
    reader = world.server().reader
    reader.send_drain(8, max_background=0)
    assert reader.drain_in_flight
    [(tag, _, blobs)], left = reader.read_drain()
    assert left == 0 and not reader.drain_in_flight and blobs == {}
    assert world.unacked() == {tag} and world.queued() == 0
    # A restarted Redis forgets scripts: the look sent finds none and nothing was taken;
    # its reply is then the plain call's, which loads the script again.
    again = client.submit(MODEL, {"x": rows_of(1, 8)}).id
    world.broker.script_flush()
    reader.send_drain(8, max_background=0)
    [(tag2, body, _)], _ = reader.read_drain()
    assert world.unacked() == {tag, tag2} and world.queued() == 0
    assert again.encode() in body and online != again
    with pytest.raises(AssertionError, match="no drain in flight"):
        reader.read_drain()


def test_without_online_traffic_background_runs_are_full_size(world: World) -> None:
    client = world.client()
    background = client.submit(MODEL, {"x": rows_of(20, 3)}, priority=9).id
    server = world.server(max_rows=8)
    server.cycle(block_s=0.01)
    online = client.submit(MODEL, {"x": rows_of(1, 7)}).id
    world.run(server)
    # A job larger than a batch still runs in batches of max_rows, and an online job that
    # arrives meanwhile goes between them.
    assert world.batch_rows == [8, 1, 8, 4]
    assert world.ok(online).batch_size == 1
    assert world.ok(background).batch_size == 8


def test_online_jobs_go_ahead_of_background_jobs_already_taken(world: World) -> None:
    client = world.client()
    first, second = (client.submit(MODEL, {"x": rows_of(8, s)}, priority=9).id
                     for s in (1, 2))
    server = world.server(max_rows=8)
    server.intake.rows_per_message = 1.0  # drains both background messages at once
    server._background_job_rows = 1.0
    server.cycle(block_s=0.01)
    settle(server.writer)
    assert world.result(first) is not None and world.result(second) is None
    assert world.queued() == 0, "the second background job waits in the server"
    online = client.submit(MODEL, {"x": rows_of(1, 7)}).id
    server.cycle(block_s=0.01)
    settle(server.writer)
    assert world.result(online) is not None and world.result(second) is None
    world.run(server)
    assert world.batch_rows == [8, 1, 8]


def test_small_background_jobs_batch_up_to_the_cap(world: World) -> None:
    client = world.client()
    ids = [client.submit(MODEL, {"x": rows_of(2, s)}, priority=9).id for s in range(4)]
    server = world.server(max_rows=8)
    server.intake.rows_per_message = 1.0
    online_recently(server, 4)
    world.run(server)
    assert world.batch_rows == [4, 4]
    assert all(world.ok(i).batch_size == 4 for i in ids)


def test_a_background_job_failing_in_a_slice_fails_once_and_alone(world: World) -> None:
    client = world.client()
    bad = rows_of(12, 1)
    bad[9, 2] = MARKER
    failing = client.submit(MODEL, {"x": bad}, priority=9).id
    fine = client.submit(MODEL, {"x": rows_of(3, 2)}, priority=9).id
    failed: list[tuple[str, str]] = []

    class Failures(Observer):
        def job_failed(self, job_id: str, error: JobFailed, version: int | None) -> None:
            failed.append((job_id, error.code))

    server = world.server(max_rows=8, observer=Failures())
    online_recently(server, 4)
    world.run(server)
    assert world.batch_rows[:3] == [4, 4, 4], "the third slice holds the bad row"
    assert isinstance(world.result(failing), InternalError)
    assert failed == [(failing, "INTERNAL")]
    assert world.ok(fine)["y"].shape == (3, 1)
    assert world.unacked() == set()


def test_the_cap_learns_from_background_runs(world: World) -> None:
    client = world.client()
    client.submit(MODEL, {"x": rows_of(8, 1)}, priority=9)
    server = world.server(max_rows=8)
    assert server._cap.seconds_per_row is None
    world.run(server)
    assert server._cap.seconds_per_row is not None and server._cap.seconds_per_row > 0
    client.submit(MODEL, {"x": rows_of(8, 1)})  # online runs teach it nothing
    before = server._cap.seconds_per_row
    world.run(server)
    assert server._cap.seconds_per_row == before


def test_a_server_takes_no_more_background_jobs_than_its_next_run_needs(world: World) -> None:
    client = world.client()
    ids = [client.submit(MODEL, {"x": rows_of(4, s)}, priority=9).id for s in range(7)]
    server = world.server(max_rows=16)
    server._background_job_rows = 4.0  # learned: batch jobs of 4 rows
    server.cycle(block_s=0.01)
    assert world.batch_rows == [16] and world.queued() == 3
    online_recently(server, 4)  # background runs of 4 rows from now on
    server.cycle(block_s=0.01)
    settle(server.writer)
    assert world.batch_rows == [16, 4]
    # The look sent with that run brought the next run's job (read while it ran); the rest
    # is left for whichever worker is free first.
    assert world.queued() == 1 and len(world.unacked()) == 1
    world.run(server)
    assert world.batch_rows == [16, 4, 4, 4]
    assert all(world.ok(i)["y"].shape == (4, 1) for i in ids)


class Order(Observer):
    """Records when jobs are read (``received``) and when their batches start."""

    def __init__(self) -> None:
        self.events: list[tuple[str, list[str]]] = []

    def received(self, job_ids: Sequence[str], redelivered: bool) -> None:
        self.events.append(("received", list(job_ids)))

    def batch_started(self, batch: Batch) -> None:
        self.events.append(("batch", [p.job.id for p in batch.jobs]))


def test_background_messages_drained_with_online_ones_are_read_after_the_online_batch(
        world: World) -> None:
    client = world.client()
    background = client.submit(MODEL, {"x": rows_of(8, 1)}, priority=9).id
    online = client.submit(MODEL, {"x": rows_of(1, 2)}).id
    order = Order()
    server = world.server(max_rows=8, observer=order)
    server.intake.rows_per_message = 1.0  # one drain takes both messages
    server._background_job_rows = 1.0
    server.cycle(block_s=0.01)
    assert order.events == [("received", [online]), ("batch", [online]), ("received", [background])]
    assert world.queued() == 0 and [p.job.id for p in server._waiting] == [background]
    world.run(server)
    assert world.ok(background)["y"].shape == (8, 1) and world.ok(online).batch_size == 1


def _look_finds_online_and_background(world: World, observer: Observer | None = None
                                      ) -> tuple[ModelServer, str, str, str]:
    """A background job sliced in two; between its slices an online job and a second
    background job arrive, and the look sent with the last slice drains both. The server
    and the IDs of the first background job, the online job and the second one."""
    client = world.client()
    first = client.submit(MODEL, {"x": rows_of(6, 3)}, priority=9).id
    server = world.server(max_rows=8, observer=observer)
    online_recently(server, 4)
    server.cycle(block_s=0.01)  # the first slice
    online = client.submit(MODEL, {"x": rows_of(1, 7)}).id
    second = client.submit(MODEL, {"x": rows_of(2, 5)}, priority=9).id
    server.cycle(block_s=0.01)  # the last slice, with the look that finds both
    return server, first, online, second


def test_background_messages_a_look_brings_beside_online_ones_wait_for_the_online_batch(
        world: World) -> None:
    order = Order()
    server, first, online, second = _look_finds_online_and_background(world, order)
    server.cycle(block_s=0.01)
    assert order.events.index(("batch", [online])) < order.events.index(
        ("received", [second])), \
        "the second background message (its tensors one more round trip) was read first"
    world.run(server)
    assert world.ok(online).batch_size == 1
    assert world.ok(first)["y"].shape == (6, 1) and world.ok(second)["y"].shape == (2, 1)


def test_a_shutdown_finishes_background_messages_not_yet_read(world: World) -> None:
    server, first, online, second = _look_finds_online_and_background(world)
    assert server._deferred, "the background message the look took is not read yet"
    stop = threading.Event()
    stop.set()
    server.serve(stop)
    assert world.ok(online).batch_size == 1 and world.ok(second)["y"].shape == (2, 1)
    assert world.ok(first)["y"].shape == (6, 1) and world.unacked() == set()
