"""The asyncio client against a real redis-server and a real worker process.

Round trips and errors by type as the synchronous client raises them; 5,000 concurrent
``result()`` calls sharing one notification reader and a small pool; waiters that are
cancelled leave nothing behind; results written without a notification; a Redis restart
that lost the jobs. Tests that need no worker use database 12 of the session's Redis, which
no worker reads, so a model there really has no live worker.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
import redis
from sklearn.datasets import load_digits

from producer import (
    InferenceClient,
    InvalidInput,
    JobFailed,
    JobResult,
    JobStatus,
    JobTimeout,
    ModelNotFound,
    ResourceExhausted,
    Unavailable,
    UnknownJob,
    wire,
)
from producer.aio import AsyncInferenceClient, AsyncJobHandle
from tests.conftest import WorkerProcess
from workers.launch.redisproc import RedisServer, free_port

pytestmark = pytest.mark.integration

T = TypeVar("T")
DIGITS = load_digits()
PIXELS = DIGITS.data.astype(np.float32)
#: The session Redis's database that no worker reads.
IDLE_DB = 12


def run(coro: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await coro()

    return asyncio.run(main())


@pytest.fixture
def url(redis_server: RedisServer, shared_worker: WorkerProcess) -> str:
    return redis_server.url


@pytest.fixture
def idle_url(redis_server: RedisServer) -> Iterator[str]:
    url = redis_server.url.rsplit("/", 1)[0] + f"/{IDLE_DB}"
    r = redis.Redis.from_url(url)
    r.flushdb()
    yield url
    r.flushdb()


def register(url: str, model: str = "digits", *, live: bool, **changes: Any) -> None:
    """What a worker's heartbeat writes: the signature and (``live``) itself as a server."""
    r = redis.Redis.from_url(url)
    served = redis.Redis.from_url(url.rsplit("/", 1)[0] + "/0").hget(wire.MODELS_KEY, "digits")
    assert served is not None, "the shared worker advertises digits"
    r.hset(wire.MODELS_KEY, model, json.dumps({**json.loads(served), **changes}))
    if live:
        r.zadd(wire.live_key(model), {"nobody@test": time.time() + 60})


# --- round trips -------------------------------------------------------------------------


def test_round_trip_matches_the_sync_client(url: str) -> None:
    async def main() -> None:
        async with AsyncInferenceClient(url) as client:
            models = await client.models()
            assert "digits" in models and models["digits"].inputs[0].name == "pixels"
            handle = await client.submit("digits", {"pixels": PIXELS[0]})
            assert isinstance(handle, AsyncJobHandle)
            result = await handle.result(timeout=30)
            assert isinstance(result, JobResult) and result.id == handle.id
            assert result["label"].tolist() == [DIGITS.target[0]]
            assert result.timings_ms["total"] is not None
            assert await handle.status() is JobStatus.SUCCESS
            assert (await client.result(handle.id, timeout=5)).id == handle.id

            handles = await client.submit_many("digits", [{"pixels": p} for p in PIXELS[:50]],
                                               version=2, priority=3)
            results = await client.results([h.id for h in handles], timeout=30)
            labels = [int(r["label"][0]) for r in results]
            outcomes = await client.outcomes([h.id for h in reversed(handles)], timeout=30)
            assert [o.id for o in outcomes] == [h.id for h in reversed(handles)]
            seen = [job_id async for job_id, _ in client.as_completed(
                [h.id for h in handles[:5]], timeout=30)]
            assert sorted(seen) == sorted(h.id for h in handles[:5])
            assert {r.version for r in results} == {2}
            assert client.waiting == 0
        # The same inputs through the synchronous client give the same answers.
        with InferenceClient(url) as sync:
            jobs = sync.submit_many("digits", [{"pixels": p} for p in PIXELS[:50]], version=2)
            assert [int(r["label"][0]) for r in sync.results([j.id for j in jobs], 30)] == labels

    run(main)


def test_a_mark_is_set_per_job_with_the_push(url: str, idle_url: str) -> None:
    """``mark``: one key per job in the push's own transaction; a refused push (a full
    queue) takes its marks back."""
    async def main() -> None:
        async with AsyncInferenceClient(url) as client:
            one = await client.submit("digits", {"pixels": PIXELS[0]}, mark=("t:m:", "k1", 60))
            many = await client.submit_many("digits", [{"pixels": p} for p in PIXELS[:3]],
                                            mark=("t:m:", "k2", 60))
            await client.results([one.id, *(h.id for h in many)], timeout=30)
        r = redis.Redis.from_url(url)
        assert r.get(f"t:m:{one.id}") == b"k1" and 0 < r.ttl(f"t:m:{one.id}") <= 60
        assert [r.get(f"t:m:{h.id}") for h in many] == [b"k2"] * 3
        r.delete(f"t:m:{one.id}", *(f"t:m:{h.id}" for h in many))

        register(idle_url, "full", live=True, max_queue=1)
        async with AsyncInferenceClient(idle_url) as client:
            await client.submit("full", {"pixels": PIXELS[0]}, mark=("t:m:", "k", 60))
            with pytest.raises(ResourceExhausted):
                await client.submit("full", {"pixels": PIXELS[1]}, mark=("t:m:", "k", 60))
        assert len(redis.Redis.from_url(idle_url).keys("t:m:*")) == 1

    run(main)


def test_errors_by_type_as_the_sync_client(url: str, idle_url: str,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    x = {"pixels": PIXELS[0]}

    async def main() -> None:
        async with AsyncInferenceClient(url) as client:
            with pytest.raises(ModelNotFound, match="nope"):
                await client.submit("nope", x)
            with pytest.raises(ModelNotFound, match="version 99"):
                await client.submit("digits", x, version=99)
            with pytest.raises(InvalidInput, match="dimension 1 must be 64"):
                await client.submit("digits", {"pixels": np.zeros((1, 3), np.float32)})
            with pytest.raises(InvalidInput, match="priority"):
                await client.submit("digits", x, priority=10)
            # Unknown IDs: an outcome at once, raised by results(), UNKNOWN by status().
            started = time.monotonic()
            [unknown] = await client.outcomes(["no-such-job"], timeout=30)
            assert isinstance(unknown, UnknownJob) and unknown.code == "NOT_FOUND"
            with pytest.raises(UnknownJob, match="no such job"):
                await client.results(["no-such-job"], timeout=30)
            assert time.monotonic() - started < 2
            assert await client.status("no-such-job") is JobStatus.UNKNOWN
        # A job the worker refuses comes back as the class of its code.
        async with AsyncInferenceClient(url, validate=False) as client:
            bad = await client.submit("digits", {"pixels": np.zeros((1, 3), np.float32)})
            with pytest.raises(InvalidInput) as info:
                await bad.result(timeout=30)
            assert info.value.job_id == bad.id and info.value.model == "digits"
            assert isinstance(info.value, JobFailed)
            assert await bad.status() is JobStatus.FAILURE

        # No live worker serves the model: Unavailable at once, unless queueing for workers.
        register(idle_url, live=False)
        async with AsyncInferenceClient(idle_url) as client:
            with pytest.raises(Unavailable, match="no live worker serves model 'digits'"):
                await client.submit("digits", x)
        monkeypatch.setenv("INFERQ_QUEUE_WITHOUT_WORKERS", "1")
        async with AsyncInferenceClient(idle_url) as client:
            assert client.queue_without_workers
            handle = await client.submit("digits", x)
            with pytest.raises(JobTimeout) as timeout:
                await handle.result(timeout=0.3)
            assert timeout.value.job_ids == [handle.id] and timeout.value.code == "WAIT_TIMEOUT"
            assert await handle.status() is JobStatus.PENDING
            with pytest.raises(JobTimeout):
                await client.results([handle.id], timeout=0)
        # A full queue refuses, and takes its blobs back.
        register(idle_url, "full", live=True, max_queue=1)
        async with AsyncInferenceClient(idle_url, blob_threshold=0) as client:
            await client.submit("full", x)
            with pytest.raises(ResourceExhausted, match="is full"):
                await client.submit_many("full", [x, x])
        r = redis.Redis.from_url(idle_url)
        assert r.llen(wire.queue_name("full")) == 1
        assert len(r.keys(wire.BLOB_KEY_PREFIX + "*")) == 1  # the first job's only

    run(main)


def test_unreachable_redis_is_unavailable() -> None:
    async def main() -> None:
        client = AsyncInferenceClient(f"redis://127.0.0.1:{free_port()}/0", socket_timeout=0.5)
        started = time.monotonic()
        for call in (lambda: client.submit("digits", {"pixels": PIXELS[0]}),
                     lambda: client.status("j"), lambda: client.outcomes(["j"], timeout=1),
                     client.models):
            with pytest.raises(Unavailable, match="Redis did not answer"):
                await call()
        assert time.monotonic() - started < 10
        await client.close()

    run(main)


# --- many waiters, one reader ------------------------------------------------------------


def test_5000_concurrent_waiters_share_one_reader(url: str) -> None:
    async def main() -> dict[str, float]:
        async with AsyncInferenceClient(url, max_connections=8) as client:
            rows = [PIXELS[i % len(PIXELS)] for i in range(5000)]
            started = time.perf_counter()
            handles = await client.submit_many("digits", [{"pixels": r} for r in rows])
            submitted = time.perf_counter()
            results = await asyncio.gather(*(h.result(timeout=120) for h in handles))
            done = time.perf_counter()
            assert [r.id for r in results] == [h.id for h in handles]
            expected = [DIGITS.target[i % len(PIXELS)] for i in range(5000)]
            correct = sum(int(r["label"][0]) == t for r, t in zip(results, expected, strict=True))
            assert correct / 5000 > 0.95
            # One reader and one resolver task; the pools stayed small.
            assert client.background_tasks == 2
            pool: Any = client._broker.connection_pool
            assert len(pool._available_connections) + len(pool._in_use_connections) <= 8
            assert client.waiting == 0 and not client._waiters.futures
            return {"submit_s": submitted - started, "wait_s": done - submitted}

    figures = run(main)
    print(f"\n5,000 waiters: submit_many {figures['submit_s']:.2f} s, gather of 5,000 "
          f"result() {figures['wait_s']:.2f} s")


def test_cancelled_waiters_leave_nothing_behind(url: str) -> None:
    admin = redis.Redis.from_url(url)
    # Accepted jobs that nobody answers: the waiters wait until cancelled.
    ids = [wire.new_id() for _ in range(1000)]
    admin.mset({wire.accepted_key(i): b"1" for i in ids})

    async def main() -> None:
        async with AsyncInferenceClient(url) as client:
            tasks = [asyncio.create_task(client.result(i, timeout=60)) for i in ids]
            tasks += [asyncio.create_task(client.results(ids[:10], timeout=60))]
            await asyncio.sleep(0.5)  # registered, and several full re-reads ran
            assert client.waiting == 1010
            for task in tasks:
                task.cancel()
            gathered = await asyncio.gather(*tasks, return_exceptions=True)
            other = [g for g in gathered if not isinstance(g, asyncio.CancelledError)]
            assert other == [], f"{len(other)} not cancelled: {other[:3]!r}"
            assert client.waiting == 0 and client._waiters.futures == {}
            pool: Any = client._results.connection_pool
            # Only the reader's BLPOP may hold a connection between calls (the resolver's last
            # full read of the cancelled IDs may still be finishing: a leak would stay).
            deadline = time.monotonic() + 5
            while len(pool._in_use_connections) > 1 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert len(pool._in_use_connections) <= 1
            # The client goes on serving after its waiters were cancelled.
            handle = await client.submit("digits", {"pixels": PIXELS[1]})
            assert (await handle.result(timeout=30))["label"].tolist() == [DIGITS.target[1]]
            assert client.background_tasks == 2
        assert client.background_tasks == 0
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        assert others == []

    try:
        run(main)
    finally:
        admin.delete(*(wire.accepted_key(i) for i in ids))


def test_a_waiter_timing_out_leaves_nothing_behind(url: str) -> None:
    admin = redis.Redis.from_url(url)
    job_id = wire.new_id()
    admin.set(wire.accepted_key(job_id), b"1", ex=60)

    async def main() -> None:
        async with AsyncInferenceClient(url) as client:
            with pytest.raises(JobTimeout):
                await client.result(job_id, timeout=0.2)
            assert client.waiting == 0

    run(main)


def test_result_written_without_notification_is_picked_up(url: str) -> None:
    """A result another client's worker run wrote (no notification to us) is read by the
    periodic re-read, as the synchronous client does every 0.1 s."""
    admin = redis.Redis.from_url(url)
    job_id = wire.new_id()
    admin.set(wire.accepted_key(job_id), b"1", ex=60)
    with InferenceClient(url) as sync:
        done = sync.submit("digits", {"pixels": PIXELS[2]}).result(timeout=30)

    async def main() -> float:
        async with AsyncInferenceClient(url) as client:
            waiter = asyncio.create_task(client.result(job_id, timeout=10))
            await asyncio.sleep(0.3)
            raw = admin.get(wire.result_key(done.id))
            assert raw is not None
            admin.set(wire.result_key(job_id), raw.replace(done.id.encode(), job_id.encode()))
            written = time.monotonic()
            result = await waiter
            assert result.id == job_id and result["label"].tolist() == [DIGITS.target[2]]
            return time.monotonic() - written

    assert run(main) < 1.0


def test_a_handle_awaited_after_its_notification_answers_at_once(url: str) -> None:
    async def main() -> None:
        async with AsyncInferenceClient(url) as client:
            handle = await client.submit("digits", {"pixels": PIXELS[3]})
            deadline = time.monotonic() + 10
            while handle.id not in client._waiters._unclaimed:
                assert time.monotonic() < deadline, "the reader never popped the notification"
                await asyncio.sleep(0.01)
            result = await handle.result(timeout=5)
            assert result["label"].tolist() == [DIGITS.target[3]]

    run(main)


def test_results_that_come_in_their_notification_need_no_read(url: str, idle_url: str
                                                              ) -> None:
    """A lone job's message asks for its result inline; one waiter or many take it from
    the notification (no result key is there to read), and an inline document that does
    not parse sends the waiter to the stored result instead."""
    register(idle_url, live=True)
    with InferenceClient(url) as sync:
        done = sync.submit("digits", {"pixels": PIXELS[4]}).result(timeout=30)
    stored = redis.Redis.from_url(url).get(wire.result_key(done.id))
    assert stored is not None
    admin = redis.Redis.from_url(idle_url)

    def doc(job_id: str) -> bytes:
        return stored.replace(done.id.encode(), job_id.encode())

    async def main() -> None:
        async with AsyncInferenceClient(idle_url) as client:
            handles = [await client.submit("digits", {"pixels": PIXELS[4]}) for _ in range(4)]
            queue = wire.queue_name("digits")
            to = {wire.parse_message(raw, queue).notify_to for raw in admin.lrange(queue, 0, -1)}
            assert to == {wire.Notify(client.client_id, wire.NOTIFY_INLINE_MAX)}
            key = wire.notify_key(client.client_id)
            one = asyncio.create_task(handles[0].result(timeout=5))
            await asyncio.sleep(0.05)
            admin.rpush(key, b"\0%s\0%s" % (handles[0].id.encode(), doc(handles[0].id)))
            assert (await one)["label"].tolist() == [DIGITS.target[4]]
            many = asyncio.gather(*(h.result(timeout=5) for h in handles[1:]))
            await asyncio.sleep(0.05)
            admin.set(wire.result_key(handles[3].id), doc(handles[3].id))
            admin.rpush(key, *(b"\0%s\0%s" % (h.id.encode(), doc(h.id)) for h in handles[1:3]),
                        b"\0%s\0not a document" % handles[3].id.encode())
            results = await many
            assert [r.id for r in results] == [h.id for h in handles[1:]]
            assert all(r["label"].tolist() == [DIGITS.target[4]] for r in results)
            assert not any(admin.exists(wire.result_key(h.id)) for h in handles[:3])

    run(main)


def test_redis_restart_without_persistence_fails_the_waiters(tmp_path: Path) -> None:
    server = RedisServer(directory=tmp_path, appendonly=False).start()
    try:
        register_url = server.url
        r = server.client()
        r.hset(wire.MODELS_KEY, "digits", json.dumps({
            "versions": [1], "inputs": [{"name": "pixels", "dtype": "float32",
                                         "shape": [-1, 64]}], "outputs": []}))
        r.zadd(wire.live_key("digits"), {"nobody@test": time.time() + 60})

        async def main() -> None:
            async with AsyncInferenceClient(register_url, socket_timeout=1) as client:
                handle = await client.submit("digits", {"pixels": PIXELS[0]})
                # (A waiter during the restart itself gets "Redis did not answer".)
                await asyncio.to_thread(server.restart)
                with pytest.raises(Unavailable, match="without append-only persistence"):
                    await handle.result(timeout=30)
                assert client.waiting == 0

        run(main)
    finally:
        server.stop()
