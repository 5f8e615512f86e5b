"""The worker's queue reader against a real redis-server: the idle wait and the first
drain in one round trip (Redis runs the pipelined drain once the blocking BLMOVE returns)."""

from __future__ import annotations

import threading
import time

import pytest
import redis

from producer import wire
from workers.launch.redisproc import RedisServer
from workers.serving.reader import QueueReader

pytestmark = pytest.mark.integration

QUEUE = "inferq.reader-test"


@pytest.fixture
def r(redis_server: RedisServer) -> redis.Redis:
    client = redis.Redis.from_url(redis_server.url, socket_timeout=10)
    client.delete(QUEUE, *wire.priority_queues(QUEUE)[1:])
    return client


def test_a_message_pushed_during_the_wait_comes_back_drained(r: redis.Redis) -> None:
    reader = QueueReader(r, QUEUE)
    pusher = threading.Timer(0.2, lambda: r.lpush(QUEUE, b'{"m": 1}', b'{"m": 2}'))
    pusher.start()
    started = time.monotonic()
    found = reader.wait_drain(5.0, 8)
    pusher.join()
    assert found is not None and time.monotonic() - started < 4.0
    drained, left = found
    assert [raw for _, raw, _ in drained] == [b'{"m": 1}', b'{"m": 2}'] and left == 0
    tags = [tag for tag, _, _ in drained]
    # Taken as any drain takes: recorded as unacknowledged, gone from the queue.
    assert set(r.hkeys(wire.UNACKED)) >= {t.encode() for t in tags}
    assert r.llen(QUEUE) == 0
    r.hdel(wire.UNACKED, *tags)
    r.zrem(wire.UNACKED_INDEX, *tags)


def test_an_empty_wait_times_out_and_a_lost_script_is_loaded_again(r: redis.Redis) -> None:
    reader = QueueReader(r, QUEUE)
    started = time.monotonic()
    assert reader.wait_drain(0.2, 8) is None
    assert time.monotonic() - started >= 0.15
    r.lpush(QUEUE, b'{"m": 3}')
    r.script_flush()  # as after a restart: the pipelined EVALSHA finds no script
    found = reader.wait_drain(1.0, 8)
    assert found is not None and [raw for _, raw, _ in found[0]] == [b'{"m": 3}']
    tags = [tag for tag, _, _ in found[0]]
    r.hdel(wire.UNACKED, *tags)
    r.zrem(wire.UNACKED_INDEX, *tags)


def test_a_message_on_a_priority_list_is_drained_when_the_block_times_out(
        r: redis.Redis) -> None:
    reader = QueueReader(r, QUEUE)
    r.lpush(wire.priority_queues(QUEUE)[2], b'{"m": 4}')
    found = reader.wait_drain(0.1, 8)
    assert found is not None and [raw for _, raw, _ in found[0]] == [b'{"m": 4}']
    tags = [tag for tag, _, _ in found[0]]
    assert not reader.level_zero(tags[0])
    # Priority lists are in use now: the next waits poll every list in short steps.
    started = time.monotonic()
    pusher = threading.Timer(0.1, lambda: r.lpush(wire.priority_queues(QUEUE)[1], b'{"m": 5}'))
    pusher.start()
    again = reader.wait_drain(5.0, 8)
    pusher.join()
    assert again is not None and [raw for _, raw, _ in again[0]] == [b'{"m": 5}']
    assert time.monotonic() - started < 2.0
    tags += [tag for tag, _, _ in again[0]]
    r.hdel(wire.UNACKED, *tags)
    r.zrem(wire.UNACKED_INDEX, *tags)
