"""A Redis outage, told once: a warning when it starts (naming the Redis, password masked),
a reminder at most every ``every_s`` while it lasts, a line when it ends, and a growing
wait between retries, so an unreachable Redis does not flood the logs."""

from __future__ import annotations

import time
from typing import Any

from producer.wire.connect import masked


class Outage:
    """Tracks one component's failing calls to one Redis."""

    def __init__(self, log: Any, what: str, url: str, *, every_s: float = 30.0,
                 first_delay_s: float = 0.05, max_delay_s: float = 5.0) -> None:
        self.log, self.what, self.url = log, what, masked(url)
        self.every_s = every_s
        self.first_delay_s, self.max_delay_s = first_delay_s, max_delay_s
        self.since: float | None = None
        self._told = 0.0
        self._delay = first_delay_s
        self.failures = 0

    @property
    def ongoing(self) -> bool:
        return self.since is not None

    def failed(self, exc: BaseException, **fields: Any) -> float:
        """Note a failed call; return how long to wait before the next try."""
        now = time.monotonic()
        self.failures += 1
        if self.since is None:
            self.since, self._told = now, now
            self.log.warning("redis_unreachable", what=self.what, redis=self.url,
                             error=str(exc), hint="check INFERQ_BROKER_URL / "
                             "INFERQ_RESULT_URL and that Redis is up; retrying", **fields)
        elif now - self._told >= self.every_s:
            self._told = now
            self.log.warning("redis_still_unreachable", what=self.what, redis=self.url,
                             for_s=round(now - self.since, 1), failures=self.failures,
                             error=str(exc), **fields)
        delay = self._delay
        self._delay = min(self._delay * 2, self.max_delay_s)
        return delay

    def recovered(self) -> None:
        """Note a call that worked; says so once if an outage was going on."""
        if self.since is not None:
            self.log.info("redis_reachable_again", what=self.what, redis=self.url,
                          after_s=round(time.monotonic() - self.since, 1),
                          failures=self.failures)
        self.since, self.failures, self._delay = None, 0, self.first_delay_s
