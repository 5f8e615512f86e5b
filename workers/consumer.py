"""Reading a model's queue from Redis: many messages per round trip, acked after results.

Messages stay in the format of kombu's Redis transport: a popped message is recorded in
kombu's ``unacked`` hash and ``unacked_index`` sorted set in the same atomic step, so the
sweep every Celery worker runs puts it back on its queue if this process dies before the
ack. Unlike kombu, the pop and the record are one Lua script, so no crash window loses a
message between them.
"""

from __future__ import annotations

import itertools
import time
import uuid
from typing import Any

import redis

from workers import deadletter

UNACKED = "unacked"
UNACKED_INDEX = "unacked_index"
#: kombu's priority sub-queues (steps 3, 6, 9); priority 0 is the plain list.
_PRIORITY_SEP = "\x06\x16"
_PRIORITY_STEPS = (3, 6, 9)

# KEYS: unacked, unacked_index, queue lists in priority order.
# ARGV: max messages, now, tag prefix, queue name.
_DRAIN = """
local want = tonumber(ARGV[1])
local out = {}
for k = 3, #KEYS do
  if want <= 0 then break end
  local got = redis.call('RPOP', KEYS[k], want)
  if got then
    for _, m in ipairs(got) do
      local tag = ARGV[3] .. (#out + 1)
      redis.call('HSET', KEYS[1], tag, '[' .. m .. ', "", "' .. ARGV[4] .. '"]')
      redis.call('ZADD', KEYS[2], ARGV[2], tag)
      out[#out + 1] = tag
      out[#out + 1] = m
    end
    want = want - #got
  end
end
local left = 0
for k = 3, #KEYS do
  left = left + redis.call('LLEN', KEYS[k])
end
out[#out + 1] = left
return out
"""


class QueueReader:
    """Drains one Celery queue in bulk and acknowledges messages by tag."""

    def __init__(self, client: redis.Redis, queue: str) -> None:
        self.client = client
        self.queue = queue
        self._keys = [UNACKED, UNACKED_INDEX, queue] + [
            f"{queue}{_PRIORITY_SEP}{p}" for p in _PRIORITY_STEPS
        ]
        self._drain = client.register_script(_DRAIN)
        self._prefix = f"inferq-{uuid.uuid4().hex[:12]}-"
        self._calls = itertools.count()

    def wait(self, timeout: float) -> bool:
        """Block until the queue is non-empty (or ``timeout``), without taking anything.

        Moving the tail to the head of the same list blocks like BRPOP but leaves the
        message in Redis; the queue was empty a moment ago, so order barely changes.
        """
        # redis-py types the timeout as int; Redis >= 6 takes fractional seconds.
        moved = self.client.blmove(self.queue, self.queue, timeout, "RIGHT", "LEFT")  # type: ignore[arg-type]
        return moved is not None

    def drain(self, max_messages: int) -> tuple[list[tuple[str, bytes]], int]:
        """Pop up to ``max_messages`` (oldest first) and record them as unacknowledged.

        Returns the messages and how many are still waiting, so the caller knows the queue
        is empty without asking again.
        """
        prefix = f"{self._prefix}{next(self._calls)}-"
        flat: list[Any] = self._drain(
            keys=self._keys, args=[max(1, max_messages), time.time(), prefix, self.queue]
        )
        left = int(flat.pop())
        return [(flat[i].decode(), flat[i + 1]) for i in range(0, len(flat), 2)], left

    def dead_letter(self, tag: str, raw: bytes, reason: str) -> None:
        """Move an unreadable message from in-flight to the dead-letter list."""
        deadletter.add(self.client, deadletter.message_entry(tag, self.queue, raw, reason),
                       ("zrem", UNACKED_INDEX, tag), ("hdel", UNACKED, tag))

    def ack(self, tags: list[str], blobs: list[str] | None = None) -> None:
        """Forget delivered messages whose jobs all have results, and their blobs."""
        if tags:
            pipe = self.client.pipeline(transaction=False)
            pipe.zrem(UNACKED_INDEX, *tags)
            pipe.hdel(UNACKED, *tags)
            if blobs:
                pipe.unlink(*blobs)
            pipe.execute()
