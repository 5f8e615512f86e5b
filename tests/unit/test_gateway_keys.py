"""API keys (hashed, scoped, revocable), the shared rate limit and idempotency keys, on
fakeredis."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from types import SimpleNamespace
from typing import Any

import fakeredis
import pytest

from workers.gateway import admission as admission_module
from workers.gateway import keys, limits
from workers.gateway.admission import Admission
from workers.gateway.problems import Problem


@pytest.fixture
def server() -> fakeredis.FakeServer:
    return fakeredis.FakeServer()


def test_keys_are_stored_hashed_and_revocable(server: fakeredis.FakeServer) -> None:
    r = fakeredis.FakeRedis(server=server)
    key, record = keys.create(r, "svc", ("digits",), {"submit"})
    assert key.startswith("iq_") and len(key) >= 40
    stored = r.hgetall(keys.KEYS_KEY)
    assert list(stored) == [keys.digest(key).encode()]
    assert key.encode() not in b"".join(stored.values())
    assert record.id == keys.digest(key)[:16] and record.scopes == frozenset({"submit"})
    assert [k.name for k in keys.list_keys(r)] == ["svc"]
    with pytest.raises(ValueError, match="exists"):
        keys.create(r, "svc", ("*",), {"read"})

    async def check(token: str) -> keys.ApiKey | None:
        found = await limits.admit(fakeredis.FakeAsyncRedis(server=server), token, 0)
        return None if found is None else found.key

    found = asyncio.run(check(key))
    assert found == record and found.allows_model("digits") and not found.allows_model("x")
    assert asyncio.run(check(key + "x")) is None
    assert keys.revoke(r, "svc") and not keys.revoke(r, "svc")
    assert asyncio.run(check(key)) is None


def test_parsing() -> None:
    assert keys.parse_models(" digits, iris ") == ("digits", "iris")
    assert keys.parse_scopes("read") == frozenset({"read"})
    for bad in ("", ",", " "):
        with pytest.raises(ValueError):
            keys.parse_models(bad)
    with pytest.raises(ValueError, match="scopes"):
        keys.parse_scopes("submit,admin")
    assert keys.bearer("Bearer iq_abc") == "iq_abc" and keys.bearer("bearer  iq_abc") == "iq_abc"
    assert keys.bearer("Basic iq_abc") is None and keys.bearer("Bearer other") is None
    assert keys.bearer(None) is None
    all_models = keys.ApiKey("a", "i", ("*",), frozenset({"read"}))
    assert all_models.allows_model("anything")


def test_rate_limit_is_a_shared_fixed_window(server: fakeredis.FakeServer,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(time, "time", lambda: 1000.25)  # one window for the burst
    key, record = keys.create(fakeredis.FakeRedis(server=server), "svc", ("*",), {"read"})

    async def burst(n: int, limit: int) -> list[bool]:
        admission = Admission(fakeredis.FakeAsyncRedis(server=server), limit)
        out = []
        for _ in range(n):
            admitted = await admission.admit(key)
            assert admitted is not None and admitted.key == record
            out.append(admitted.over)
        return out

    assert asyncio.run(burst(8, 5)) == [False] * 5 + [True] * 3
    assert asyncio.run(burst(3, 0)) == [False] * 3  # 0: no limit, nothing counted
    r = fakeredis.FakeRedis(server=server)
    window = f"inferq:gw:rate:{record.id}:1000".encode()
    assert r.keys(limits.RATE_PREFIX + "*") == [window]
    assert r.get(window) == b"8"  # another process counts on from here
    assert 0 < r.ttl(window) <= 2
    assert asyncio.run(burst(1, 5)) == [True]
    # A process leases max(1, limit // 50) requests at a time; together they admit the limit.
    r.delete(window)
    first, second = asyncio.run(burst(70, 100)), asyncio.run(burst(70, 100))
    assert first.count(False) == 70 and second.count(False) == 30
    assert r.get(window) == b"180"  # 50 leases of 2, then 40 refused leases

    async def stranger() -> Any:
        return await Admission(fakeredis.FakeAsyncRedis(server=server), 5).admit(key + "x")

    assert asyncio.run(stranger()) is None  # an unknown key is not counted
    assert r.get(window) == b"180"
    error = limits.exhausted(5)
    assert error.status == 429 and error.code == "RESOURCE_EXHAUSTED"
    assert error.headers["Retry-After"] == "1" and "5 requests a second" in error.detail


def test_cached_keys_cost_no_round_trip_and_a_revocation_drops_them(
        server: fakeredis.FakeServer, monkeypatch: pytest.MonkeyPatch) -> None:
    r = fakeredis.FakeRedis(server=server)
    key, record = keys.create(r, "svc", ("*",), {"read"})
    calls = []
    real = limits.admit

    async def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(args[2])
        return await real(*args, **kwargs)

    monkeypatch.setattr(limits, "admit", counted)
    # Leases are per second: one clock second for the whole test, so a loaded machine
    # crossing a second boundary between the admits does not take a third lease.
    monkeypatch.setattr(admission_module, "time", SimpleNamespace(
        time=lambda: 1_700_000_000.25, monotonic=time.monotonic))

    async def scenario() -> None:
        admission = Admission(fakeredis.FakeAsyncRedis(server=server), 1000)  # leases of 20
        listener = asyncio.create_task(admission.listen())
        for _ in range(500):  # generous: a loaded CI machine
            if admission.listening:
                break
            await asyncio.sleep(0.01)
        assert admission.listening
        for _ in range(30):
            admitted = await admission.admit(key)
            assert admitted is not None and admitted.key == record and not admitted.over
        assert calls == [20, 20]  # one script call per lease, none in between
        read = await admission.admit(key, job_id="job-1")  # a job read asks Redis...
        assert read is not None and read.owner is None and calls[-1] == 0  # ...uncounted
        keys.revoke(r, "svc")  # published: dropped before the next request
        for _ in range(500):
            if not admission._keys:
                break
            await asyncio.sleep(0.01)
        assert await admission.admit(key) is None
        listener.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listener
        assert not admission.listening

    asyncio.run(scenario())


def test_admit_reads_a_jobs_owner_in_the_same_call(server: fakeredis.FakeServer) -> None:
    r = fakeredis.FakeRedis(server=server)
    key, record = keys.create(r, "svc", ("digits",), {"read"})
    r.set(keys.owner_key("job-1"), record.id)

    async def owner(job_id: str) -> str | None:
        a: Any = fakeredis.FakeAsyncRedis(server=server)
        found = await limits.admit(a, key, 1, job_id)
        assert found is not None and found.key == record
        return found.owner

    assert asyncio.run(owner("job-1")) == record.id
    assert asyncio.run(owner("job-2")) is None
    r.script_flush()  # Redis restarted, or SCRIPT FLUSH: loaded again
    assert asyncio.run(owner("job-1")) == record.id


def test_idempotency_reserves_then_replays(server: fakeredis.FakeServer) -> None:
    async def scenario() -> None:
        r: Any = fakeredis.FakeAsyncRedis(server=server)
        mark = limits.fingerprint("digits", b"{}", "/v1/models/{model}/jobs")
        first = await limits.reserve(r, "k1", "order-1", mark, 60)
        assert isinstance(first, limits.Reservation)
        await first.record(r, ["job-1"])
        assert await limits.reserve(r, "k1", "order-1", mark, 60) == ["job-1"]
        # Per API key: another key's same Idempotency-Key is its own.
        assert isinstance(await limits.reserve(r, "k2", "order-1", mark, 60),
                          limits.Reservation)
        other = limits.fingerprint("digits", b"{ }", "/v1/models/{model}/jobs")
        with pytest.raises(Problem, match="another request body"):
            await limits.reserve(r, "k1", "order-1", other, 60)
        # A request that failed releases its reservation: a retry submits.
        failed = await limits.reserve(r, "k1", "order-2", mark, 60)
        assert isinstance(failed, limits.Reservation)
        await failed.release(r)
        assert isinstance(await limits.reserve(r, "k1", "order-2", mark, 60),
                          limits.Reservation)
        with pytest.raises(Problem, match="1 to 255"):
            await limits.reserve(r, "k1", "", mark, 60)
        stored = json.loads(await r.get(first.key))
        assert stored == {"fingerprint": mark, "job_ids": ["job-1"]}
        assert 0 < await r.ttl(first.key) <= 60

    asyncio.run(scenario())


def test_a_repeat_waits_for_the_first_then_gets_its_jobs(server: fakeredis.FakeServer,
                                                         monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    async def scenario() -> None:
        r: Any = fakeredis.FakeAsyncRedis(server=server)
        mark = limits.fingerprint("m", b"x", "/r")
        first = await limits.reserve(r, "k", "same", mark, 60)
        assert isinstance(first, limits.Reservation)
        repeat = asyncio.create_task(limits.reserve(r, "k", "same", mark, 60))
        await asyncio.sleep(0.1)
        assert not repeat.done()  # still submitting: the repeat waits
        await first.record(r, ["a", "b"])
        assert await repeat == ["a", "b"]
        # One still in flight past the wait: 409 ABORTED.
        monkeypatch.setattr(limits, "_IN_FLIGHT_WAIT_S", 0.1)
        await limits.reserve(r, "k", "stuck", mark, 60)
        with pytest.raises(Problem) as info:
            await limits.reserve(r, "k", "stuck", mark, 60)
        assert info.value.status == 409 and info.value.code == "ABORTED"

    asyncio.run(scenario())
