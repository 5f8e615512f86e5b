"""``inferq up``: Redis (private if none is configured), the workers and Flower, on loopback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from typing import Any

import redis
import structlog

from producer import contract
from workers.launcher import LaunchError, Supervisor, detect_gpus, plan
from workers.redisproc import RedisServer, free_port

log = structlog.get_logger(__name__)

LOCAL_URL = "redis://localhost:6379/0"


def answers(url: str, timeout: float = 0.5) -> bool:
    """True when a Redis server answers PING at ``url``."""
    try:
        client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        return bool(client.ping())
    except redis.exceptions.RedisError:
        return False


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


class LocalStack:
    """Context manager that brings the whole stack up and tears every process down."""

    def __init__(
        self,
        *,
        gpus: list[int] | None = None,
        cpu_workers: int = 1,
        flower: bool = True,
        flower_port: int = 5555,
        ready_timeout_s: float = 120.0,
    ) -> None:
        self.gpus = gpus if gpus is not None else (detect_gpus() or None)
        self.cpu_workers = cpu_workers
        self.want_flower = flower
        self.flower_port = flower_port if _port_free(flower_port) else free_port()
        self.ready_timeout_s = ready_timeout_s
        self.redis: RedisServer | None = None
        self.supervisor: Supervisor | None = None
        self.flower: subprocess.Popen[bytes] | None = None
        self.broker_url = ""

    @property
    def flower_url(self) -> str:
        return f"http://127.0.0.1:{self.flower_port}" if self.flower else ""

    def __enter__(self) -> LocalStack:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _start(self) -> None:
        url = os.environ.get("INFERQ_BROKER_URL")
        if not url:
            if answers(LOCAL_URL):
                url = LOCAL_URL
            else:
                self.redis = RedisServer(appendonly=True).start()
                url = self.redis.url
                log.info("redis_started", url=url, dir=str(self.redis.directory))
        self.broker_url = url
        env = {**os.environ, "INFERQ_BROKER_URL": url}
        env.setdefault("INFERQ_RESULT_URL", url)
        self.supervisor = Supervisor(plan(self.gpus, self.cpu_workers, base_env=env))
        self.supervisor.start()
        if self.want_flower:
            self.flower = subprocess.Popen(
                [sys.executable, "-m", "celery", f"--broker={url}", "flower",
                 "--address=127.0.0.1", f"--port={self.flower_port}", "--max_tasks=10000",
                 "--logging=warning"],
                # Loopback only, so the API may answer without credentials.
                env={**env, "FLOWER_UNAUTHENTICATED_API": "true"},
                start_new_session=True,
            )
        self.wait_ready()

    def wait_ready(self) -> None:
        """Block until every worker advertises its models (loaded, verified and warm)."""
        assert self.supervisor is not None
        client = redis.Redis.from_url(self.broker_url, socket_timeout=5)
        keys = [contract.WORKER_KEY_PREFIX + s.hostname for s in self.supervisor.specs]
        deadline = time.monotonic() + self.ready_timeout_s
        while client.exists(*keys) < len(keys):
            for spec in self.supervisor.specs:
                code = self.supervisor.procs[spec.hostname].poll()
                if code is not None:
                    raise LaunchError(f"worker {spec.hostname} exited with code {code} during "
                                      "start-up; its log is above")
            if time.monotonic() > deadline:
                raise LaunchError(f"workers not ready after {self.ready_timeout_s}s")
            time.sleep(0.1)

    def close(self) -> None:
        """Stop Flower, the workers and a private Redis, in that order."""
        if self.flower is not None and self.flower.poll() is None:
            self.flower.terminate()
            try:
                self.flower.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.flower.kill()
                self.flower.wait()
        if self.supervisor is not None:
            self.supervisor.stop()
        if self.redis is not None:
            self.redis.stop()
            self.redis = None
