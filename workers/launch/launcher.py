"""One worker process per GPU (or N CPU workers), supervised.

Each process gets ``CUDA_VISIBLE_DEVICES`` set before it starts, so CUDA is initialised
only inside the process that uses it, and a stable Celery hostname ``gpu<i>@<host>``.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import IO

import structlog

from producer.wire import CONTROL_QUEUE
from workers.errors import EXIT_NOTHING_TO_SERVE, LaunchError
from workers.ops.metrics import DEFAULT_PORT, metrics_port
from workers.repository import scan
from workers.settings import Settings, usable_cores

log = structlog.get_logger(__name__)

#: prctl(2) option: the signal a process gets when the thread that forked it exits.
PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class WorkerSpec:
    """How to start one worker process."""

    hostname: str
    argv: list[str]
    env: dict[str, str]


def detect_gpus() -> list[int]:
    """Indices of the NVIDIA GPUs on this host (``nvidia-smi -L``); empty when none."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10, check=True)
    except (subprocess.SubprocessError, OSError):
        return []
    # "GPU <n>: <name> (UUID: ...)"; MIG devices are indented lines under their GPU.
    return [int(m.group(1)) for m in re.finditer(r"^GPU (\d+):", out.stdout, re.MULTILINE)]


def parse_gpus(arg: str, available: Sequence[int]) -> list[int]:
    """``all`` or a comma list like ``0,1`` -> GPU indices, checked against ``available``."""
    if arg == "all":
        if not available:
            raise LaunchError("--gpus all: no NVIDIA GPU found (nvidia-smi -L lists none)")
        return list(available)
    try:
        wanted = [int(x) for x in arg.split(",") if x.strip()]
    except ValueError:
        raise LaunchError(f"--gpus takes 'all' or indices like 0,1; got {arg!r}") from None
    if not wanted or len(set(wanted)) != len(wanted):
        raise LaunchError(f"--gpus {arg!r}: give each GPU index once")
    missing = sorted(set(wanted) - set(available))
    if missing:
        raise LaunchError(f"GPUs {missing} not found; this host has {list(available)}")
    return wanted


def check_repository(env: Mapping[str, str] | None = None) -> None:
    """Refuse to start anything on settings or a model repository every worker would refuse
    (SettingsError, ManifestError): one message here instead of a worker dying N times."""
    settings = Settings.from_env(env)
    scan(settings.model_dir, settings.models)


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGTERM when this process dies (Linux).

    SIGTERM is a worker's warm shutdown: it finishes the batch in hand, stores it and
    exits, so a SIGKILLed supervisor leaves no orphan serving on. The kernel sends it
    when the *thread* that forked the child exits, so it is set only for children forked
    by the main thread (from any other thread, None: the child would die with the
    thread). The child also checks that its parent is still this process: one that died
    between fork and prctl would never signal it.
    """
    if not sys.platform.startswith("linux"):
        return None
    if threading.current_thread() is not threading.main_thread():
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)  # the supervisor is already gone: start nothing

    return preexec


def _metrics_env(env: Mapping[str, str], index: int) -> dict[str, str]:
    """Worker ``index`` scrapes on base port + index (stable per GPU), unless turned off."""
    raw = env.get("INFERQ_METRICS_PORT", "").strip()
    if raw.lower() in ("off", "none", "disabled"):
        return {}
    return {"INFERQ_METRICS_PORT": str(metrics_port(int(raw) if raw else DEFAULT_PORT, index))}


def celery_argv(hostname: str, loglevel: str = "INFO") -> list[str]:
    """The command line of one worker process (solo pool: the model runs in this process)."""
    return [
        sys.executable, "-m", "celery", "-A", "workers.app", "worker",
        "-P", "solo", "-n", hostname, "-Q", CONTROL_QUEUE, "-E",
        "--without-mingle", "--without-gossip", "-l", loglevel,
    ]


def plan(
    gpus: Sequence[int] | None,
    cpu_workers: int = 1,
    *,
    host: str | None = None,
    base_env: Mapping[str, str] | None = None,
    cores: int | None = None,
) -> list[WorkerSpec]:
    """The worker processes to start: one per GPU, else ``cpu_workers`` on the CPU."""
    host = host or socket.gethostname()
    env = dict(os.environ if base_env is None else base_env)
    specs = []
    if gpus:
        for index in gpus:
            name = f"gpu{index}@{host}"
            specs.append(WorkerSpec(name, celery_argv(name), {
                **env,
                "CUDA_VISIBLE_DEVICES": str(index),
                "INFERQ_DEVICE": "cuda",
                "INFERQ_HOSTNAME": name,
                **_metrics_env(env, index),
                # The GPU does the work; more CPU threads only contend.
                "INFERQ_INTRA_OP_THREADS": env.get("INFERQ_INTRA_OP_THREADS", "1"),
            }))
        return specs
    instances = int(env.get("INFERQ_INSTANCES", "1") or 1)
    threads = max(1, (cores or usable_cores()) // max(1, cpu_workers * instances))
    for index in range(cpu_workers):
        name = f"cpu{index}@{host}"
        specs.append(WorkerSpec(name, celery_argv(name), {
            **env,
            # An empty mask hides every GPU, so nothing CUDA-related initialises by accident.
            "CUDA_VISIBLE_DEVICES": "",
            "INFERQ_DEVICE": "cpu",
            "INFERQ_HOSTNAME": name,
            **_metrics_env(env, index),
            "INFERQ_INTRA_OP_THREADS": env.get("INFERQ_INTRA_OP_THREADS", str(threads)),
        }))
    return specs


class Supervisor:
    """Starts worker processes, restarts one that dies, stops all on request."""

    def __init__(self, specs: Sequence[WorkerSpec], *, max_restarts: int = 5,
                 output: IO[bytes] | None = None) -> None:
        self.specs = list(specs)
        self.output = output
        self.max_restarts = max_restarts
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._restarts: dict[str, list[float]] = {}

    def start(self) -> None:
        for spec in self.specs:
            self._spawn(spec)

    def _spawn(self, spec: WorkerSpec) -> None:
        # Own session: a terminal's Ctrl-C reaches only the supervisor, which then sends
        # each worker a single SIGTERM (warm shutdown). A supervisor that dies without
        # doing so (SIGKILL, OOM) gets the same SIGTERM sent to its workers by the kernel.
        self.procs[spec.hostname] = subprocess.Popen(
            spec.argv, env=spec.env, start_new_session=True, stdout=self.output,
            stderr=self.output, preexec_fn=die_with_parent())
        log.info("worker_started", worker=spec.hostname, pid=self.procs[spec.hostname].pid)

    def poll(self) -> None:
        """Restart workers that exited; raise LaunchError when one keeps dying."""
        for spec in self.specs:
            proc = self.procs[spec.hostname]
            code = proc.poll()
            if code is None:
                continue
            if code == 0:
                # A clean exit is a planned one (recycling after INFERQ_MAX_JOBS_PER_PROCESS):
                # restart it without counting it as a crash.
                log.info("worker_recycled", worker=spec.hostname)
                self._spawn(spec)
                continue
            if code == EXIT_NOTHING_TO_SERVE:
                # Every model failed to load: a restart would fail the same way.
                raise LaunchError(f"worker {spec.hostname} has no model it can serve (its log "
                                  "names each one and why); inferq models check shows them")
            now = time.monotonic()
            recent = [t for t in self._restarts.get(spec.hostname, []) if now - t < 60]
            if len(recent) >= self.max_restarts:
                raise LaunchError(f"worker {spec.hostname} exited {len(recent)} times in 60 s "
                                  f"(last exit code {code})")
            log.warning("worker_exited", worker=spec.hostname, code=code)
            self._restarts[spec.hostname] = [*recent, now]
            self._spawn(spec)

    def run(self) -> int:
        """Supervise until SIGINT/SIGTERM; return the exit code."""
        stopping = False

        def on_signal(signum: int, frame: object) -> None:
            nonlocal stopping
            stopping = True

        old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            while not stopping:
                self.poll()
                time.sleep(0.2)
            return 0
        except LaunchError as exc:
            log.error("supervisor_giving_up", error=str(exc))
            return 1
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)
            self.stop()

    def stop(self, grace_s: float = 30.0) -> None:
        """Warm-stop every worker (SIGTERM), then SIGKILL what is left after ``grace_s``."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
