"""Per-key limits shared by every gateway process through Redis: a request rate, and
idempotency keys.

Rate: a fixed one-second window per key (``INCR`` + ``EXPIRE`` in one transaction on
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

from workers.gateway.problems import Problem

RATE_PREFIX = "inferq:gw:rate:"
IDEMPOTENCY_PREFIX = "inferq:gw:idem:"
#: How long a repeat waits for the first request with its key to finish submitting.
_IN_FLIGHT_WAIT_S = 5.0


async def check_rate(r: Any, key_id: str, per_second: int) -> None:
    """Count one request of ``key_id`` in this second's window; refuse past
    ``per_second`` (0: no limit) with 429 RESOURCE_EXHAUSTED and ``Retry-After``."""
    if per_second <= 0:
        return
    now = time.time()
    window = int(now)
    key = f"{RATE_PREFIX}{key_id}:{window}"
    pipe = r.pipeline(transaction=True)
    pipe.incr(key)
    pipe.expire(key, 2)
    count, _ = await pipe.execute()
    if int(count) > per_second:
        retry = max(1, round(window + 1 - now + 0.5))
        raise Problem("RESOURCE_EXHAUSTED",
                      f"rate limit of {per_second} requests a second for this API key; "
                      f"retry after {retry} s", headers={"Retry-After": str(retry)})


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
        await r.delete(self.key)


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
