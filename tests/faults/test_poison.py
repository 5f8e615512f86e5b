"""A job that kills every process that runs it (reliability.md R19).

The product has no crash hook, and nothing a model does on an input reliably kills an
onnxruntime process without also being an ordinary error. So the test plays the OOM
killer: the poison job is a ~1.5 s job of the slow test model; whenever a worker has held
it for 0.5 s without a result (it is running it), the test SIGKILLs that worker and
starts a replacement, as a supervisor would. Which worker holds it is known exactly: every
worker talks to Redis through its own :class:`~tests.faults.faultproxy.FaultProxy`, and the
proxy sees the tag prefix (``inferq-<12 hex>-``) a worker's queue reader sends with every
drain, so the poison's tag in ``unacked`` names its owner.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import redis

from producer import InferenceClient, wire
from tests.conftest import PY, ROOT, WorkerProcess, python_env
from tests.faults.faultproxy import FaultProxy, Sniffer
from tests.faults.harness import (
    Figures,
    WorkerFactory,
    holding,
    json_doc,
    seconds_per_iteration,
    slow_input,
    wait_for,
    wait_results,
    write_slow_model,
)
from workers.launch.redisproc import RedisServer
from workers.ops import deadletter

pytestmark = pytest.mark.faults

_PREFIX = re.compile(rb"inferq-([0-9a-f]{12})-")


@dataclass
class Stack:
    """A Redis and two workers, each worker behind a proxy of its own."""

    server: RedisServer
    proxies: list[FaultProxy]
    sniffers: list[Sniffer]
    workers: list[WorkerProcess]
    make: WorkerFactory
    repo: Path
    completed_at: dict[str, float] = field(default_factory=dict)

    @property
    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.server.url, socket_timeout=5)

    def owner(self, tag: str) -> int:
        """Index of the worker whose queue reader took the message tagged ``tag``."""
        prefix = tag.split("-")[1].encode()
        firsts = [(s.seen().get(prefix), i) for i, s in enumerate(self.sniffers)]
        seen = sorted((t, i) for t, i in firsts if t is not None)
        assert seen, f"no proxy saw the reader prefix of {tag}"
        return seen[0][1]

    def replace(self, index: int) -> None:
        self.workers[index].kill()
        self.workers[index] = self.make(self.proxies[index].url,
                                        model_dir=self.repo).start()


@contextlib.contextmanager
def _stack(make: WorkerFactory, repo: Path) -> Iterator[Stack]:
    with RedisServer(appendonly=True) as server, contextlib.ExitStack() as stack:
        proxies = [stack.enter_context(FaultProxy(server.port)) for _ in range(2)]
        sniffers = [p.sniff(_PREFIX.pattern, "up") for p in proxies]
        workers = [make(p.url, model_dir=repo).start() for p in proxies]
        yield Stack(server, proxies, sniffers, workers, make, repo)


class _OomKiller(threading.Thread):
    """Kills whichever worker has been running the poison job for ``after`` seconds."""

    def __init__(self, stack: Stack, job_id: str, after: float = 0.5) -> None:
        super().__init__(name="oom-killer", daemon=True)
        self.stack, self.job_id, self.after = stack, job_id, after
        self.deliveries: list[tuple[str, float]] = []
        self.kills: list[float] = []
        self.error: BaseException | None = None
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=30)

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:
            self.error = exc

    def _run(self) -> None:
        r = self.stack.client
        key = wire.result_key(self.job_id)
        seen: set[str] = set()
        while not self._stop_event.wait(0.02):
            tags = [t for t in holding(r, self.job_id) if t not in seen]
            if not tags:
                continue
            tag = tags[0]
            seen.add(tag)
            self.deliveries.append((tag, time.monotonic()))
            held_since = time.monotonic()
            while time.monotonic() - held_since < self.after:
                if r.exists(key) or not holding(r, self.job_id):
                    break  # finished or failed without running: nothing to kill
                time.sleep(0.02)
            else:
                self.kills.append(time.monotonic())
                self.stack.replace(self.stack.owner(tag))


class _Pacer(threading.Thread):
    """Submits ``jobs`` one-iteration jobs, one every ``interval`` s, to every stack at
    the same moments, and records when each completes."""

    def __init__(self, stacks: list[Stack], jobs: int, interval: float) -> None:
        super().__init__(name="pacer", daemon=True)
        self.stacks, self.jobs, self.interval = stacks, jobs, interval
        self.ids: list[list[str]] = [[] for _ in stacks]
        self.submitted_at: dict[str, float] = {}
        self.first_at = self.last_at = 0.0

    def run(self) -> None:
        clients = [InferenceClient(s.server.url, queue_without_workers=True) for s in self.stacks]
        self.first_at = time.monotonic()
        for n in range(self.jobs):
            for ids, client in zip(self.ids, clients, strict=True):
                job_id = client.submit("slow", {"x": slow_input(1)}).id
                self.submitted_at[job_id] = time.monotonic()
                ids.append(job_id)
            time.sleep(max(0.0, self.first_at + (n + 1) * self.interval - time.monotonic()))
        self.last_at = time.monotonic()
        for client in clients:
            client.close()


def _watch_completions(stack: Stack, ids: list[str], stop: threading.Event) -> None:
    r = stack.client
    while not stop.wait(0.05):
        pending = [i for i in list(ids) if i not in stack.completed_at]
        if pending:
            for job_id, raw in zip(pending, r.mget([wire.result_key(i) for i in pending]),
                                   strict=True):
                if raw is not None:
                    stack.completed_at[job_id] = time.monotonic()


def _dlq(url: str, *args: str) -> str:
    out = subprocess.run([PY, "-m", "workers.launch.cli", "dlq", *args], capture_output=True,
                         text=True, timeout=60, cwd=ROOT,
                         env=python_env(INFERQ_BROKER_URL=url))
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_poison_job_is_dead_lettered_and_others_keep_flowing(
    profile_worker: WorkerFactory, figures: Figures, model_repo: Path
) -> None:
    """One poison job among 200 normal jobs on 2 workers: it is started at most 3 times
    (INFERQ_MAX_EXECUTIONS), then fails POISONED and is listed by ``inferq dlq list``;
    ``inferq dlq requeue`` puts it back and, with the killer off, it succeeds.

    Throughput of the other jobs is compared with a clean twin stack (same topology, same
    paced submissions at the same moments, no poison) run *concurrently*, so both see the
    same machine noise: throughput = normal jobs completed between the first submission
    and 2 s after the last one. Jobs that shared the poison's batch are re-run only after
    the visibility timeout and count against the episode.
    """
    write_slow_model(model_repo)
    slow = (model_repo / "slow" / "1" / "model.onnx").read_bytes()
    poison_iterations = int(1.5 / seconds_per_iteration(slow))
    with _stack(profile_worker, model_repo) as episode, \
            _stack(profile_worker, model_repo) as clean:
        pacer = _Pacer([episode, clean], jobs=200, interval=0.13)  # ~26 s of load
        stop = threading.Event()
        watchers = [threading.Thread(target=_watch_completions, args=(s, ids, stop), daemon=True)
                    for s, ids in zip([episode, clean], pacer.ids, strict=True)]
        for thread in watchers:
            thread.start()
        pacer.start()
        wait_for(lambda: len(pacer.ids[0]) >= 10, 10, "the first normal jobs")
        with InferenceClient(episode.server.url, queue_without_workers=True) as client:
            poison = client.submit("slow", {"x": slow_input(poison_iterations)})
        killer = _OomKiller(episode, poison.id)
        killer.start()
        r = episode.client
        try:
            wait_for(lambda: r.exists(wire.result_key(poison.id)), 55,
                     "the poison job's result")
        finally:
            killer.stop()
        poisoned_at = time.monotonic()
        pacer.join(timeout=60)
        window_end = pacer.last_at + 2.0
        wait_for(lambda: time.monotonic() >= window_end, 5, "the end of the window")
        doc = json_doc(r.get(wire.result_key(poison.id)))
        attempts = r.get(deadletter.attempts_key(poison.id))
        listed = _dlq(episode.server.url, "list")
        # Requeue with the killer off: the job runs and succeeds.
        requeued = _dlq(episode.server.url, "requeue", poison.id)
        _, still = wait_results(r, [poison.id], timeout=20)
        after = json_doc(r.get(wire.result_key(poison.id)))
        for s, ids in zip([episode, clean], pacer.ids, strict=True):
            wait_results(s.client, ids, timeout=30)
        stop.set()
        for thread in watchers:
            thread.join(timeout=10)
        in_window = [sum(1 for i in ids if s.completed_at.get(i, float("inf")) <= window_end)
                     for s, ids in zip([episode, clean], pacer.ids, strict=True)]
        done = [sum(1 for i in ids if i in s.completed_at)
                for s, ids in zip([episode, clean], pacer.ids, strict=True)]
        window = window_end - pacer.first_at
        p99 = [float(np.percentile([s.completed_at[i] - pacer.submitted_at[i] for i in ids
                                    if i in s.completed_at], 99)) * 1000
               for s, ids in zip([episode, clean], pacer.ids, strict=True)]
        ratio = in_window[0] / max(1, in_window[1])
        figures(poison_runtime_s=round(poison_iterations * seconds_per_iteration(slow), 2),
                deliveries=len(killer.deliveries), kills=len(killer.kills),
                attempts_counter=attempts.decode() if attempts else None,
                result_code=doc.get("error", {}).get("code"),
                poisoned_after_first_pickup_s=poisoned_at - killer.deliveries[0][1]
                if killer.deliveries else None,
                listed_in_dlq=poison.id in listed, requeue_output=requeued.strip(),
                after_requeue=after.get("status"),
                window_s=window, episode_completed_in_window=in_window[0],
                clean_completed_in_window=in_window[1],
                episode_jobs_per_s=in_window[0] / window, clean_jobs_per_s=in_window[1] / window,
                throughput_ratio=ratio, latency_p99_ms_episode_clean=[round(v) for v in p99],
                normal_jobs_done=done, killer_error=killer.error)
    assert killer.error is None, killer.error
    assert len(killer.kills) <= 3 and len(killer.deliveries) <= 4
    assert doc["status"] == "FAILURE" and doc["error"]["code"] == "POISONED"
    assert poison.id in listed and "POISONED" in listed
    assert requeued.strip() == "requeued 1"
    assert not still and after["status"] == "SUCCESS"
    assert done == [200, 200], "a normal job was lost"
    assert ratio >= 0.8
