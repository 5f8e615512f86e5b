"""The serving loop's small parts on their own: drain sizing, picking a batch, in-flight
bookkeeping, observers, Flower's task events and their sampler, blob ownership."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import redis

import workers.serving.events as events_module
from producer import wire
from producer.errors import InternalError, InvalidInput, JobFailed
from producer.wire import Delivery, JobRequest
from workers.serving.batching import MAX_DRAIN, drain_size, pick, rows_per_message
from workers.serving.events import Event, Sampler, TaskEvents
from workers.serving.inflight import InFlight, Message
from workers.serving.intake import Pending
from workers.serving.observers import Batch, Observer, Observers, Outcome
from workers.serving.writer import Completed, ResultWriter

# --- drain_size and rows_per_message ------------------------------------------------------


@pytest.mark.parametrize(
    ("room", "per_message", "want"),
    [
        (0, 1.0, 0),  # the next batch is full: take nothing
        (-5, 1.0, 0),  # over-full (one job larger than a batch)
        (0, 0.5, 0),
        (8, 8.0, 1),
        (8, 1.0, 8),
        (8, 3.0, 2),  # rounded down: never more than the room
        (8, 2.9, 2),
        (1, 100.0, 1),  # at least one, however large messages seem
        (7, 8.0, 1),
        (10_000, 1.0, MAX_DRAIN),  # capped
        (MAX_DRAIN, 1.0, MAX_DRAIN),
        (MAX_DRAIN + 1, 1.0, MAX_DRAIN),
    ],
)
def test_drain_size(room: int, per_message: float, want: int) -> None:
    assert drain_size(room, per_message) == want


def test_drain_size_honours_its_cap() -> None:
    assert drain_size(100, 1.0, max_drain=10) == 10
    assert drain_size(100, 50.0, max_drain=10) == 2
    assert drain_size(0, 1.0, max_drain=10) == 0


def test_drain_size_never_exceeds_the_room_for_one_row_messages() -> None:
    average = 8.0
    for room in range(1, 300):
        assert 1 <= drain_size(room, average) <= max(1, min(room, MAX_DRAIN))
        average = rows_per_message(average, 1)


def test_rows_per_message_is_a_moving_average() -> None:
    assert rows_per_message(8.0, 1) == pytest.approx(6.6)
    assert rows_per_message(1.0, 11) == pytest.approx(3.0)
    assert rows_per_message(5.0, 5) == pytest.approx(5.0)
    # A message with no usable rows counts as one row, so the average stays >= 1.
    assert rows_per_message(1.0, 0) == pytest.approx(1.0)
    average = 8.0
    for _ in range(60):
        average = rows_per_message(average, 2)
    assert average == pytest.approx(2.0, abs=1e-4)
    # One outlier moves it by a fifth of the difference, no more.
    assert rows_per_message(2.0, 102) == pytest.approx(22.0)


# --- pick -----------------------------------------------------------------------------------


@dataclass
class W:
    """A waiting job as pick sees it (equal values on purpose: pick must go by identity)."""

    rows: int = 1
    version: int = 1
    suspect: bool = False
    name: str = ""
    shape: tuple[tuple[int, ...], ...] = ((4,),)


def names(jobs: Sequence[W]) -> list[str]:
    return [j.name for j in jobs]


def test_pick_takes_the_head_versions_jobs_in_order_up_to_max_rows() -> None:
    waiting = [W(3, 1, name="a"), W(2, 2, name="b"), W(3, 1, name="c"), W(1, 1, name="d"),
               W(2, 1, name="e"), W(1, 1, name="f")]
    batch, rest = pick(waiting, 8)
    assert names(batch) == ["a", "c", "d"]  # 7 rows; e (2 more) would overfill
    assert names(rest) == ["b", "e", "f"]  # oldest first, as they were


def test_pick_stops_at_the_first_job_that_does_not_fit() -> None:
    batch, rest = pick([W(2, name="a"), W(10, name="b"), W(1, name="c")], 8)
    assert names(batch) == ["a"]
    assert names(rest) == ["b", "c"]


def test_pick_fills_a_batch_exactly() -> None:
    batch, rest = pick([W(4, name="a"), W(4, name="b"), W(1, name="c")], 8)
    assert names(batch) == ["a", "b"] and names(rest) == ["c"]
    assert sum(j.rows for j in batch) == 8


def test_a_job_larger_than_a_batch_runs_alone() -> None:
    batch, rest = pick([W(20, name="big"), W(1, name="a")], 8)
    assert names(batch) == ["big"] and names(rest) == ["a"]
    batch, rest = pick([W(1, name="a"), W(20, name="big")], 8)
    assert names(batch) == ["a"] and names(rest) == ["big"]


def test_a_suspect_at_the_head_runs_alone() -> None:
    waiting = [W(1, suspect=True, name="s"), W(1, name="a"), W(1, suspect=True, name="t")]
    batch, rest = pick(waiting, 8)
    assert names(batch) == ["s"]
    assert names(rest) == ["a", "t"]


def test_suspects_behind_the_head_never_join_a_batch() -> None:
    waiting = [W(1, name="a"), W(1, suspect=True, name="s"), W(1, name="b"), W(1, 2, name="c")]
    batch, rest = pick(waiting, 8)
    assert names(batch) == ["a", "b"]
    assert names(rest) == ["s", "c"]
    batch, rest = pick(rest, 8)
    assert names(batch) == ["s"] and names(rest) == ["c"]


def test_pick_keeps_jobs_that_compare_equal_apart() -> None:
    same = [W(), W(), W(), W()]
    batch, rest = pick(same, 3)
    assert len(batch) == 3 and len(rest) == 1
    assert {id(j) for j in batch} | {id(j) for j in rest} == {id(j) for j in same}
    assert rest[0] is same[3]


def test_pick_until_empty_takes_every_job_once() -> None:
    rng = np.random.default_rng(0)
    waiting = [W(int(rng.integers(1, 12)), int(rng.integers(1, 3)), bool(rng.random() < 0.1),
                 str(i)) for i in range(200)]
    seen: list[str] = []
    left: list[W] = list(waiting)
    while left:
        batch, left = pick(left, 8)
        assert len({j.version for j in batch}) == 1
        assert len(batch) == 1 or (sum(j.rows for j in batch) <= 8
                                   and not any(j.suspect for j in batch))
        seen += names(batch)
    assert sorted(seen, key=int) == [str(i) for i in range(200)]


# --- InFlight -------------------------------------------------------------------------------


def test_a_message_is_done_once_all_its_jobs_are_closed() -> None:
    inflight = InFlight()
    assert inflight.take_done() == ([], [])
    two = inflight.add("t2", "client", 2, ["inferq:blob:a:x", "inferq:blob:m:entries"])
    one = inflight.add("t1", None, 1, [])
    assert inflight.take_done() == ([], [])

    inflight.close(two)
    assert inflight.take_done() == ([], []), "one job of t2 is still open"
    inflight.close(one)
    assert inflight.take_done() == (["t1"], [])
    assert inflight.take_done() == ([], []), "a done message is handed out once"
    inflight.close(two)
    assert inflight.take_done() == (["t2"], ["inferq:blob:a:x", "inferq:blob:m:entries"])
    assert inflight.take_done() == ([], [])


def test_several_done_messages_come_out_together_in_order() -> None:
    inflight = InFlight()
    messages = [inflight.add(f"t{i}", None, 1, [f"inferq:blob:j{i}:x"]) for i in range(4)]
    for m in (messages[2], messages[0], messages[3]):
        inflight.close(m)
    assert inflight.take_done() == (["t0", "t2", "t3"],
                                    ["inferq:blob:j0:x", "inferq:blob:j2:x", "inferq:blob:j3:x"])
    inflight.close(messages[1])
    assert inflight.take_done() == (["t1"], ["inferq:blob:j1:x"])


def test_a_message_without_open_jobs_is_done_at_once() -> None:
    inflight = InFlight()
    message = inflight.add("t", None, 0, ["inferq:blob:m:entries"])
    assert isinstance(message, Message) and message.open_jobs == 0
    assert inflight.take_done() == (["t"], ["inferq:blob:m:entries"])


# --- observers ------------------------------------------------------------------------------


class Recording(Observer):
    def __init__(self, name: str, log: list[tuple[str, str]],
                 work: Callable[[], None] | None = None) -> None:
        self.name, self.log, self.work = name, log, work

    def received(self, job_ids: Sequence[str], redelivered: bool) -> None:
        self.log.append((self.name, f"received {','.join(job_ids)} {redelivered}"))

    def batch_started(self, batch: Batch) -> None:
        self.log.append((self.name, f"started {batch.rows}"))

    def batch_done(self, batch: Batch, outcomes: Sequence[Outcome]) -> None:
        self.log.append((self.name, f"done {batch.rows} {len(outcomes)}"))

    def job_failed(self, job_id: str, error: JobFailed, version: int | None) -> None:
        self.log.append((self.name, f"failed {job_id} {error.code} {version}"))

    def handoff(self) -> Callable[[], None] | None:
        return self.work


def pending(job_id: str, rows: int = 1) -> Pending:
    job = JobRequest(job_id, "m", None, {})
    return Pending(job, 1, {"x": np.zeros((rows, 2), np.float32)}, rows,
                   Message("tag", None, 1, []), picked_at=100.0)


def batch_of(*jobs: Pending, version: int = 1) -> Batch:
    return Batch("m", version, "CPUExecutionProvider", list(jobs), sum(p.rows for p in jobs),
                 started=101.0, finished=101.5)


def test_observers_call_each_observer_in_order() -> None:
    log: list[tuple[str, str]] = []
    both = Observers([Recording("one", log), Recording("two", log)])
    batch = batch_of(pending("a"), pending("b", 2))
    both.received(["a", "b"], True)
    both.batch_started(batch)
    both.job_failed("b", InvalidInput("no"), 1)
    both.batch_done(batch, [{}, InvalidInput("no")])
    assert log == [
        ("one", "received a,b True"), ("two", "received a,b True"),
        ("one", "started 3"), ("two", "started 3"),
        ("one", "failed b INVALID_ARGUMENT 1"), ("two", "failed b INVALID_ARGUMENT 1"),
        ("one", "done 3 2"), ("two", "done 3 2"),
    ]


def test_the_base_observer_does_nothing() -> None:
    base = Observer()
    base.received(["a"], False)
    base.batch_started(batch_of(pending("a")))
    base.batch_done(batch_of(pending("a")), [{}])
    base.job_failed("a", InternalError("x"), None)
    assert base.handoff() is None
    assert Observers([]).handoff() is None


def test_handoff_combines_the_work_of_every_observer() -> None:
    ran: list[str] = []

    def one() -> None:
        ran.append("one")

    def two() -> None:
        ran.append("two")

    log: list[tuple[str, str]] = []
    assert Observers([Recording("a", log), Recording("b", log)]).handoff() is None
    # A single piece of work is handed on as it is.
    assert Observers([Recording("a", log), Recording("b", log, one)]).handoff() is one
    combined = Observers([Recording("a", log, one), Recording("b", log),
                          Recording("c", log, two)]).handoff()
    assert combined is not None and combined not in (one, two)
    assert ran == []
    combined()
    assert ran == ["one", "two"]


# --- Flower's task events -------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[Clock]:
    clock = Clock()
    monkeypatch.setattr(events_module.time, "monotonic", clock)
    yield clock


def test_a_sampler_at_rate_zero_admits_everything(clock: Clock) -> None:
    sampler = Sampler(0)
    assert all(sampler.admit() for _ in range(10_000))
    assert all(Sampler(-1).admit() for _ in range(100))


def test_a_sampler_admits_about_its_rate_per_second(clock: Clock) -> None:
    sampler = Sampler(10)
    # A full bucket at the start: a burst of 10, then nothing until time passes.
    assert sum(sampler.admit() for _ in range(100)) == 10
    clock.now += 0.1
    assert [sampler.admit(), sampler.admit()] == [True, False]
    # Many calls over 20 seconds: about 10 per second.
    admitted = 0
    for _ in range(20_000):
        clock.now += 0.001
        admitted += sampler.admit()
    assert 195 <= admitted <= 205


def test_a_sampler_does_not_save_up_idle_time(clock: Clock) -> None:
    sampler = Sampler(5)
    assert sum(sampler.admit() for _ in range(10)) == 5
    clock.now += 3600
    assert sum(sampler.admit() for _ in range(100)) == 5, "at most one second's worth"


def test_a_sampler_with_a_fractional_rate(clock: Clock) -> None:
    sampler = Sampler(0.5)  # one job every two seconds, as 1/instances of a small rate
    assert sampler.admit() is True, "the bucket holds one whole token to start with"
    assert sampler.admit() is False
    clock.now += 1.0
    assert sampler.admit() is False, "half a token is not a job"
    clock.now += 1.0
    assert sampler.admit() is True
    clock.now += 1.0
    assert sampler.admit() is False
    clock.now += 1.0
    assert sampler.admit() is True


def kinds(events: Sequence[Event]) -> list[tuple[str, str]]:
    return [(kind, fields["uuid"]) for kind, fields in events]


def test_task_events_of_sampled_jobs(clock: Clock) -> None:
    sent: list[list[Event]] = []
    events = TaskEvents("m", lambda e: sent.append(list(e)))
    a, b, c = pending("a"), pending("b", 2), pending("c")
    events.received(["a", "b"], False)
    events.received(["c"], True)
    batch = batch_of(a, b, c, version=3)
    events.batch_started(batch)
    failure = InternalError("boom", job_id="b")
    events.job_failed("b", failure, 3)
    events.batch_done(batch, [{"y": np.zeros(1)}, failure, {"y": np.zeros(1)}])
    assert sent == [], "nothing is sent before the hand-off"

    work = events.handoff()
    assert work is not None
    assert events.handoff() is None, "the events are handed off once"
    work()
    [out] = sent
    assert kinds(out) == [
        ("task-received", "a"), ("task-received", "b"), ("task-received", "c"),
        ("task-started", "a"), ("task-started", "b"), ("task-started", "c"),
        ("task-failed", "b"),
        ("task-succeeded", "a"), ("task-succeeded", "c"),
    ]
    received = {f["uuid"]: f for k, f in out if k == "task-received"}
    assert received["a"]["name"] == wire.TASK_NAME
    assert (received["a"]["retries"], received["c"]["retries"]) == (0, 1)
    assert received["a"]["root_id"] == "a" and "'m'" in received["a"]["args"]
    succeeded = [f for k, f in out if k == "task-succeeded"]
    assert succeeded[0]["result"] == "v3 batch 4"
    assert succeeded[0]["runtime"] == pytest.approx(1.5)  # pick-up 100.0 -> outputs ready 101.5
    [failed] = [f for k, f in out if k == "task-failed"]
    assert failed["exception"] == str(failure)
    # Finished jobs are forgotten: a second batch_done of them sends nothing.
    events.batch_done(batch, [{}, {}, {}])
    assert events.handoff() is None


def test_task_events_above_the_rate_sample_jobs(clock: Clock) -> None:
    sent: list[Event] = []
    events = TaskEvents("m", sent.extend, max_rate=1)
    events.received(["a", "b"], False)  # one token: a is sampled, b is not
    batch = batch_of(pending("a"), pending("b"))
    events.batch_started(batch)
    events.batch_done(batch, [{}, {}])
    # A failure of a job that was never sampled: no token left, no events.
    events.job_failed("x", InvalidInput("bad"), None)
    work = events.handoff()
    assert work is not None
    work()
    assert kinds(sent) == [("task-received", "a"), ("task-started", "a"),
                           ("task-succeeded", "a")]

    # Once a token is back, an unsampled job's failure gets a received and a failed.
    sent.clear()
    clock.now += 1.0
    events.job_failed("y", InvalidInput("bad"), None)
    events.job_failed("z", InvalidInput("bad"), None)
    work = events.handoff()
    assert work is not None
    work()
    assert kinds(sent) == [("task-received", "y"), ("task-failed", "y")]
    assert sent[0][1]["retries"] == 0


def test_a_message_of_many_jobs_is_sampled_at_the_rate(clock: Clock) -> None:
    sent: list[Event] = []
    events = TaskEvents("m", sent.extend, max_rate=100)
    events.received([f"j{i}" for i in range(250)], False)
    assert list(events._admitted) == [f"j{i}" for i in range(100)], "the first 100 jobs"
    clock.now += 0.5
    events.received([f"k{i}" for i in range(250)], True)
    assert len(events._admitted) == 150 and events._admitted["k49"] == 1
    assert "k50" not in events._admitted


def test_task_events_of_an_unsampled_job_that_failed_in_a_batch(clock: Clock) -> None:
    sent: list[Event] = []
    events = TaskEvents("m", sent.extend, max_rate=1)
    events.received(["a", "b"], False)
    clock.now += 1.0  # a token for b's failure
    batch = batch_of(pending("a"), pending("b"))
    events.batch_started(batch)
    events.job_failed("b", InternalError("boom"), 1)
    events.batch_done(batch, [{}, InternalError("boom")])
    work = events.handoff()
    assert work is not None
    work()
    assert kinds(sent) == [("task-received", "a"), ("task-started", "a"),
                           ("task-received", "b"), ("task-failed", "b"),
                           ("task-succeeded", "a")]


# --- blob ownership -------------------------------------------------------------------------


def test_job_refs_are_only_blob_keys() -> None:
    inputs = {
        "a": {"dtype": "float32", "shape": [1], "ref": wire.blob_key("j", "a")},
        "b": {"dtype": "float32", "shape": [1], "data": b"\x00" * 4},
        "c": {"dtype": "float32", "shape": [1], "ref": wire.result_key("other")},
        "d": {"dtype": "float32", "shape": [1], "ref": 42},
        "e": {"dtype": "float32", "shape": [1], "ref": "unacked"},
        "f": [1, 2, 3],
    }
    assert JobRequest("j", "m", None, inputs).refs == [wire.blob_key("j", "a")]
    assert JobRequest("j", "m", None, [inputs["a"]]).refs == []
    assert JobRequest("j", "m", None, None).refs == []


def ref(owner: str, name: str = "x") -> dict[str, Any]:
    return {"dtype": "float32", "shape": [1, 4], "ref": wire.blob_key(owner, name)}


def test_a_message_owns_only_its_own_jobs_blobs() -> None:
    delivery = Delivery(queue="q", entries_ref=wire.blob_key("msg", "entries"))
    delivery.jobs = [
        JobRequest("a", "m", None, {"x": ref("a"), "y": ref("b")}),  # b's data, read only
        JobRequest("b", "m", None, {"x": ref("b", "y")}),
        JobRequest("c", "m", None, {"x": ref("ab")}),  # a prefix of the owner is not it
    ]
    assert delivery.owned_blobs() == [
        wire.blob_key("msg", "entries"), wire.blob_key("a", "x"), wire.blob_key("b", "y")]
    assert Delivery(queue="q").owned_blobs() == []


def test_a_parsed_message_may_not_claim_another_jobs_blob() -> None:
    queue = wire.queue_name("m")
    raw = wire.build_message(
        task=wire.TASK_NAME, task_id="mine", args=["m", {"x": ref("theirs"), "z": ref("mine")}],
        kwargs={}, queue=queue)
    delivery = wire.parse_message(raw, queue)
    [job] = delivery.jobs
    assert job.refs == [wire.blob_key("theirs", "x"), wire.blob_key("mine", "x")]
    assert delivery.owned_blobs() == [wire.blob_key("mine", "x")]

    entries = [{"id": "j1", "inputs": {"x": ref("j2")}}, {"id": "j2", "inputs": {"x": ref("j2")}}]
    bulk = wire.build_message(
        task=wire.BULK_TASK_NAME, task_id="msg", args=["m", entries], kwargs={}, queue=queue,
        headers={wire.HEADER_JOB_IDS: ["j1", "j2"]})
    delivery = wire.parse_message(bulk, queue)
    assert [j.id for j in delivery.jobs] == ["j1", "j2"]
    # j2's blob is deleted once, as j2's; j1 only reads it.
    assert delivery.owned_blobs() == [wire.blob_key("j2", "x")]


# --- the writer at shutdown -------------------------------------------------------------


class DeadStore:
    """A result store whose Redis never answers."""

    def __init__(self) -> None:
        self.tries = 0

    def commit(self, docs: Any, acks: Any, blobs: Any) -> None:
        self.tries += 1
        raise redis.exceptions.ConnectionError("Redis is unreachable")


def test_a_stopping_writer_abandons_writes_redis_refuses_past_its_grace() -> None:
    store = DeadStore()
    writer = ResultWriter(store, depth=1)  # type: ignore[arg-type]
    writer.give_up_after(0.3)
    started = time.monotonic()
    ran: list[bool] = []
    writer.submit(Completed([("j", b"{}", None)], ["tag"], [], [lambda: ran.append(True)]))
    writer.close()
    assert 0.3 <= time.monotonic() - started < 5
    assert store.tries >= 2, "it retried before giving up"
    assert ran == [], "nothing that follows a store runs when the store was abandoned"
    assert writer.error is None, "giving up is not a failure: the messages stay unacked"


def test_a_running_writer_keeps_retrying(monkeypatch: pytest.MonkeyPatch) -> None:
    store = DeadStore()
    writer = ResultWriter(store)  # type: ignore[arg-type]
    writer.submit(Completed([("j", b"{}", None)], ["tag"], []))
    deadline = time.monotonic() + 1.0
    while store.tries < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    tries = store.tries
    assert tries >= 4, "without a grace it retries (nothing is acked, nothing is lost)"
    writer.give_up_after(0)
    writer.close()


def test_pick_batches_only_jobs_of_the_heads_shape() -> None:
    """A sequence model's jobs of different lengths never concatenate: each length forms its
    own batch, oldest first, and nothing is padded."""
    waiting = [W(name="a", shape=((5, 8),)), W(name="b", shape=((3, 8),)),
               W(name="c", shape=((5, 8),)), W(name="d", shape=((3, 8),))]
    batch, rest = pick(waiting, 8)
    assert names(batch) == ["a", "c"] and names(rest) == ["b", "d"]
    batch, rest = pick(rest, 8)
    assert names(batch) == ["b", "d"] and rest == []
