"""The store script: results, wake-ups of each waiting client, acks, in one round trip."""

from __future__ import annotations

import importlib.util
from typing import Any

import fakeredis
import pytest

from producer import wire
from workers.serving import writer
from workers.serving.writer import ResultStore

pytestmark = pytest.mark.skipif(importlib.util.find_spec("lupa") is None,
                                reason="fakeredis runs Lua scripts only with 'lupa'")


@pytest.fixture
def r() -> Any:
    return fakeredis.FakeRedis()


def test_each_client_is_woken_with_its_own_jobs_in_order(r: Any) -> None:
    owners = ["a", "a", None, "b", "a", "b", "b"]
    docs = [(f"j{i}", b'{"status":"SUCCESS","n":%d}' % i, owner and wire.Notify(owner))
            for i, owner in enumerate(owners)]
    r.hset(wire.UNACKED, mapping={"t1": b"m1", "t2": b"m2"})
    r.zadd(wire.UNACKED_INDEX, {"t1": 1.0, "t2": 2.0})
    r.set("inferq:blob:x", b"data")
    for i in range(len(owners)):
        r.set(wire.accepted_key(f"j{i}"), b"1")
    r.set(wire.result_key("j1"), b"first")  # stored before: the first result wins

    assert ResultStore(r, 600).store(docs, ["t1", "t2"], ["inferq:blob:x"], markers=True) == 6

    assert r.lrange(wire.notify_key("a"), 0, -1) == [b"j0", b"j1", b"j4"]
    assert r.lrange(wire.notify_key("b"), 0, -1) == [b"j3", b"j5", b"j6"]
    assert 0 < r.ttl(wire.notify_key("a")) <= 600
    assert r.get(wire.result_key("j1")) == b"first"
    assert r.get(wire.result_key("j6")) == docs[6][1] and r.ttl(wire.result_key("j6")) > 0
    assert not r.exists(wire.UNACKED, wire.UNACKED_INDEX, "inferq:blob:x")
    assert not any(r.exists(wire.accepted_key(f"j{i}")) for i in range(len(owners)))


def test_a_long_run_of_one_client_is_pushed_in_parts(r: Any, monkeypatch: pytest.MonkeyPatch
                                                     ) -> None:
    monkeypatch.setattr(writer, "_NOTIFY_RUN", 3)
    docs = [(f"j{i}", b"{}", wire.Notify("a")) for i in range(8)]
    assert ResultStore(r, 600).store(docs) == 8
    assert r.lrange(wire.notify_key("a"), 0, -1) == [f"j{i}".encode() for i in range(8)]
