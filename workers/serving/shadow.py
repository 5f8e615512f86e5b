"""Shadow runs: a sample of a model's jobs also goes through a shadow version, off the
results path, and the two versions' outputs are compared per job. Nothing the shadow
computes is ever stored as a result.

The model thread only picks the sampled jobs of a finished batch (by a hash of the job ID,
so the same job is always in or out); once the batch's results are stored, the writer
thread appends them to a bounded backlog (:meth:`ShadowObserver.handoff`); when the backlog
is full a job is dropped and counted, so a slow shadow never delays a batch. One
daemon thread per model server takes what waits (several jobs as one model run), runs the
shadow version (looked up in the server's loaded versions at run time), compares
(:func:`compare`), and records: Prometheus ``inferq_shadow_*`` and, in one pipelined round
trip, counters per model and shadow version (``inferq:shadow:<model>:<version>``) and the
most different jobs (a sorted set ``...:top`` by max absolute difference, trimmed).
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson
import redis
import structlog

from producer.errors import JobFailed
from workers.serving.batching import Arrays, collate, split
from workers.serving.observers import Batch, Observer, Outcome

if TYPE_CHECKING:
    from workers.ops.metrics import LifecycleMetrics
    from workers.serving.routing import RouteBook
    from workers.serving.runtime import LoadedModel

log = structlog.get_logger(__name__)

KEY_PREFIX = "inferq:shadow:"
#: Jobs kept in the sample of the most different ones, per model and shadow version.
TOP = 50
#: Seconds the shadow counters and sample live after their last update.
TTL_S = 7 * 86_400
#: Jobs waiting for the shadow thread at most; more are dropped (and counted).
BACKLOG = 512
#: Seconds the shadow thread lets sampled jobs gather into one run (fewer, larger runs
#: cost less per row; nobody waits for a shadow's answer).
LINGER_S = 0.25


def stats_key(model: str, version: int) -> str:
    return f"{KEY_PREFIX}{model}:{version}"


def top_key(model: str, version: int) -> str:
    return f"{KEY_PREFIX}{model}:{version}:top"


def sampled(job_id: str, rate: float) -> bool:
    """Whether ``job_id`` is in a ``rate`` sample: the same answer for the same job, and
    independent of the hash that splits traffic between versions."""
    if rate >= 1.0:
        return True
    if rate <= 0.0:
        return False
    digest = hashlib.blake2b(job_id.encode(), digest_size=8, person=b"inferq-shadow").digest()
    return int.from_bytes(digest, "big") / 2**64 < rate


def is_label(array: np.ndarray[Any, Any]) -> bool:
    """An output of one integer per row: a class label."""
    return bool(np.issubdtype(array.dtype, np.integer)
                and (array.ndim == 1 or (array.ndim == 2 and array.shape[1] == 1)))


@dataclass
class Diff:
    """How a shadow version's outputs for one job differ from the primary's."""

    #: Per output: (max absolute difference, mean absolute difference).
    outputs: dict[str, tuple[float, float]] = field(default_factory=dict)
    #: Per label output: (primary labels, shadow labels), as lists.
    labels: dict[str, tuple[list[int], list[int]]] = field(default_factory=dict)

    @property
    def max_abs(self) -> float:
        """The largest difference over the outputs that are not labels (all, if every one
        is a label)."""
        values = [v[0] for k, v in self.outputs.items() if k not in self.labels]
        values = values or [v[0] for v in self.outputs.values()]
        return max(values, default=0.0)

    def labels_agree(self) -> bool | None:
        """Whether every label matched (None without label outputs)."""
        if not self.labels:
            return None
        return all(p == s for p, s in self.labels.values())


def compare(primary: Arrays, shadow: Arrays) -> Diff:
    """Compare one job's outputs output by output; an output the other lacks, or of another
    shape, is as different as can be (``inf``)."""
    diff = Diff()
    for name, mine in primary.items():
        theirs = shadow.get(name)
        if theirs is None or theirs.shape != mine.shape:
            diff.outputs[name] = (float("inf"), float("inf"))
            continue
        if is_label(mine) and is_label(theirs):
            diff.labels[name] = (mine.reshape(-1).tolist(), theirs.reshape(-1).tolist())
        if mine.size == 0:
            diff.outputs[name] = (0.0, 0.0)
            continue
        a, b = mine.astype(np.float64), theirs.astype(np.float64)
        delta = np.abs(a - b)
        nan = np.isnan(delta)
        if nan.any():
            # NaN in both is the same answer; NaN in one of them is as different as can be.
            delta = np.where(np.isnan(a) & np.isnan(b), 0.0, np.where(nan, np.inf, delta))
        diff.outputs[name] = (float(delta.max()), float(delta.mean()))
    return diff


@dataclass
class ShadowJob:
    """A job the primary version answered, waiting for the shadow version."""

    job_id: str
    inputs: Arrays
    primary: Arrays
    primary_version: int
    shadow_version: int
    rows: int
    #: Model compute seconds per row of the primary batch.
    primary_row_s: float
    queued_at: float = field(default_factory=time.monotonic)


class ShadowObserver(Observer):
    """Samples one model server's answered jobs for its route's shadow version and compares
    them on a thread of its own."""

    def __init__(self, model: str, routes: RouteBook | None, client: redis.Redis,
                 metrics: LifecycleMetrics | None, stop: threading.Event, *,
                 backlog: int = BACKLOG, max_rows: int = 256, top: int = TOP,
                 ttl_s: int = TTL_S, linger_s: float = LINGER_S) -> None:
        self.model, self.routes, self.client, self.metrics = model, routes, client, metrics
        self.stop, self.max_rows, self.top, self.ttl_s = stop, max(1, max_rows), top, ttl_s
        self.linger_s = linger_s
        self.capacity = backlog
        self.backlog: deque[ShadowJob] = deque()
        #: Sampled jobs of batches whose results are not stored yet (model thread only).
        self._staged: list[ShadowJob] = []
        #: The server's loaded versions, looked up at every run (versions come and go).
        self.versions: Callable[[], Mapping[int, LoadedModel]] = dict
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._dropped: dict[int, int] = {}
        self._lock = threading.Lock()
        self._missing_logged: set[int] = set()

    def bind(self, versions: Callable[[], Mapping[int, LoadedModel]]) -> None:
        """Where to find the loaded versions when a shadow run starts."""
        self.versions = versions

    # --- model thread --------------------------------------------------------------------

    def batch_done(self, batch: Batch, outcomes: Sequence[Outcome]) -> None:
        route = self.routes.get(self.model) if self.routes is not None else None
        shadow = route.shadow if route is not None else None
        if shadow is None or shadow.version == batch.version:
            return
        row_s = (batch.finished - batch.started) / max(1, batch.rows)
        for pending, outcome in zip(batch.jobs, outcomes, strict=True):
            if not isinstance(outcome, JobFailed) and sampled(pending.job.id, shadow.sample):
                self._staged.append(ShadowJob(pending.job.id, pending.inputs, outcome,
                                              batch.version, shadow.version, pending.rows,
                                              row_s))

    def handoff(self) -> Callable[[], None] | None:
        # The sampled jobs reach the shadow thread only once their results are stored.
        if not self._staged:
            return None
        staged, self._staged = self._staged, []
        return lambda: self.admit(staged)

    # --- writer thread -------------------------------------------------------------------

    def admit(self, jobs: Sequence[ShadowJob]) -> None:
        """Queue ``jobs`` for the shadow thread; those beyond the backlog are dropped."""
        room = max(0, self.capacity - len(self.backlog))
        self.backlog.extend(jobs[:room])
        dropped: dict[int, int] = {}
        for job in jobs[room:]:
            dropped[job.shadow_version] = dropped.get(job.shadow_version, 0) + 1
        for version, n in dropped.items():
            with self._lock:
                self._dropped[version] = self._dropped.get(version, 0) + n
            if self.metrics is not None:
                self.metrics.shadow_outcome(self.model, version, "dropped", n)
        if room and jobs:
            if self._thread is None:
                self._thread = threading.Thread(target=self.run, daemon=True,
                                                name=f"inferq-shadow-{self.model}")
                self._thread.start()
            self._wake.set()

    # --- shadow thread -------------------------------------------------------------------

    def run(self) -> None:
        """Compare what waits until ``stop`` is set."""
        while not self.stop.is_set():
            if not self.backlog:
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            waited = time.monotonic() - self.backlog[0].queued_at
            if waited < self.linger_s and sum(j.rows for j in self.backlog) < self.max_rows:
                self.stop.wait(self.linger_s - waited)
                continue
            try:
                self.step()
            except Exception:
                # The shadow is an experiment: whatever goes wrong, serving goes on.
                log.exception("shadow_step_failed", model=self.model)
                time.sleep(0.1)

    def take(self) -> list[ShadowJob]:
        """The waiting jobs that can run as one shadow batch: same shadow version, same
        input names and non-batch shapes, up to ``max_rows`` (at least one job)."""
        first = self.backlog.popleft()
        group, rows = [first], first.rows
        shape = _shape(first.inputs)
        while self.backlog and rows < self.max_rows:
            nxt = self.backlog[0]
            if (nxt.shadow_version != first.shadow_version or _shape(nxt.inputs) != shape
                    or rows + nxt.rows > self.max_rows):
                break
            group.append(self.backlog.popleft())
            rows += nxt.rows
        return group

    def step(self) -> int:
        """Run and compare one group of waiting jobs; return how many were compared."""
        group = self.take()
        version = group[0].shadow_version
        model = self.versions().get(version)
        if model is None:
            if version not in self._missing_logged:
                self._missing_logged.add(version)
                log.warning("shadow_version_not_loaded", model=self.model, version=version)
            self._record(version, group, None, 0.0)
            return 0
        names = list(group[0].inputs)
        started = time.perf_counter()
        try:
            outputs = model.run(collate([j.inputs for j in group], names))
            seconds = time.perf_counter() - started
            per_job = split(outputs, [j.rows for j in group])
        except Exception as exc:
            log.warning("shadow_run_failed", model=self.model, version=version,
                        jobs=len(group), error=str(exc))
            self._record(version, group, None, 0.0)
            return 0
        row_s = seconds / max(1, sum(j.rows for j in group))
        self._record(version, group, per_job, row_s)
        return len(group)

    def _record(self, version: int, group: list[ShadowJob], outputs: list[Arrays] | None,
                row_s: float) -> None:
        with self._lock:
            dropped = self._dropped.pop(version, 0)
        fields: dict[str, float] = {"dropped": dropped}
        scored: list[tuple[float, ShadowJob, Diff]] = []
        if outputs is None:
            fields["failed"] = len(group)
            if self.metrics is not None:
                self.metrics.shadow_outcome(self.model, version, "failed", len(group))
        else:
            fields.update(compared=len(group), rows=sum(j.rows for j in group),
                          labels_compared=0, labels_agree=0, sum_max_diff=0.0,
                          sum_mean_diff=0.0, primary_s=0.0, shadow_s=0.0)
            for job, out in zip(group, outputs, strict=True):
                diff = compare(job.primary, out)
                self._observe(version, job, diff, row_s)
                agree = diff.labels_agree()
                if agree is not None:
                    fields["labels_compared"] += 1
                    fields["labels_agree"] += int(agree)
                means = [m for _, m in diff.outputs.values() if np.isfinite(m)]
                biggest = diff.max_abs
                fields["sum_max_diff"] += biggest if np.isfinite(biggest) else 0.0
                fields["sum_mean_diff"] += max(means, default=0.0)
                fields["primary_s"] += job.primary_row_s * job.rows
                fields["shadow_s"] += row_s * job.rows
                scored.append((biggest if np.isfinite(biggest) else 1e300, job, diff))
        # Only this group's most different jobs can enter the sample.
        scored.sort(key=lambda s: s[0])
        top = {_detail(self.model, job, diff): score for score, job, diff in scored[-self.top:]}
        self._store(version, fields, top)

    def _observe(self, version: int, job: ShadowJob, diff: Diff, row_s: float) -> None:
        if self.metrics is not None:
            self.metrics.shadow_compared(
                self.model, version, diff.labels_agree(),
                {k: v[0] for k, v in diff.outputs.items()
                 if k not in diff.labels and np.isfinite(v[0])}, row_s, job.primary_row_s)

    def _store(self, version: int, fields: Mapping[str, float], top: Mapping[str, float]
               ) -> None:
        stats, best = stats_key(self.model, version), top_key(self.model, version)
        pipe = self.client.pipeline(transaction=False)
        for name, value in fields.items():
            if isinstance(value, float) and not value.is_integer():
                pipe.hincrbyfloat(stats, name, value)
            elif value:
                pipe.hincrby(stats, name, int(value))
        pipe.expire(stats, self.ttl_s)
        if top:
            pipe.zadd(best, dict(top))
            pipe.zremrangebyrank(best, 0, -(self.top + 1))
            pipe.expire(best, self.ttl_s)
        try:
            pipe.execute()
        except redis.exceptions.RedisError as exc:
            log.debug("shadow_stats_not_stored", model=self.model, error=str(exc))


def _shape(inputs: Arrays) -> tuple[tuple[str, tuple[int, ...]], ...]:
    return tuple((name, a.shape[1:]) for name, a in inputs.items())


def _detail(model: str, job: ShadowJob, diff: Diff) -> str:
    """The sorted-set member for one job: everything a person needs to look at it."""
    return orjson.dumps({
        "job_id": job.job_id, "model": model, "primary_version": job.primary_version,
        "shadow_version": job.shadow_version, "rows": job.rows,
        "labels": {k: {"primary": p[:8], "shadow": s[:8]} for k, (p, s) in diff.labels.items()},
        "max_abs_diff": {k: _finite(v[0]) for k, v in diff.outputs.items()},
        "mean_abs_diff": {k: _finite(v[1]) for k, v in diff.outputs.items()},
    }).decode()


def _finite(value: float) -> float | str:
    return value if np.isfinite(value) else str(value)


@dataclass
class Report:
    """The shadow figures of one model and shadow version, as stored."""

    model: str
    version: int
    counts: dict[str, float]
    top: list[tuple[dict[str, Any], float]]


def read_report(client: redis.Redis, model: str, version: int, limit: int = 10) -> Report:
    """Counters and the ``limit`` most different jobs of a shadow version."""
    pipe = client.pipeline(transaction=False)
    pipe.hgetall(stats_key(model, version))
    pipe.zrevrange(top_key(model, version), 0, limit - 1, withscores=True)
    raw, best = pipe.execute()
    counts = {(k.decode() if isinstance(k, bytes) else str(k)): float(v) for k, v in raw.items()}
    top = [(orjson.loads(member), float(score)) for member, score in best]
    return Report(model, version, counts, top)
