"""Who is calling, usually without a Redis round trip before the work starts.

Each gateway process keeps the API keys it verified (by digest), and each key's requests
left in a lease taken from the shared per-second window. A request whose key is cached
and has a leased request left costs no Redis call; any other makes one script call
(:func:`workers.gateway.limits.admit`) that checks the key, takes the next lease and, for
a job read, returns the job's owner.

Revocation: ``inferq gateway keys revoke`` deletes the key and publishes its digest on
``inferq:gw:keys:revoked``; every gateway process subscribes and drops the key when the
message comes, which is before the next request in practice (the message is delivered while
the command is still exiting). Keys are cached only while that subscription is up (from its
confirmation on; the cache is emptied whenever it drops), and a cached key is verified again
after :data:`MAX_AGE_S` in any case.

Rate: a lease is ``max(1, limit // 50)`` requests (one for limits under 100: small limits are
counted exactly, request by request). Leases come out of the same Redis counter, so every
process together admits at most the limit each second; a lease a process did not use by the
end of its second is lost to the others (at most one lease per process and key).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Any

import structlog

from workers.gateway import keys, limits

log = structlog.get_logger("inferq.gateway")

#: Seconds a cached key is trusted before it is read from Redis again.
MAX_AGE_S = 10.0
#: Keys cached at most (the cache is emptied past it).
MAX_CACHED = 10_000


@dataclass(frozen=True)
class Admitted:
    """A request's key, whether its rate is spent for this second, and the owner (a key ID)
    of the job it reads, when it asked."""

    key: keys.ApiKey
    over: bool
    owner: str | None


class Admission:
    """API keys and rates of one gateway process (``r``: its ``redis.asyncio.Redis``)."""

    def __init__(self, r: Any, per_second: int) -> None:
        self.redis = r
        self.per_second = per_second
        self.lease = max(1, per_second // 50) if per_second > 0 else 0
        self._keys: dict[str, tuple[keys.ApiKey, float]] = {}
        self._left: dict[str, tuple[int, int]] = {}  # digest -> (second, requests left)
        #: Whether revocations reach this process now (keys are cached only then).
        self.listening = False

    async def admit(self, token: str, job_id: str | None = None) -> Admitted | None:
        """``token``'s key and rate, and ``job_id``'s owner when given; None for a key that
        does not exist (or no longer)."""
        digest = keys.digest(token)
        second = int(time.time())
        cached = self._cached(digest)
        leased = self._take(digest, second)
        unlimited = self.per_second <= 0
        if cached is not None and job_id is None and (leased or unlimited):
            return Admitted(cached, False, None)
        lease = 0 if leased or unlimited else self.lease
        listening = self.listening
        found = await limits.admit(self.redis, token, lease, job_id, second)
        if found is None:
            self._keys.pop(digest, None)
            self._left.pop(digest, None)
            return None
        if listening and self.listening:  # no revocation can have been missed meanwhile
            if len(self._keys) >= MAX_CACHED:
                self._keys.clear()
            self._keys[digest] = (found.key, time.monotonic())
        over = False
        if lease:
            granted = min(lease, self.per_second - (found.count - lease))
            over = granted <= 0
            if not over:
                if len(self._left) >= MAX_CACHED:
                    self._left.clear()
                self._left[digest] = (second, granted - 1)
        return Admitted(found.key, over, found.owner)

    def _cached(self, digest: str) -> keys.ApiKey | None:
        if not self.listening:
            return None
        hit = self._keys.get(digest)
        if hit is None or time.monotonic() - hit[1] > MAX_AGE_S:
            return None
        return hit[0]

    def _take(self, digest: str, second: int) -> bool:
        """One request of the key's lease for ``second``, if one is left."""
        held = self._left.get(digest)
        if held is None or held[0] != second or held[1] <= 0:
            return False
        self._left[digest] = (second, held[1] - 1)
        return True

    def forget(self, digest: str) -> None:
        """Drop a revoked key."""
        self._keys.pop(digest, None)
        self._left.pop(digest, None)

    async def listen(self) -> None:
        """Follow revocations until cancelled, resubscribing after a failure (the cache is
        off and empty meanwhile)."""
        while True:
            pubsub = self.redis.pubsub()
            try:
                await pubsub.subscribe(keys.REVOKED_CHANNEL)
                pinged = time.monotonic()
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is None:
                        if time.monotonic() - pinged > 5.0:  # a dead connection shows here
                            await pubsub.ping()
                            pinged = time.monotonic()
                        continue
                    if message["type"] == "subscribe":
                        self._keys.clear()
                        self.listening = True
                    elif message["type"] == "message":
                        self.forget(bytes(message["data"]).decode())
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis away: re-verify every key until it is back
                log.warning("revocations not followed; keys are checked in Redis",
                            error=str(exc))
            finally:
                self.listening = False
                self._keys.clear()
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            await asyncio.sleep(1.0)
