"""Fixtures: private redis-server processes and real worker processes.

Nothing here touches the machine's own Redis on 6379: every server is started by the suite
on a free port. Without a redis-server binary the integration tests skip locally and fail
in CI (CI=true).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from producer import wire
from workers.launch.launcher import celery_argv
from workers.launch.redisproc import RedisServer, find_redis_server

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _need_redis() -> None:
    try:
        find_redis_server()
    except RuntimeError as exc:
        if IN_CI:
            raise
        pytest.skip(f"no redis-server available: {exc}")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One private redis-server for the whole session (AOF on, noeviction)."""
    _need_redis()
    with RedisServer(appendonly=True) as server:
        yield server


@pytest.fixture
def fresh_redis() -> Iterator[RedisServer]:
    """A private redis-server for one test, free to kill, freeze and restart."""
    _need_redis()
    with RedisServer(appendonly=True) as server:
        yield server


class WorkerProcess:
    """A real ``celery -A workers.app worker`` process, as ``inferq worker`` starts it."""

    def __init__(self, url: str, log_dir: Path, *, hostname: str | None = None,
                 model_dir: Path = MODELS, **env: str) -> None:
        self.url = url
        self.hostname = hostname or f"cpu-{uuid.uuid4().hex[:6]}@test"
        self.log_path = log_dir / f"{self.hostname.replace('@', '_')}.log"
        self.env = {
            **os.environ,
            "INFERQ_BROKER_URL": url,
            "INFERQ_RESULT_URL": url,
            "INFERQ_MODEL_DIR": str(model_dir),
            "INFERQ_HOSTNAME": self.hostname,
            "INFERQ_DEVICE": "cpu",
            "INFERQ_INTRA_OP_THREADS": "1",
            "INFERQ_LOG_FORMAT": "json",
            "INFERQ_METRICS_PORT": "0",
            "CUDA_VISIBLE_DEVICES": "",
            **env,
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> WorkerProcess:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                celery_argv(self.hostname), env=self.env, stdout=log, stderr=subprocess.STDOUT,
                cwd=ROOT, start_new_session=True,
            )
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        client = redis.Redis.from_url(self.url, socket_timeout=5)
        key = wire.WORKER_KEY_PREFIX + self.hostname
        deadline = time.monotonic() + timeout
        assert self.proc is not None
        while not client.exists(key):
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited ({self.proc.returncode}):\n{self.log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker not ready after {timeout}s:\n{self.log()}")
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def advertised_pid(self) -> int:
        client = redis.Redis.from_url(self.url, socket_timeout=5)
        raw = client.get(wire.WORKER_KEY_PREFIX + self.hostname)
        assert raw is not None
        return int(json.loads(raw)["pid"])

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_records(self) -> list[dict[str, object]]:
        out = []
        for line in self.log().splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
        return out

    def stop(self, timeout: float = 30.0) -> int:
        """Warm shutdown (SIGTERM); SIGKILL if it does not exit in time."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[type[WorkerProcess]]:
    """Factory for worker processes that are always stopped after the test."""
    started: list[WorkerProcess] = []

    class _Tracked(WorkerProcess):
        def start(self, timeout: float = 60.0) -> WorkerProcess:
            started.append(self)
            return super().start(timeout)

    def make(url: str, **kw: str) -> WorkerProcess:
        return _Tracked(url, tmp_path, **kw)

    yield make  # type: ignore[misc]
    for worker in started:
        worker.stop()


@pytest.fixture(scope="session")
def shared_worker(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[WorkerProcess]:
    """One worker serving the shipped models against the session's Redis."""
    worker = WorkerProcess(redis_server.url, tmp_path_factory.mktemp("worker"))
    worker.start()
    yield worker
    worker.stop()


def python_env(**extra: str) -> dict[str, str]:
    """The environment for a child Python process of the suite."""
    return {**os.environ, "PYTHONPATH": str(ROOT), **extra}


PY = sys.executable
