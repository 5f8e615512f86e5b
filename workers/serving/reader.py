"""Reading a model's queue from Redis: many messages per round trip.

Messages stay in the format of kombu's Redis transport: a popped message is recorded in
kombu's ``unacked`` hash and ``unacked_index`` sorted set in the same atomic step, so the
sweep every Celery worker runs puts it back on its queue if this process dies before the
ack. Unlike kombu, the pop and the record are one Lua script, so no crash window loses a
message between them. Acks are the result writer's (:mod:`workers.serving.writer`).
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import redis

from producer.wire import UNACKED, UNACKED_INDEX, now, priority_queues

# KEYS: unacked, unacked_index, queue lists in priority order.
# ARGV: max messages, now, tag prefix, queue name, max messages from the last (lowest
# priority) list, bytes of blobs the reply may carry. A tag ends with '@' and the index of
# the list its message came from. Returns tag, message and [key, value, ...] of the blobs
# the message's inferq_blobs header names (at most 64, only keys under inferq:blob:; the
# header is JSON in kombu's envelope, which a quote inside a string value cannot fake) that
# fit in what is left of the bytes (large blobs would block Redis while the script copies
# them: the worker reads those with MGET), for each message not of the last list; then how
# many wait.
_DRAIN = """
local budget = tonumber(ARGV[6])
local function blobs(m)
  local out = {}
  -- Plain finds, not a pattern: a pattern match walks the whole message (tensors under
  -- the blob threshold travel inside it) at about 4 ns a byte, Redis blocked meanwhile.
  local marker = '"inferq_blobs":['
  local at = string.find(m, marker, 1, true)
  if not at then return out end
  local close = string.find(m, ']', at + #marker, true)
  if not close then return out end
  local list = string.sub(m, at + #marker, close - 1)
  local names = {}
  for key in string.gmatch(list, '"(inferq:blob:[^"]*)"') do
    if #names == 64 then break end
    local size = redis.call('STRLEN', key)
    if size > 0 and size <= budget then
      budget = budget - size
      names[#names + 1] = key
    end
  end
  if #names == 0 then return out end
  local got = redis.call('MGET', unpack(names))
  for i, key in ipairs(names) do
    out[#out + 1] = key
    out[#out + 1] = got[i]
  end
  return out
end
local want = tonumber(ARGV[1])
local out = {}
for k = 3, #KEYS do
  if k == #KEYS then want = math.min(want, tonumber(ARGV[5])) end
  if want <= 0 then break end
  local got = redis.call('RPOP', KEYS[k], want)
  if got then
    for _, m in ipairs(got) do
      local tag = ARGV[3] .. (#out + 1) .. '@' .. (k - 3)
      redis.call('HSET', KEYS[1], tag, '[' .. m .. ', "", "' .. ARGV[4] .. '"]')
      redis.call('ZADD', KEYS[2], ARGV[2], tag)
      out[#out + 1] = tag
      out[#out + 1] = m
      if k < #KEYS then
        out[#out + 1] = blobs(m)
      else
        -- A batch job's blobs (its rows: large) are read with MGET, outside Lua: copied
        -- into a script they cost Redis ~1 ms a MB, every other client waiting.
        out[#out + 1] = {}
      end
    end
    want = want - #got
  end
end
local left = 0
local last = #KEYS
if tonumber(ARGV[5]) <= 0 then last = #KEYS - 1 end
for k = 3, last do
  left = left + redis.call('LLEN', KEYS[k])
end
out[#out + 1] = left
return out
"""

#: A drained message: its delivery tag, its bytes, and the blobs its header names (key:
#: value, None for a key that is gone), read in the same round trip.
Drained = tuple[str, bytes, Mapping[str, bytes | None]]

_NO_BLOBS: Mapping[str, bytes | None] = MappingProxyType({})


#: Bytes of blobs one drain brings with its messages; larger ones are read with MGET.
DRAIN_BLOB_BYTES = 256 * 1024

#: A delivery tag ends with ``@<n>``: the message came from the queue's n-th priority list.
LEVEL_SEP = "@"


#: While priority lists were used this recently (seconds), a wait blocks in steps of
#: ``PRIORITY_POLL_S`` and looks at them between steps, so batch jobs never stall for long.
PRIORITY_ACTIVE_S = 10.0
PRIORITY_POLL_S = 0.02


class QueueReader:
    """Drains one Celery queue in bulk, recording what it takes as in flight."""

    def __init__(self, client: redis.Redis, queue: str) -> None:
        self.client = client
        self.queue = queue
        self._keys = [UNACKED, UNACKED_INDEX, *priority_queues(queue)]
        self._lists = priority_queues(queue)
        self._background_suffix = f"{LEVEL_SEP}{len(self._lists) - 1}"
        self._plain_suffix = f"{LEVEL_SEP}0"
        self._drain = client.register_script(_DRAIN)
        self._prefix = f"inferq-{uuid.uuid4().hex[:12]}-"
        self._priority_seen = -1e9
        self._calls = itertools.count()
        #: The connection (and arguments) of a drain sent whose reply is not read yet.
        self._sent: tuple[Any, int, int | None] | None = None

    def wait(self, timeout: float) -> bool:
        """Block until the queue is non-empty (or ``timeout``), without taking anything.

        It blocks on the main list with ``BLMOVE queue queue RIGHT RIGHT``, which returns its
        oldest message and puts it back where it was (order unchanged). Redis cannot block
        on several lists without popping, so while priority lists are in use (a batch run)
        it blocks in short steps and looks at every list between them (one round trip);
        otherwise it looks at the priority lists only when the block times out, so an idle
        worker pays one round trip per job, not two, and a message sent with a priority
        after a quiet spell waits for the next look (at most ``timeout``).
        """
        deadline = time.monotonic() + timeout
        while True:
            now = time.monotonic()
            left = deadline - now
            if left > 0 and now - self._priority_seen >= PRIORITY_ACTIVE_S:
                # redis-py types the timeout as int; Redis >= 6 takes fractional seconds.
                if self.client.blmove(self.queue, self.queue, left, "RIGHT", "RIGHT"  # type: ignore[arg-type]
                                      ) is not None:
                    return True
                left = 0.0
            pipe = self.client.pipeline(transaction=False)
            for key in self._lists:
                pipe.llen(key)
            counts = pipe.execute()
            now = time.monotonic()
            if any(counts[1:]):
                self._priority_seen = now
            if any(counts):
                return True
            left = min(left, deadline - now)
            if left <= 0:
                return False
            moved = self.client.blmove(self.queue, self.queue, min(left, PRIORITY_POLL_S),  # type: ignore[arg-type]
                                       "RIGHT", "RIGHT")
            if moved is not None:
                return True

    def wait_drain(self, timeout: float, max_messages: int, max_background: int | None = None
                   ) -> tuple[list[Drained], int] | None:
        """:meth:`wait`, then :meth:`drain` when the queue has work; None when it stayed
        empty for ``timeout``.

        While priority lists are not in use, the block and the drain go in one round trip:
        Redis runs a pipelined command once the blocking one before it returns, so the
        drain pops the message that woke the block (or, after a timeout, looks at every
        list). The drain's delivery time is then when the wait began (at most ``timeout``
        early: kombu's sweep would put such a message back that much sooner).
        """
        if time.monotonic() - self._priority_seen < PRIORITY_ACTIVE_S:
            return self.drain(max_messages, max_background) if self.wait(timeout) else None
        pipe = self.client.pipeline(transaction=False)
        # redis-py types the timeout as int; Redis >= 6 takes fractional seconds.
        pipe.blmove(self.queue, self.queue, timeout, "RIGHT", "RIGHT")  # type: ignore[arg-type]
        args = self._args(max_messages, max_background)
        pipe.execute_command(*self._evalsha(args))  # type: ignore[no-untyped-call]
        moved, flat = pipe.execute(raise_on_error=False)
        if isinstance(moved, Exception):
            raise moved
        if isinstance(flat, redis.exceptions.NoScriptError):
            # Redis lost its scripts (a restart): nothing was drained; the plain call
            # loads the script.
            drained, left = self.drain(max_messages, max_background)
        elif isinstance(flat, Exception):
            raise flat
        else:
            drained, left = _parsed(flat)
        if any(not self.level_zero(tag) for tag, _, _ in drained):
            self._priority_seen = time.monotonic()
        if moved is None and not drained:
            return None
        return drained, left

    def level_zero(self, tag: str) -> bool:
        """Whether the message drained under ``tag`` came from the queue's plain list."""
        return tag.endswith(self._plain_suffix)

    def drain(self, max_messages: int, max_background: int | None = None
              ) -> tuple[list[Drained], int]:
        """Pop up to ``max_messages`` (oldest first, higher priorities first) and record
        them as unacknowledged; at most ``max_background`` of them from the lowest-priority list
        (batch runs), any number when None.

        Returns the messages (each with the blobs its header names) and how many are still
        waiting (in the lists it may take from), so the caller knows the queue is empty
        without asking again.
        """
        flat: list[Any] = self._drain(keys=self._keys,
                                      args=self._args(max_messages, max_background))
        return _parsed(flat)

    def send_drain(self, max_messages: int, max_background: int | None = None) -> None:
        """Send a :meth:`drain` and return without its reply, which :meth:`read_drain`
        reads: the round trip overlaps whatever the caller does meanwhile (a model run)."""
        assert self._sent is None, "one drain in flight at a time"
        args = self._args(max_messages, max_background)
        conn = self.client.connection_pool.get_connection()
        self._sent = (conn, max_messages, max_background)
        try:
            conn.send_command(*self._evalsha(args))  # type: ignore[no-untyped-call]
        except BaseException:
            self._release(disconnect=True)
            raise

    def read_drain(self) -> tuple[list[Drained], int]:
        """The reply of the drain :meth:`send_drain` sent (as :meth:`drain` returns it)."""
        assert self._sent is not None, "no drain in flight"
        conn, max_messages, max_background = self._sent
        try:
            flat = conn.read_response()
        except redis.exceptions.NoScriptError:
            # Redis lost its scripts (a restart): nothing ran; the plain call loads it.
            self._release()
            return self.drain(max_messages, max_background)
        except BaseException:
            self._release(disconnect=True)
            raise
        self._release()
        return _parsed(flat)

    @property
    def drain_in_flight(self) -> bool:
        return self._sent is not None

    def _release(self, disconnect: bool = False) -> None:
        conn = self._sent[0] if self._sent is not None else None
        self._sent = None
        if conn is not None:
            if disconnect:
                # Its reply may still come: the connection is not reusable.
                conn.disconnect()
            self.client.connection_pool.release(conn)

    def _evalsha(self, args: list[Any]) -> list[Any]:
        """The drain as an ``EVALSHA`` command, to send on a connection or a pipeline."""
        return ["EVALSHA", self._drain.sha, len(self._keys), *self._keys, *args]

    def _args(self, max_messages: int, max_background: int | None) -> list[Any]:
        prefix = f"{self._prefix}{next(self._calls)}-"
        most = max(1, max_messages)
        return [most, now(), prefix, self.queue,
                most if max_background is None else max_background, DRAIN_BLOB_BYTES]

    def background(self, tag: str) -> bool:
        """Whether the message drained under ``tag`` came from the lowest-priority list
        (batch runs): background work that online jobs go ahead of."""
        return tag.endswith(self._background_suffix)


def _parsed(flat: list[Any]) -> tuple[list[Drained], int]:
    left = int(flat.pop())
    out = []
    for i in range(0, len(flat), 3):
        pairs = flat[i + 2]
        blobs = ({pairs[j].decode(): pairs[j + 1] for j in range(0, len(pairs), 2)}
                 if pairs else _NO_BLOBS)
        out.append((flat[i].decode(), flat[i + 1], blobs))
    return out, left
