"""``inferq up``: Redis (private if none is configured), the workers and Flower.

Flower listens on 127.0.0.1 unless ``INFERQ_FLOWER_ADDRESS`` says otherwise; any other
address needs ``INFERQ_FLOWER_AUTH`` (Flower's API can shut workers down and revoke jobs).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import sys
import time
from typing import Any

import redis
import structlog

from producer import wire
from producer.wire.connect import connect
from workers.errors import FlowerConfigError, LaunchError
from workers.launch.launcher import Supervisor, detect_gpus, plan
from workers.launch.redisproc import RedisServer, free_port

log = structlog.get_logger(__name__)

LOCAL_URL = wire.DEFAULT_URL
FLOWER_ADDRESS = "127.0.0.1"


def is_loopback(address: str) -> bool:
    """True for an address only this host can reach: ``localhost``, 127.0.0.0/8, ``::1``.

    Everything else counts as reachable from elsewhere: ``""`` and ``0.0.0.0`` (every
    interface), other IPs, and host names (they may resolve to anything).
    """
    host = address.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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
        flower_port: int = 5555,
        flower_address: str | None = None,
        flower_auth: str | None = None,
        ready_timeout_s: float = 120.0,
    ) -> None:
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
        self.flower_port = flower_port if _port_free(flower_port) else free_port()
        self.ready_timeout_s = ready_timeout_s
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
        url = os.environ.get("INFERQ_BROKER_URL")
        if not url:
            if answers(LOCAL_URL):
                url = LOCAL_URL
            else:
                self.redis = RedisServer(appendonly=True).start()
                url = self.redis.url
                log.info("redis_started", url=url, dir=str(self.redis.directory))
        self.broker_url = url
        # Flower's credentials go to Flower only.
        env = {k: v for k, v in os.environ.items() if k != "INFERQ_FLOWER_AUTH"}
        env["INFERQ_BROKER_URL"] = url
        env.setdefault("INFERQ_RESULT_URL", url)
        self.supervisor = Supervisor(plan(self.gpus, self.cpu_workers, base_env=env))
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
                 "--max_tasks=10000", "--logging=warning"],
                env=flower_env,
                start_new_session=True,
            )
        self.wait_ready()

    def wait_ready(self) -> None:
        """Block until every worker advertises its models (loaded, verified and warm)."""
        assert self.supervisor is not None
        client = connect(self.broker_url, timeout=5)
        keys = [wire.worker_key(s.hostname) for s in self.supervisor.specs]
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
