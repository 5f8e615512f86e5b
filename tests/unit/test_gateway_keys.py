"""API keys (hashed, scoped, revocable), the shared rate limit and idempotency keys, on
fakeredis."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import fakeredis
import pytest

from workers.gateway import keys, limits
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
        return await keys.authenticate(fakeredis.FakeAsyncRedis(server=server), token)

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
    monkeypatch.setattr(limits.time, "time", lambda: 1000.25)  # one window for the burst

    async def burst(n: int, limit: int) -> list[Problem | None]:
        r = fakeredis.FakeAsyncRedis(server=server)
        out: list[Problem | None] = []
        for _ in range(n):
            try:
                await limits.check_rate(r, "k1", limit)
                out.append(None)
            except Problem as exc:
                out.append(exc)
        return out

    answers = asyncio.run(burst(8, 5))
    assert answers[:5] == [None] * 5
    for problem in answers[5:]:
        assert problem is not None and problem.status == 429
        assert problem.code == "RESOURCE_EXHAUSTED" and problem.headers["Retry-After"] == "1"
    assert asyncio.run(burst(3, 0)) == [None] * 3  # 0: no limit
    r = fakeredis.FakeRedis(server=server)
    assert r.keys(limits.RATE_PREFIX + "*") == [b"inferq:gw:rate:k1:1000"]
    assert r.get("inferq:gw:rate:k1:1000") == b"8"  # another process counts on from here


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
