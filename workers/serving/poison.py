"""Counting the executions of redelivered jobs, so a job that kills its worker every time
ends as POISONED in the dead-letter list instead of looping forever.

The first execution, in a normal batch, is not counted (it cost no round trip); a job whose
message comes back after a crash runs alone and is counted each time.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import redis

from producer import wire
from producer.errors import Poisoned
from workers.ops import deadletter


class PoisonGuard:
    """Counts executions in Redis (``inferq:attempts:<job id>``), expiring with results."""

    def __init__(self, client: redis.Redis, max_executions: int, ttl_s: int) -> None:
        self.client = client
        self.max_executions = max_executions
        self.ttl_s = ttl_s

    def check(self, job_id: str, model: str, version: int,
              inputs: Mapping[str, np.ndarray[Any, Any]]) -> Poisoned | None:
        """Count one more execution of a redelivered job; past the limit, dead-letter it
        and return its error (the job must then not run)."""
        key = wire.attempts_key(job_id)
        pipe = self.client.pipeline(transaction=False)
        pipe.incr(key)
        pipe.expire(key, self.ttl_s)
        executions = int(pipe.execute()[0]) + 1
        if executions <= self.max_executions:
            return None
        error = Poisoned(
            f"the job was started {executions - 1} times and its worker died each time; "
            "it is in the dead-letter list (inferq dlq show)", job_id=job_id, model=model)
        deadletter.add(self.client, deadletter.job_entry(
            job_id, model, version, inputs, error.code, error.message))
        return error
