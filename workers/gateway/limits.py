"""Per-key limits shared by every gateway process through Redis: a request rate, and
idempotency keys; and :func:`admit`, which checks a request's API key, takes requests from
its rate and reads the owner of the job it asks for in one script call (see
:mod:`~workers.gateway.admission` for when a request needs it).

Rate: a fixed one-second window per key (``INCRBY`` + ``EXPIRE`` on
``inferq:gw:rate:<key id>:<second>``); past the limit a request is refused with 429 and
``Retry-After`` until the window ends. Idempotency: the first request with an
``Idempotency-Key`` reserves it (``SET NX EX``) before it submits, and records the job IDs
it got; a repeat within the TTL gets the same jobs back and never submits again. A repeat
while the first is still submitting waits for it briefly, then gets 409; a repeat with a
different body gets 400.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any

import redis

from workers.gateway import keys
from workers.gateway.problems import Problem

RATE_PREFIX = "inferq:gw:rate:"
IDEMPOTENCY_PREFIX = "inferq:gw:idem:"
#: How long a repeat waits for the first request with its key to finish submitting.
_IN_FLIGHT_WAIT_S = 5.0


#: One round trip: the key's record (nothing more for an unknown key), a lease of
#: ``ARGV[3]`` requests taken from this second's count of the key's requests (0: none),
#: and the owner of a job when a second key is given. KEYS: the rate window, [the job's
#: owner]; ARGV: the key hash, the digest, the lease. The key hash is named in ARGV, not
#: KEYS: EVALSHA's keys need write access, and the gateway's Redis user may only read its
#: API keys (the HGET inside is checked against that read-only grant).
_ADMIT = """
local record = redis.call('HGET', ARGV[1], ARGV[2])
if not record then return false end
local lease = tonumber(ARGV[3])
local count = 0
if lease > 0 then
  count = redis.call('INCRBY', KEYS[1], lease)
  if count == lease then redis.call('EXPIRE', KEYS[1], 2) end
end
local owner = false
if KEYS[2] then owner = redis.call('GET', KEYS[2]) end
return {record, count, owner}
"""
_ADMIT_SHA = hashlib.sha1(_ADMIT.encode()).hexdigest()
#: Parsed key records by their stored JSON (a revoked key's record is never read again).
_records: dict[bytes, keys.ApiKey] = {}


@dataclass(frozen=True)
class Found:
    """A key's record, the window's count after this lease, and the owner (a key ID) of the
    job asked for."""

    key: keys.ApiKey
    count: int
    owner: str | None


async def admit(r: Any, token: str, lease: int, job_id: str | None = None,
                window: int | None = None) -> Found | None:
    """Authenticate ``token``, take ``lease`` requests (0: none) from its rate window of
    this second (or ``window``), and read ``job_id``'s owner: one script call (``r``: a
    ``redis.asyncio.Redis``). None for an unknown or revoked key (nothing counted)."""
    digest = keys.digest(token)
    second = int(time.time()) if window is None else window
    names = [window_key(digest, second)]
    if job_id is not None:
        names.append(keys.owner_key(job_id))
    args = ("EVALSHA", _ADMIT_SHA, len(names), *names, keys.KEYS_KEY, digest, int(lease))
    try:
        reply = await r.execute_command(*args)
    except redis.exceptions.NoScriptError:  # a restarted Redis, or SCRIPT FLUSH
        await r.script_load(_ADMIT)
        reply = await r.execute_command(*args)
    if not reply:
        return None
    raw, count, owner = reply
    key = _records.get(raw)
    if key is None:
        if len(_records) > 10_000:
            _records.clear()
        key = _records[raw] = keys.ApiKey.from_document(raw)
    return Found(key, int(count), owner.decode() if owner is not None else None)


def window_key(digest: str, second: int) -> str:
    """The count of one API key's requests in one second (its ID: the digest's prefix)."""
    return f"{RATE_PREFIX}{digest[:16]}:{second}"


def exhausted(per_second: int) -> Problem:
    """429 RESOURCE_EXHAUSTED with ``Retry-After``: the key's requests of this second are
    spent."""
    now = time.time()
    retry = max(1, round(int(now) + 1 - now + 0.5))
    return Problem("RESOURCE_EXHAUSTED", f"rate limit of {per_second} requests a second for "
                   f"this API key; retry after {retry} s", headers={"Retry-After": str(retry)})


def fingerprint(model: str, body: bytes, route: str) -> str:
    """What a repeat must match: the route, the model and the exact body."""
    h = hashlib.sha256()
    for part in (route.encode(), model.encode(), body):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()


@dataclass
class Reservation:
    """An Idempotency-Key this request owns: record its jobs, or release it on failure."""

    key: str
    fingerprint: str
    ttl_s: int

    async def record(self, r: Any, job_ids: list[str]) -> None:
        doc = {"fingerprint": self.fingerprint, "job_ids": job_ids}
        await r.set(self.key, json.dumps(doc), ex=self.ttl_s)

    async def release(self, r: Any) -> None:
        await r.unlink(self.key)  # UNLINK: the producer's grant; the gateway has no DEL


async def reserve(r: Any, key_id: str, idempotency_key: str, fingerprint: str, ttl_s: int
                  ) -> Reservation | list[str]:
    """Reserve ``idempotency_key`` for this request (a :class:`Reservation`), or the job IDs
    an earlier request with the same key and body got."""
    if not idempotency_key or len(idempotency_key) > 255:
        raise Problem("INVALID_ARGUMENT", "Idempotency-Key must be 1 to 255 characters")
    digest = hashlib.sha256(idempotency_key.encode()).hexdigest()
    key = f"{IDEMPOTENCY_PREFIX}{key_id}:{digest}"
    pending = json.dumps({"fingerprint": fingerprint, "job_ids": None})
    deadline = time.monotonic() + _IN_FLIGHT_WAIT_S
    while True:
        if await r.set(key, pending, nx=True, ex=ttl_s):
            return Reservation(key, fingerprint, ttl_s)
        raw = await r.get(key)
        if raw is None:
            continue  # released or expired between the two calls: try again
        doc = json.loads(raw)
        if doc.get("fingerprint") != fingerprint:
            raise Problem("INVALID_ARGUMENT", "this Idempotency-Key was used with another "
                          "request body or model; use a new key for a new request")
        if doc.get("job_ids") is not None:
            return list(doc["job_ids"])
        if time.monotonic() > deadline:
            raise Problem("ABORTED", "a request with this Idempotency-Key is still being "
                          "submitted; retry in a moment", headers={"Retry-After": "1"})
        await asyncio.sleep(0.05)
