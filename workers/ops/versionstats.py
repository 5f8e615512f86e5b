"""Recent figures per model version, for guardrails: jobs that succeeded or failed, and a
fixed-bucket histogram of their latency (end to end: enqueued, else picked up, to the end
of the batch's model run; a job refused before a batch counts as failed, without latency).

Every model server counts its jobs in memory (:class:`VersionStats`, an observer of the
serving loop) and adds them to Redis from the result writer's thread at most every
``flush_s``, in one pipelined round trip, as ``HINCRBY`` into minute buckets
``inferq:vstats:<model>:<version>:<epoch_minute>`` that expire after an hour. Readers sum
the buckets of the last minutes (:func:`read_window`): ``inferq promote`` compares the
candidate with the current version (:func:`review`), and every worker's heartbeat checks
the guards of the routes it serves (:func:`check_guards`) and rolls a breached split back.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import redis
import structlog

from producer.errors import JobFailed
from producer.wire.routes import Guard, Route
from workers.serving.observers import Batch, Observer, Outcome

if TYPE_CHECKING:
    from workers.ops.metrics import LifecycleMetrics
    from workers.serving.routing import RouteBook

log = structlog.get_logger(__name__)

KEY_PREFIX = "inferq:vstats:"
#: Seconds a minute bucket is kept: the longest window a guard or promote can read.
TTL_S = 3600
#: Upper bounds (ms) of the latency buckets, 0.5 ms to about 60 s, each 25% above the last
#: (a quantile read from them is within a few % of the true one); one more bucket holds
#: everything above.
LATENCY_MS = tuple(round(0.5 * 1.25**i, 3) for i in range(54))
FIELDS = ("ok", "failed", *(f"l{i}" for i in range(len(LATENCY_MS) + 1)))
_BOUNDS = np.asarray(LATENCY_MS, dtype=np.float64)
_OK, _FAILED, _L0 = 0, 1, 2


def stats_key(model: str, version: int, minute: int) -> str:
    return f"{KEY_PREFIX}{model}:{version}:{minute}"


def bucket(latency_s: float) -> int:
    """The index (into the latency buckets) of a latency in seconds."""
    ms = latency_s * 1000.0
    for i, bound in enumerate(LATENCY_MS):
        if ms <= bound:
            return i
    return len(LATENCY_MS)


@dataclass
class Window:
    """Jobs of one version over some minutes."""

    ok: int = 0
    failed: int = 0
    latency: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_MS) + 1))

    @property
    def jobs(self) -> int:
        return self.ok + self.failed

    @property
    def error_rate(self) -> float:
        return self.failed / self.jobs if self.jobs else 0.0

    def add(self, counts: Sequence[int]) -> None:
        self.ok += counts[_OK]
        self.failed += counts[_FAILED]
        for i, n in enumerate(counts[_L0:]):
            self.latency[i] += n

    def quantile_ms(self, q: float) -> float | None:
        """The ``q`` quantile of latency (ms), interpolated inside its bucket as Prometheus'
        ``histogram_quantile`` does; None without a timed job. Above the last bound, the
        last bound."""
        total = sum(self.latency)
        if not total:
            return None
        rank, seen = q * total, 0
        for i, n in enumerate(self.latency):
            if n and seen + n >= rank:
                if i == len(LATENCY_MS):
                    return float(LATENCY_MS[-1])
                low = 0.0 if i == 0 else float(LATENCY_MS[i - 1])
                return low + (LATENCY_MS[i] - low) * (rank - seen) / n
            seen += n
        return float(LATENCY_MS[-1])

    def describe(self) -> str:
        p99 = self.quantile_ms(0.99)
        return (f"{self.jobs} jobs, error rate {self.error_rate:.1%}, p99 "
                + ("-" if p99 is None else f"{p99:.1f} ms"))


def read_window(client: redis.Redis, model: str, version: int, minutes: int,
                now: float | None = None, since: float = 0.0) -> Window:
    """Sum of the last ``minutes`` minute buckets (this one included) of a version, none
    older than the minute of ``since``; one round trip."""
    this = int((time.time() if now is None else now) // 60)
    first = max(this - max(1, minutes) + 1, int(since // 60))
    pipe = client.pipeline(transaction=False)
    for minute in range(first, this + 1):
        pipe.hmget(stats_key(model, version, minute), list(FIELDS))
    window = Window()
    for row in pipe.execute():
        window.add([int(v) if v is not None else 0 for v in row])
    return window


class VersionStats(Observer):
    """Counts one model server's jobs per version and minute; :meth:`handoff` adds them to
    Redis from the writer thread at most every ``flush_s``."""

    def __init__(self, client: redis.Redis, model: str, flush_s: float = 1.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.client, self.model, self.flush_s, self.clock = client, model, flush_s, clock
        self._lock = threading.Lock()
        self._pending: dict[tuple[int, int], list[int]] = {}
        self._last_flush = 0.0
        self._batch: Batch | None = None
        #: The running batch's job IDs, built at its first failure only (failures are rare).
        self._batch_ids: set[str] | None = None

    def _counts(self, version: int, minute: int) -> list[int]:
        counts = self._pending.get((version, minute))
        if counts is None:
            counts = self._pending[(version, minute)] = [0] * len(FIELDS)
        return counts

    def batch_started(self, batch: Batch) -> None:
        self._batch, self._batch_ids = batch, None

    def batch_done(self, batch: Batch, outcomes: Sequence[Outcome]) -> None:
        minute = int(batch.finished // 60)
        failed = sum(1 for o in outcomes if isinstance(o, JobFailed))
        # One pass in numpy: this runs on the model thread for every batch.
        ms = (batch.finished - np.fromiter(
            (p.job.enqueued_at or p.picked_at for p in batch.jobs), np.float64,
            len(batch.jobs))) * 1000.0
        latency = np.bincount(np.searchsorted(_BOUNDS, ms, side="left"),
                              minlength=len(LATENCY_MS) + 1)
        with self._lock:
            counts = self._counts(batch.version, minute)
            counts[_OK] += len(outcomes) - failed
            counts[_FAILED] += failed
            for i, n in enumerate(latency.tolist()):
                counts[_L0 + i] += n
        self._batch = self._batch_ids = None

    def job_failed(self, job_id: str, error: JobFailed, version: int | None) -> None:
        # Jobs failing inside a batch are reported here and to batch_done: count them once,
        # there, with their latency.
        if version is None:
            return
        if self._batch is not None:
            if self._batch_ids is None:
                self._batch_ids = {p.job.id for p in self._batch.jobs}
            if job_id in self._batch_ids:
                return
        with self._lock:
            self._counts(version, int(self.clock() // 60))[_FAILED] += 1

    def handoff(self) -> Callable[[], None] | None:
        if not self._pending or self.clock() - self._last_flush < self.flush_s:
            return None
        self._last_flush = self.clock()
        return self.flush

    def flush(self) -> None:
        """Add what was counted since the last flush to Redis (one pipelined round trip).
        Best effort: figures that Redis refused are dropped, never retried into a burst."""
        with self._lock:
            pending, self._pending = self._pending, {}
        if not pending:
            return
        pipe = self.client.pipeline(transaction=False)
        for (version, minute), counts in pending.items():
            key = stats_key(self.model, version, minute)
            for name, n in zip(FIELDS, counts, strict=True):
                if n:
                    pipe.hincrby(key, name, n)
            pipe.expire(key, TTL_S)
        try:
            pipe.execute()
        except redis.exceptions.RedisError as exc:
            log.debug("version_stats_not_stored", model=self.model, error=str(exc))


@dataclass
class Review:
    """A candidate's recent figures against the current version's, and why (if at all) the
    candidate should not be promoted."""

    model: str
    candidate: int
    current: int
    candidate_window: Window
    current_window: Window
    window_min: int
    refusals: list[str] = field(default_factory=list)

    @property
    def compared(self) -> bool:
        return self.candidate_window.jobs > 0 and self.candidate != self.current

    def describe(self) -> str:
        return (f"v{self.candidate}: {self.candidate_window.describe()}; current "
                f"v{self.current}: {self.current_window.describe()} "
                f"(last {self.window_min} min)")


def judge(candidate: Window, current: Window, max_error_increase: float,
          max_p99_increase: float) -> list[str]:
    """Why a candidate with these figures should not replace the current version (empty:
    it may). Nothing is judged without candidate jobs."""
    if not candidate.jobs:
        return []
    refusals = []
    if candidate.error_rate > current.error_rate + max_error_increase:
        refusals.append(f"error rate {candidate.error_rate:.1%} vs {current.error_rate:.1%} "
                        f"(allowed +{max_error_increase:.1%})")
    mine, theirs = candidate.quantile_ms(0.99), current.quantile_ms(0.99)
    if mine is not None and theirs is not None and mine > theirs * (1 + max_p99_increase):
        refusals.append(f"p99 {mine:.1f} ms vs {theirs:.1f} ms "
                        f"(allowed +{max_p99_increase:.0%})")
    return refusals


def review(client: redis.Redis, model: str, candidate: int, current: int, window_min: int,
           max_error_increase: float, max_p99_increase: float) -> Review:
    """Read both versions' last ``window_min`` minutes and judge the candidate."""
    now = time.time()
    mine = read_window(client, model, candidate, window_min, now)
    theirs = read_window(client, model, current, window_min, now)
    refusals = ([] if candidate == current
                else judge(mine, theirs, max_error_increase, max_p99_increase))
    return Review(model, candidate, current, mine, theirs, window_min, refusals)


def breaches(guard: Guard, window: Window) -> list[str]:
    """What a version's window breaches of ``guard`` (empty below its minimum of jobs)."""
    if window.jobs < guard.min_jobs:
        return []
    out = []
    if guard.error_rate is not None and window.error_rate > guard.error_rate:
        out.append(f"error rate {window.error_rate:.1%} > {guard.error_rate:.1%}")
    p99 = window.quantile_ms(0.99)
    if guard.p99_ms is not None and p99 is not None and p99 > guard.p99_ms:
        out.append(f"p99 {p99:.1f} ms > {guard.p99_ms:g} ms")
    return out


def check_guards(routes: RouteBook, stats: Sequence[VersionStats],
                 metrics: LifecycleMetrics | None, worker: str = "") -> list[Route]:
    """On a heartbeat: store counts not flushed yet, then roll back each guarded split whose
    non-baseline version breaches its guard. The rollback expects the route's revision, so
    when several workers see the same breach one rolls back and the others find the route
    changed. Returns the routes this worker restored."""
    try:
        return _check_guards(routes, stats, metrics, worker)
    except redis.exceptions.RedisError as exc:
        log.debug("route_guard_not_checked", error=str(exc))  # the outage is logged elsewhere
        return []
    except Exception as exc:
        # Runs on the heartbeat thread: a guard that cannot be checked now is checked at
        # the next beat, and the heartbeat goes on.
        log.warning("route_guard_not_checked", error=repr(exc))
        return []


def _check_guards(routes: RouteBook, stats: Sequence[VersionStats],
                  metrics: LifecycleMetrics | None, worker: str) -> list[Route]:
    from workers.ops import routes as route_ops

    for s in stats:
        s.flush()
    restored = []
    for model in routes.models:
        route = routes.get(model)
        if route is None or route.guard is None or len(route.split) < 2:
            continue
        baseline = route.baseline()
        for version in sorted(v for v, w in route.split.items() if w > 0 and v != baseline):
            window = read_window(routes.client, model, version, route.guard.window_min,
                                 since=route.at)
            reasons = breaches(route.guard, window)
            if not reasons:
                continue
            back = route_ops.rollback(routes.client, model, by=f"guard@{worker}",
                                      expected_rev=route.rev,
                                      note=f"guard: v{version} " + "; ".join(reasons))
            if back is not None:
                log.warning("route_rolled_back", model=model, version=version,
                            rev=route.rev, route=route.describe(), to=back.describe(),
                            reasons=reasons, jobs=window.jobs, failed=window.failed,
                            error_rate=round(window.error_rate, 4),
                            p99_ms=window.quantile_ms(0.99))
                if metrics is not None:
                    metrics.route_rolled_back(model)
                restored.append(back)
            routes.refresh([model])
            break
    return restored

