"""Liveness and limits of a worker process: heartbeat, health file, batch watchdog, recycling.

``inferq check`` reads the health file this module refreshes; it needs no Redis round trip
and no reply from the (possibly busy) Celery pool, so it never flaps during a long batch.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import redis
import structlog

from producer import wire
from workers.serving.outage import Outage
from workers.settings import Settings

log = structlog.get_logger(__name__)

HEARTBEAT_S = 5.0
_TICK_S = 0.25


class Served(Protocol):
    """What the monitor reads from each model server."""

    name: str
    batch_started: float | None
    jobs_done: int


def health_file(hostname: str) -> Path:
    """Where a worker keeps its health record (``$INFERQ_HEALTH_FILE`` overrides)."""
    override = os.environ.get("INFERQ_HEALTH_FILE")
    safe = hostname.replace("/", "_")
    return Path(override) if override else Path(tempfile.gettempdir()) / f"inferq-{safe}.json"


def check(path: Path, max_age_s: float = 3 * HEARTBEAT_S) -> tuple[bool, str]:
    """Whether the worker that writes ``path`` is ready and alive, and why not."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return False, f"no health record at {path} (worker not started or not ready yet)"
    age = time.time() - float(doc.get("updated", 0))
    if age > max_age_s:
        return False, f"health record is {age:.0f}s old (limit {max_age_s:.0f}s)"
    try:
        os.kill(int(doc["pid"]), 0)
    except (OSError, KeyError, ValueError):
        return False, f"worker process {doc.get('pid')} is gone"
    failed = doc.get("failed") or {}
    not_ready = "; ".join(f"{m} not ready: {why}" for m, why in sorted(failed.items()))
    if not doc.get("ready"):
        why = doc.get("reason") or "worker is not consuming"
        return False, why + (f" ({not_ready})" if not_ready else "")
    served = ", ".join(doc.get("models", [])) or "nothing"
    return True, f"ready: {doc.get('hostname')} serving {served}" + (
        f"; {not_ready}" if not_ready else "")


class Monitor:
    """Runs in its own thread of the worker process until ``stop`` is set."""

    def __init__(self, settings: Settings, hostname: str, servers: Sequence[Served],
                 client: redis.Redis, stop: threading.Event,
                 signatures: Mapping[str, str] | None = None,
                 failed: Mapping[str, str] | None = None,
                 sweeper: Callable[[], None] | None = None) -> None:
        #: Model signatures advertised with every heartbeat, so producers can check jobs
        #: again after Redis lost its data.
        self.signatures: dict[Any, Any] = dict(signatures or {})
        #: Models (or "model vN") this worker could not load, with the reason.
        self.failed = dict(failed or {})
        #: Runs on every heartbeat (the sweep of queues no worker will ever serve).
        self.sweeper = sweeper
        self.settings = settings
        self.hostname = hostname
        self.servers = servers
        self.client = client
        self.stop = stop
        self.path = health_file(hostname)
        self._warned: set[int] = set()
        self._recycling = False
        self._lock = threading.Lock()
        #: Models this worker stopped serving while running: out of their live sets.
        self._withdrawn: frozenset[str] = frozenset()
        self._changed = threading.Event()
        #: Set once the first heartbeat was sent (or refused): model servers take jobs only
        #: then, so the worker's own records are written before its results fill Redis.
        self.first_beat = threading.Event()
        self.outage = Outage(log, "heartbeat", settings.broker_url, every_s=60.0)

    def run(self) -> None:
        next_beat = 0.0
        # The first heartbeat at once, not a tick later: model servers wait for it.
        while True:
            self._watch_batches()
            self._maybe_recycle()
            if time.monotonic() >= next_beat:
                try:
                    self._beat(ready=bool(self.servers))
                finally:
                    self.first_beat.set()
                if self.sweeper is not None and not self.outage.ongoing:
                    self.sweeper()
                next_beat = time.monotonic() + HEARTBEAT_S
            elif self._changed.is_set():
                self._beat(ready=bool(self.servers))  # what is advertised changed
            if self.stop.wait(_TICK_S):
                break
        self._beat(ready=False)
        with contextlib.suppress(redis.exceptions.RedisError):
            # Stop advertising at once: producers then refuse new jobs for these models
            # instead of queueing them for nobody (unless they opt into queueing).
            pipe = self.client.pipeline(transaction=False)
            pipe.delete(wire.worker_key(self.hostname))
            for model in self.signatures:
                pipe.zrem(wire.live_key(model), self.hostname)
            pipe.execute()
        self.path.unlink(missing_ok=True)

    def advertise(self, model: str, signature: str | None) -> None:
        """Advertise ``model`` with ``signature`` from now on (None: stop advertising it),
        within a tick rather than at the next heartbeat."""
        with self._lock:  # replaced whole: the heartbeat reads them without the lock
            signatures = dict(self.signatures)
            if signature is None:
                signatures.pop(model, None)
                self._withdrawn = self._withdrawn | {model}
            else:
                signatures[model] = signature
                self._withdrawn = self._withdrawn - {model}
            self.signatures = signatures
        self._changed.set()

    def set_failed(self, key: str, reason: str | None) -> None:
        """Record (or clear, with None) why ``key`` (a model, or "model vN") is not served."""
        failed = dict(self.failed)
        if reason is None:
            failed.pop(key, None)
        else:
            failed[key] = reason
        self.failed = failed
        self._changed.set()

    def _watch_batches(self) -> None:
        limit = self.settings.batch_time_limit_s
        now = time.monotonic()
        for server in self.servers:
            started = server.batch_started
            if started is None:
                continue
            running = now - started
            if running > limit:
                log.critical("batch_time_limit", model=server.name, running_s=round(running, 1),
                             limit_s=limit)
                sys.stderr.flush()
                # A hung native call cannot be interrupted: only the process can go. Its
                # messages stay unacked and come back; a job that always hangs is poisoned.
                os._exit(70)
            if running > 0.8 * limit and id(started) not in self._warned:
                self._warned.add(id(started))
                log.warning("batch_soft_time_limit", model=server.name,
                            running_s=round(running, 1), limit_s=limit)

    def _maybe_recycle(self) -> None:
        cap = self.settings.max_jobs_per_process
        if cap and not self._recycling and sum(s.jobs_done for s in self.servers) >= cap:
            self._recycling = True
            log.info("recycling_process", jobs=sum(s.jobs_done for s in self.servers), cap=cap)
            os.kill(os.getpid(), signal.SIGTERM)  # warm shutdown; the supervisor restarts us

    def _fleet(self, signatures: Mapping[str, str]) -> dict[Any, Any]:
        """``signatures`` with each model's versions cut to those every live worker serving
        it advertises: a job pinned to a version is accepted only when any worker that may
        take it has that version warm (while a version rolls out, or goes)."""
        now = wire.now()
        pipe = self.client.pipeline(transaction=False)
        for model in signatures:
            pipe.zrangebyscore(wire.live_key(model), now, "+inf")
        live = [{h.decode() if isinstance(h, bytes) else str(h) for h in hosts}
                for hosts in pipe.execute()]
        others = sorted(set().union(*live) - {self.hostname})
        docs: list[Any] = self.client.mget([wire.worker_key(h) for h in others]) if others else []
        theirs: dict[str, dict[str, Any]] = {}
        for host, raw in zip(others, docs, strict=True):
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                theirs[host] = dict(json.loads(raw).get("versions") or {})
        out: dict[Any, Any] = {}
        for (model, signature), hosts in zip(signatures.items(), live, strict=True):
            doc = json.loads(signature)
            shared = set(doc.get("versions", []))
            for host in hosts - {self.hostname}:
                if model in theirs.get(host, {}):  # a worker that does not say: no limit
                    shared &= set(theirs[host][model])
            if shared:  # disjoint workers: each advertises its own, as before
                doc["versions"] = sorted(shared)
            out[model] = json.dumps(doc)
        return out

    def _beat(self, ready: bool) -> None:
        self._changed.clear()
        with self._lock:
            signatures, withdrawn = self.signatures, self._withdrawn
        models = sorted({s.name for s in self.servers})
        doc = {"hostname": self.hostname, "pid": os.getpid(), "models": models,
               "failed": self.failed, "device": self.settings.device, "ready": ready,
               "updated": time.time(),
               # What this worker has warm: the others advertise only what all of them do.
               "versions": {m: json.loads(sig).get("versions", [])
                            for m, sig in signatures.items()}}
        if not self.servers:
            doc["reason"] = (f"no model to serve in {self.settings.model_dir} (add one: "
                             "inferq models add PATH.onnx --name NAME)")
        if ready:
            try:
                advertised = self._fleet(signatures) if signatures else {}
                pipe = self.client.pipeline(transaction=False)
                if advertised:
                    pipe.hset(wire.MODELS_KEY, mapping=advertised)
                now = wire.now()
                for model in withdrawn:
                    pipe.zrem(wire.live_key(model), self.hostname)
                for model in signatures:
                    # This worker serves the model until its heartbeat expires; workers
                    # that died without saying so fall out of the set here.
                    pipe.zadd(wire.live_key(model), {self.hostname: now + wire.HEARTBEAT_TTL_S})
                    pipe.zremrangebyscore(wire.live_key(model), "-inf", now)
                pipe.set(wire.worker_key(self.hostname), json.dumps(doc),
                         ex=wire.HEARTBEAT_TTL_S)
                pipe.execute()
                if self.outage.ongoing:
                    self.outage.recovered()
            except redis.exceptions.RedisError as exc:
                # Not ready while Redis is unreachable: `inferq check` says why.
                self.outage.failed(exc)
                doc.update(ready=False, reason=f"Redis at {self.outage.url} is unreachable: "
                                               f"{exc}")
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc))
        tmp.replace(self.path)  # atomic: a reader never sees half a record
