"""``inferq up``: Redis (private if none is configured), the workers and Flower.

Flower listens on 127.0.0.1 unless ``INFERQ_FLOWER_ADDRESS`` says otherwise; any other
address needs ``INFERQ_FLOWER_AUTH`` (Flower's API can shut workers down and revoke jobs).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import redis
import structlog

from producer import wire
from producer.wire.connect import connect, is_loopback, masked
from workers.errors import FlowerConfigError, LaunchError
from workers.launch.launcher import (
    Supervisor,
    check_repository,
    detect_gpus,
    die_with_parent,
    plan,
)
from workers.launch.redisproc import RedisServer, free_port

log = structlog.get_logger(__name__)

LOCAL_URL = wire.DEFAULT_URL
FLOWER_ADDRESS = "127.0.0.1"
FLOWER_PORT = 5555


def check_flower_auth(credentials: str) -> str:
    """Check ``user:password[,user:password...]`` (Flower's ``basic_auth``); return it."""
    for entry in credentials.split(","):
        user, sep, password = entry.partition(":")
        if not sep or not user.strip() or not password:
            raise FlowerConfigError(
                "INFERQ_FLOWER_AUTH must be user:password (several: user:password,user2:pw2; "
                "no commas in passwords): an entry has no user or no password")
    return credentials


def answers(url: str, timeout: float = 0.5) -> bool:
    """True when a Redis server answers PING at ``url``."""
    try:
        client = connect(url, timeout=timeout)
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
        flower_port: int | None = None,
        flower_address: str | None = None,
        flower_auth: str | None = None,
        ready_timeout_s: float = 120.0,
        log_path: Path | None = None,
    ) -> None:
        """``flower_port``: None takes 5555, or any free port when 5555 is taken; 0 any free
        port; another port must be free. ``log_path``: where the workers and Flower write
        (default: this process's own output)."""
        # Checked before anything starts: an open Flower must never come up by accident.
        self.flower_address = (flower_address or os.environ.get("INFERQ_FLOWER_ADDRESS")
                               or FLOWER_ADDRESS)
        auth = flower_auth if flower_auth is not None else os.environ.get("INFERQ_FLOWER_AUTH")
        self.flower_auth = check_flower_auth(auth) if auth else ""
        if flower and not self.flower_auth and not is_loopback(self.flower_address):
            raise FlowerConfigError(
                f"Flower on {self.flower_address!r} would be reachable from other hosts without "
                "authentication (its API can shut workers down and revoke jobs): set "
                "INFERQ_FLOWER_AUTH=user:password, or keep INFERQ_FLOWER_ADDRESS on 127.0.0.1")
        self.gpus = gpus if gpus is not None else (detect_gpus() or None)
        self.cpu_workers = cpu_workers
        self.want_flower = flower
        if flower_port is None:
            flower_port = FLOWER_PORT if _port_free(FLOWER_PORT) else free_port()
        elif flower_port == 0:
            flower_port = free_port()
        elif flower and not _port_free(flower_port):
            raise LaunchError(f"port {flower_port} is in use: give Flower another port "
                              "(--flower-port N, or 0 for any free one)")
        self.flower_port = flower_port
        self.ready_timeout_s = ready_timeout_s
        self.log_path = log_path
        self._log: IO[bytes] | None = None
        self.redis: RedisServer | None = None
        self.supervisor: Supervisor | None = None
        self.flower: subprocess.Popen[bytes] | None = None
        self.broker_url = ""

    @property
    def flower_url(self) -> str:
        if not self.flower:
            return ""
        host = self.flower_address
        if host in ("", "0.0.0.0", "::"):
            host = "127.0.0.1"  # every interface: this host reaches it on loopback
        elif ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"http://{host}:{self.flower_port}"

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
        # What every worker would refuse, refused once, before anything starts.
        check_repository()
        url = os.environ.get("INFERQ_BROKER_URL")
        if url:
            if not answers(url, timeout=2.0):
                raise LaunchError(
                    f"no Redis answers at INFERQ_BROKER_URL={masked(url)}: start it, or "
                    "unset INFERQ_BROKER_URL and a private Redis is started for you")
        elif answers(LOCAL_URL):
            url = LOCAL_URL
        else:
            try:
                self.redis = RedisServer(appendonly=True).start()
            except RuntimeError as exc:
                raise LaunchError(f"{exc}; or set INFERQ_BROKER_URL to a running Redis"
                                  ) from None
            url = self.redis.url
            log.info("redis_started", url=url, dir=str(self.redis.directory))
        self.broker_url = url
        if self.log_path is not None:
            self._log = open(self.log_path, "ab")  # noqa: SIM115 (closed by close())
        # Flower's credentials go to Flower only.
        env = {k: v for k, v in os.environ.items() if k != "INFERQ_FLOWER_AUTH"}
        env["INFERQ_BROKER_URL"] = url
        env.setdefault("INFERQ_RESULT_URL", url)
        self.supervisor = Supervisor(plan(self.gpus, self.cpu_workers, base_env=env),
                                     output=self._log)
        self.supervisor.start()
        if self.want_flower:
            flower_env = {k: v for k, v in env.items() if k != "FLOWER_UNAUTHENTICATED_API"}
            if self.flower_auth:
                # Flower's basic_auth option, from the environment rather than --basic_auth:
                # a command line is readable by every user of the host (ps).
                flower_env["FLOWER_BASIC_AUTH"] = self.flower_auth
            else:
                # Loopback only (checked in __init__), so the API may answer without
                # credentials.
                flower_env["FLOWER_UNAUTHENTICATED_API"] = "true"
            self.flower = subprocess.Popen(
                [sys.executable, "-m", "celery", f"--broker={url}", "flower",
                 f"--address={self.flower_address}", f"--port={self.flower_port}",
                 "--max_tasks=10000",
                 # The model and version are in a job's args/kwargs: show them in the list.
                 "--tasks_columns=name,uuid,state,args,kwargs,result,received,started,runtime,"
                 "worker", "--logging=warning"],
                env=flower_env,
                start_new_session=True,
                stdout=self._log,
                stderr=self._log,
                preexec_fn=die_with_parent(),
            )
        self.wait_ready()

    def wait_ready(self) -> None:
        """Block until every worker advertises its models (loaded, verified and warm)."""
        assert self.supervisor is not None
        client = connect(self.broker_url, timeout=5)
        keys = [wire.worker_key(s.hostname) for s in self.supervisor.specs]
        deadline = time.monotonic() + self.ready_timeout_s
        where = f"its log: {self.log_path}" if self.log_path else "its log is above"
        while self._ready(client, keys) < len(keys):
            for spec in self.supervisor.specs:
                code = self.supervisor.procs[spec.hostname].poll()
                if code is not None:
                    raise LaunchError(f"worker {spec.hostname} exited with code {code} during "
                                      f"start-up; {where}")
            if time.monotonic() > deadline:
                raise LaunchError(f"workers not ready after {self.ready_timeout_s}s; {where}")
            time.sleep(0.1)

    def _ready(self, client: redis.Redis, keys: list[str]) -> int:
        try:
            return int(client.exists(*keys))
        except redis.exceptions.RedisError as exc:
            raise LaunchError(f"Redis at {masked(self.broker_url)} stopped answering while the "
                              f"workers started: {exc}") from exc

    def run_until_stopped(self, announce: Callable[[], None] | None = None) -> None:
        """Keep the workers up (restarting one that dies) until SIGINT or SIGTERM.

        ``announce`` runs once the signals are caught, so a Ctrl-C right after it is a clean
        stop. Raises LaunchError when a worker keeps dying.
        """
        assert self.supervisor is not None
        stopped = threading.Event()
        handlers = {sig: signal.signal(sig, lambda *_: stopped.set())
                    for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            if announce is not None:
                announce()
            while not stopped.wait(0.5):
                self.supervisor.poll()
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)

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
        if self._log is not None:
            self._log.close()
            self._log = None
