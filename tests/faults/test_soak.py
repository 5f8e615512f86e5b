"""Steady load with chaos: a worker SIGKILLed, Redis SIGKILLed and restarted (R28, scaled).

Two minutes by default; ``--long`` stretches it to ten, repeats the chaos every two
minutes, deletes results once they have been read twice (a client consuming them), and
reports worker RSS and Redis ``used_memory`` growth.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from producer import wire
from producer.errors import InferqError
from producer.wire import read_result as parse_result
from tests.faults.harness import (
    LABELS,
    Figures,
    Ledger,
    Rig,
    X,
    alive,
    in_flight,
    kill_while_holding,
    quiesced,
    wait_for,
)
from workers.launch.redisproc import RedisServer

pytestmark = [pytest.mark.faults, pytest.mark.soak]


class Auditor(threading.Thread):
    """Reads every accepted job's result as it appears (checking it), reads it again
    ``recheck`` seconds later (a result must never change), and optionally deletes it
    then, as a client that consumed it would. A deleted result that comes back means the
    job ran again after it was done: a duplicate visible result."""

    def __init__(self, url: str, ledger: Ledger, *, recheck: float, delete: bool) -> None:
        super().__init__(name="auditor", daemon=True)
        self.r = redis.Redis.from_url(url, socket_timeout=5)
        self.ledger, self.recheck, self.delete = ledger, recheck, delete
        self.first_seen: dict[str, float] = {}
        self.digest: dict[str, bytes] = {}
        self.failed: dict[str, str] = {}
        self.wrong: set[str] = set()
        self.changed: set[str] = set()
        self.verified: set[str] = set()
        self.deleted: list[str] = []
        self._cursor = 0
        self._unseen: list[str] = []
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=60)

    def run(self) -> None:
        while not self._stop_event.wait(0.2):
            try:
                self.sweep()
            except redis.exceptions.ConnectionError:
                continue  # Redis is down (chaos): read again when it is back

    def sweep(self, final: bool = False) -> None:
        ids = self.ledger.ids
        self._unseen += ids[self._cursor:]
        self._cursor = len(ids)
        now = time.monotonic()
        still = []
        for start in range(0, len(self._unseen), 2000):
            chunk = self._unseen[start:start + 2000]
            for job_id, raw in zip(chunk, self.r.mget([wire.result_key(i) for i in chunk]),
                                   strict=True):
                if raw is None:
                    still.append(job_id)
                    continue
                self.first_seen[job_id] = now
                self.digest[job_id] = hashlib.blake2b(raw, digest_size=16).digest()
                outcome = parse_result(job_id, raw)
                if isinstance(outcome, InferqError):
                    self.failed[job_id] = outcome.code
                elif int(outcome["label"][0]) != int(LABELS[self.ledger.rows[job_id] % len(X)]):
                    self.wrong.add(job_id)
        self._unseen = still
        due = [i for i, t in self.first_seen.items()
               if i not in self.verified and (final or now - t >= self.recheck)]
        for start in range(0, len(due), 2000):
            chunk = due[start:start + 2000]
            for job_id, raw in zip(chunk, self.r.mget([wire.result_key(i) for i in chunk]),
                                   strict=True):
                if raw is None or hashlib.blake2b(raw, digest_size=16).digest() != \
                        self.digest[job_id]:
                    self.changed.add(job_id)
            self.verified.update(chunk)
            if self.delete and not final:
                self.r.delete(*[wire.result_key(i) for i in chunk])
                self.deleted += chunk

    def caught_up(self) -> bool:
        """Every job accepted so far has been seen with a result."""
        return not self._unseen and self._cursor == len(self.ledger)

    def reappeared(self) -> int:
        """Deleted results that exist again."""
        ids = self.deleted
        return sum(1 for start in range(0, len(ids), 2000)
                   for raw in self.r.mget([wire.result_key(i)
                                           for i in ids[start:start + 2000]])
                   if raw is not None)


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def test_soak_with_chaos(redis_factory: type[RedisServer], rig_for: Callable[..., Rig],
                         figures: Figures, request: pytest.FixtureRequest,
                         tmp_path: Path) -> None:
    """Steady load (32 jobs every 100 ms) against 2 workers; at ~30 s a worker is SIGKILLed
    (right after a burst of 1,024 jobs, so that it holds some) and restarted; at ~70 s
    redis-server is SIGKILLed and restarted on its AOF (``appendfsync always``: nothing
    acknowledged may be lost). At the end: 0 lost, 0 duplicate visible results (every
    result read twice, identical), ``unacked`` empty."""
    long = bool(request.config.getoption("--long", default=False))
    # FAULTS_SOAK_SECONDS shortens or stretches either mode (to try the --long code quickly).
    duration = float(os.environ.get("FAULTS_SOAK_SECONDS") or (600 if long else 120))
    server = redis_factory(appendonly=True, extra_args=["--appendfsync", "always"],
                           directory=tmp_path / "redis").start()
    rig = rig_for(server.url, socket_timeout=5)
    r, ledger = rig.r, rig.ledger
    workers = rig.workers(2)
    auditor = Auditor(rig.url, ledger, recheck=20.0, delete=long)
    started = time.monotonic()
    load = rig.load(jobs_per_call=32, interval=0.1)
    auditor.start()
    request.addfinalizer(auditor.stop)
    worker_kills: list[tuple[float, float | None]] = []  # (kill time, recovery s)
    redis_restarts: list[tuple[float, float | None]] = []  # (back time, resume s)
    rss: dict[int, list[int]] = {}
    memory: list[int] = []
    cycle = 120.0
    next_worker_kill, next_redis_kill = started + 30, started + 70
    pending_kills: list[tuple[float, list[str]]] = []
    pending_restarts: list[float] = []
    orphaned: list[int] = []
    while (now := time.monotonic()) - started < duration:
        if now >= next_worker_kill:
            workers[0], kill_at, orphans, _ = kill_while_holding(
                r, workers[0], rig.worker, provoke=rig.burst)
            orphaned.append(orphans)
            pending_kills.append((kill_at, ledger.accepted_between(0, kill_at)))
            next_worker_kill += cycle
        if now >= next_redis_kill:
            server.kill()
            server.start()
            pending_restarts.append(time.monotonic())
            next_redis_kill += cycle
        for kill_at, before in list(pending_kills):
            if all(i in auditor.first_seen for i in before):
                worker_kills.append((kill_at, max(auditor.first_seen[i]
                                                  for i in before) - kill_at))
                pending_kills.remove((kill_at, before))
        for back in list(pending_restarts):
            after = [t for i, t in auditor.first_seen.items()
                     if ledger.accepted_at[i] >= back]
            if after:
                redis_restarts.append((back, min(after) - back))
                pending_restarts.remove(back)
        if now - started >= 20 and int(now - started) % 10 == 0:
            for w in filter(alive, workers):
                rss.setdefault(w.pid, []).append(_rss_kb(w.pid))
            memory.append(int(r.info("memory")["used_memory"]))
        time.sleep(0.5)
    load.stop()
    wait_for(auditor.caught_up, 60, "every accepted job's result")
    auditor.stop()
    wait_for(lambda: quiesced(r), 30, "queue drained and nothing in flight")
    auditor.sweep(final=True)
    for kill_at, _ in pending_kills:
        worker_kills.append((kill_at, None))
    for back in pending_restarts:
        redis_restarts.append((back, None))
    lost = len(ledger) - len(auditor.first_seen) + len(auditor.failed)
    growth = {pid: round((v[-1] - v[0]) / max(1, v[0]) * 100, 1)
              for pid, v in rss.items() if len(v) >= 2}
    figures(duration_s=duration, accepted=len(ledger), refused=dict(ledger.rejected),
            jobs_per_s=len(ledger) / duration, lost=lost, wrong=len(auditor.wrong),
            failed=sorted(set(auditor.failed.values())),
            changed_results=len(auditor.changed),
            reappeared_results=auditor.reappeared(),
            messages_orphaned_by_kills=orphaned,
            worker_kill_recovery_s=[None if s is None else round(s, 2)
                                    for _, s in worker_kills],
            redis_restart_resume_s=[None if s is None else round(s, 2)
                                    for _, s in redis_restarts],
            unacked_at_quiesce=in_flight(r),
            worker_rss_growth_pct=growth,
            worker_rss_kb={pid: (v[0], v[-1]) for pid, v in rss.items()},
            redis_used_memory_mb=(round(memory[0] / 2**20, 1),
                                  round(memory[-1] / 2**20, 1)) if memory else None)
    assert not load.errors, load.errors[:3]
    assert lost == 0
    assert not auditor.wrong and not auditor.changed and auditor.reappeared() == 0
    assert in_flight(r) == 0
    assert worker_kills and all(s is not None and s <= 30 for _, s in worker_kills)
    assert redis_restarts and all(s is not None and s <= 10 for _, s in redis_restarts)
