"""One validated settings object per worker process, built from ``INFERQ_*`` variables."""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from producer.wire import DEFAULT_URL, DEFAULT_VISIBILITY_TIMEOUT_S
from producer.wire.connect import require_verified_tls
from workers.errors import SettingsError


def default_model_dir() -> Path:
    """``models/`` beside the source tree, else ``./models``."""
    here = Path(__file__).resolve().parent.parent / "models"
    return here if here.is_dir() else Path.cwd() / "models"


#: cgroup v2's CPU quota of this process's container ("max 100000" when unlimited).
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def usable_cores(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """Cores this process may really use: its CPU affinity (``taskset``, a cpuset), capped by
    its container's CPU quota (``docker run --cpus``), rounded up; ``os.cpu_count()`` counts
    every core of the host, and threads beyond the usable ones only wait for each other."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max" and int(period) > 0:
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 here, or no quota
    return max(1, cores)


def _choice(env: Mapping[str, str], name: str, allowed: tuple[str, ...]) -> str:
    value = env.get(name) or allowed[0]
    if value not in allowed:
        raise SettingsError(f"{name} must be one of {list(allowed)}, got {value!r}")
    return value


@dataclass(frozen=True)
class Settings:
    """Everything a worker process reads from its environment, checked once."""

    broker_url: str = DEFAULT_URL
    result_url: str = DEFAULT_URL
    model_dir: Path = field(default_factory=default_model_dir)
    #: Models this worker serves (``INFERQ_MODELS=a,b``); empty means every model found.
    models: tuple[str, ...] = ()
    #: "cpu" or "cuda"; a cuda worker refuses to start if CUDA is not really active.
    device: str = "cpu"
    #: ONNX Runtime intra-op threads; 0 lets ONNX Runtime pick (all physical cores).
    intra_op_threads: int = 0
    #: Model instances per process: threads that each run whole batches on a shared session,
    #: so one instance decodes and stores while another computes.
    instances: int = 1
    #: Seconds a result stays readable.
    result_ttl_s: int = 3600
    #: Seconds before a picked-up but unacknowledged message is delivered again.
    visibility_timeout_s: int = DEFAULT_VISIBILITY_TIMEOUT_S
    #: Seconds between sweeps that give expired unacknowledged messages back to their queue.
    restore_interval_s: float = 5.0
    #: Refuse float inputs holding NaN or Inf (INFERQ_NONFINITE=reject|allow).
    reject_nonfinite: bool = True
    #: Seconds a batch may run: past 80% a warning, past 100% the process exits so its jobs
    #: are redelivered (and a job that always hangs ends up POISONED).
    batch_time_limit_s: float = 60.0
    #: Recycle the process (warm restart by its supervisor) after this many jobs; 0: never.
    max_jobs_per_process: int = 0
    #: "production" refuses a Redis that can lose or evict queued jobs.
    profile: str = "development"
    #: Times a job may be started before it is dead-lettered as POISONED.
    max_executions: int = 3
    #: Largest tensor (bytes) a job may carry.
    max_tensor_bytes: int = 64 * 1024 * 1024
    #: Send per-job task events so Flower shows every job.
    task_events: bool = True
    #: Jobs per second per model that get task events; above it a sample does (0: all).
    events_max_rate: float = 1000.0
    #: While online jobs are about, how long (ms) a background run may take: the trade
    #: between an online job's wait behind batch work and the batch's rows/s.
    background_run_ms: float = 0.5
    #: Seconds a queue of a model no worker registered may hold jobs before they are
    #: answered NOT_FOUND.
    unknown_model_grace_s: float = 30.0
    #: Seconds between rescans of the model repository for versions added or removed (a
    #: change announced by ``inferq models add/remove/reload`` is picked up at once).
    rescan_s: float = 30.0
    #: Seconds a version removed from the repository stays loaded after the last job for it
    #: (while a route names it, it stays loaded regardless).
    unload_grace_s: float = 120.0
    #: Memory (MB) left free when a version is loaded while serving: a version whose
    #: estimated size does not fit in what is available minus this is refused.
    memory_headroom_mb: float = 256.0
    hostname: str = field(default_factory=lambda: f"cpu@{socket.gethostname()}")
    # --- drift (workers/serving/drift.py) ---
    #: Keep live histograms of inputs and outputs for drift (INFERQ_DRIFT=0: off).
    drift: bool = True
    #: Fraction of rows binned for drift (every k-th row, k = round(1 / sample)).
    drift_sample: float = 0.1
    #: Rows a version's reference is built from when it has no profile.json.
    drift_reference_rows: int = 5000
    #: Seconds between writes of the drift counts to Redis.
    drift_flush_s: float = 5.0

    def session_threads(self, instances: int) -> int:
        """ONNX Runtime intra-op threads for one model served by ``instances`` instances.

        The process's threads (``intra_op_threads`` for each of ``self.instances``, or every
        usable core when ONNX Runtime decides) are split between a model's instances, so a
        model with more instances never oversubscribes the cores.
        """
        if instances == self.instances:
            return self.intra_op_threads
        budget = (self.intra_op_threads * self.instances if self.intra_op_threads
                  else usable_cores())
        return max(1, budget // instances)

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "cuda"):
            raise SettingsError(f"INFERQ_DEVICE must be cpu or cuda, got {self.device!r}")
        if self.instances < 1:
            raise SettingsError("INFERQ_INSTANCES must be >= 1")
        if self.intra_op_threads < 0:
            raise SettingsError("INFERQ_INTRA_OP_THREADS must be >= 0 (0: ONNX Runtime decides)")
        if self.result_ttl_s <= 0:
            raise SettingsError("INFERQ_RESULT_TTL must be > 0 seconds")
        if self.background_run_ms <= 0:
            raise SettingsError("INFERQ_BACKGROUND_RUN_MS must be > 0 ms")
        if self.visibility_timeout_s <= 0 or self.restore_interval_s <= 0:
            raise SettingsError("visibility timeout and restore interval must be > 0")
        if self.batch_time_limit_s <= 0:
            raise SettingsError("INFERQ_BATCH_TIME_LIMIT must be > 0 seconds")
        # A message is in flight for its batch wait plus its run; it must be acked well
        # before the visibility timeout, or Redis hands it to a second worker meanwhile.
        if self.visibility_timeout_s < 3 * self.batch_time_limit_s:
            raise SettingsError(
                f"INFERQ_VISIBILITY_TIMEOUT ({self.visibility_timeout_s}s) must be at least 3x "
                f"INFERQ_BATCH_TIME_LIMIT ({self.batch_time_limit_s}s): a batch still running "
                "would be delivered a second time")
        if self.max_jobs_per_process < 0:
            raise SettingsError("INFERQ_MAX_JOBS_PER_PROCESS must be >= 0")
        for url in (self.broker_url, self.result_url):
            try:
                require_verified_tls(url)
            except ValueError as exc:
                raise SettingsError(str(exc)) from None
        if self.max_executions < 1:
            raise SettingsError("INFERQ_MAX_EXECUTIONS must be >= 1")
        if self.rescan_s <= 0:
            raise SettingsError("INFERQ_RESCAN_S must be > 0 seconds")
        if self.unload_grace_s < 0 or self.memory_headroom_mb < 0:
            raise SettingsError("INFERQ_UNLOAD_GRACE_S and INFERQ_MEMORY_HEADROOM_MB must be >= 0")
        if self.max_tensor_bytes <= 0:
            raise SettingsError("INFERQ_MAX_TENSOR_BYTES must be > 0")
        if not 0 < self.drift_sample <= 1:
            raise SettingsError("INFERQ_DRIFT_SAMPLE must be in (0, 1]")
        if self.drift_reference_rows < 1 or self.drift_flush_s <= 0:
            raise SettingsError("INFERQ_DRIFT_REFERENCE_ROWS must be >= 1 and "
                                "INFERQ_DRIFT_FLUSH > 0 seconds")
        for url in (self.broker_url, self.result_url):
            if not url.startswith(("redis://", "rediss://", "unix://")):
                raise SettingsError(f"only Redis URLs are supported, got {url!r}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Build settings from ``env`` (default ``os.environ``)."""
        env = os.environ if env is None else env

        def num(name: str, default: float) -> float:
            raw = env.get(name)
            try:
                value = float(raw) if raw not in (None, "") else default
            except ValueError:
                raise SettingsError(f"{name} must be a number, got {raw!r}") from None
            if not math.isfinite(value):
                raise SettingsError(f"{name} must be a finite number, got {raw!r}")
            return value

        base = cls()
        broker = env.get("INFERQ_BROKER_URL") or DEFAULT_URL
        return cls(
            broker_url=broker,
            result_url=env.get("INFERQ_RESULT_URL") or broker,
            model_dir=Path(env["INFERQ_MODEL_DIR"]) if env.get("INFERQ_MODEL_DIR")
            else base.model_dir,
            models=tuple(m.strip() for m in env.get("INFERQ_MODELS", "").split(",") if m.strip()),
            device=env.get("INFERQ_DEVICE", "cpu"),
            intra_op_threads=int(num("INFERQ_INTRA_OP_THREADS", 0)),
            instances=int(num("INFERQ_INSTANCES", 1)),
            result_ttl_s=int(num("INFERQ_RESULT_TTL", base.result_ttl_s)),
            visibility_timeout_s=int(num("INFERQ_VISIBILITY_TIMEOUT", base.visibility_timeout_s)),
            restore_interval_s=num("INFERQ_RESTORE_INTERVAL", base.restore_interval_s),
            max_tensor_bytes=int(num("INFERQ_MAX_TENSOR_BYTES", base.max_tensor_bytes)),
            max_executions=int(num("INFERQ_MAX_EXECUTIONS", base.max_executions)),
            reject_nonfinite=_choice(env, "INFERQ_NONFINITE", ("reject", "allow")) == "reject",
            batch_time_limit_s=num("INFERQ_BATCH_TIME_LIMIT", base.batch_time_limit_s),
            max_jobs_per_process=int(num("INFERQ_MAX_JOBS_PER_PROCESS", 0)),
            profile=_choice(env, "INFERQ_PROFILE", ("development", "production")),
            task_events=env.get("INFERQ_TASK_EVENTS", "1") not in ("0", "false", "no"),
            events_max_rate=num("INFERQ_EVENTS_MAX_RATE", base.events_max_rate),
            background_run_ms=num("INFERQ_BACKGROUND_RUN_MS", base.background_run_ms),
            unknown_model_grace_s=num("INFERQ_UNKNOWN_MODEL_GRACE", base.unknown_model_grace_s),
            rescan_s=num("INFERQ_RESCAN_S", base.rescan_s),
            unload_grace_s=num("INFERQ_UNLOAD_GRACE_S", base.unload_grace_s),
            memory_headroom_mb=num("INFERQ_MEMORY_HEADROOM_MB", base.memory_headroom_mb),
            hostname=env.get("INFERQ_HOSTNAME") or base.hostname,
            drift=env.get("INFERQ_DRIFT", "1") not in ("0", "false", "no"),
            drift_sample=num("INFERQ_DRIFT_SAMPLE", base.drift_sample),
            drift_reference_rows=int(num("INFERQ_DRIFT_REFERENCE_ROWS",
                                         base.drift_reference_rows)),
            drift_flush_s=num("INFERQ_DRIFT_FLUSH", base.drift_flush_s),
        )
