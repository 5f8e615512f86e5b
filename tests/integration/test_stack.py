"""``inferq demo`` and ``inferq up``: the whole stack, and nothing left behind."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import redis

from tests.conftest import PY, ROOT, python_env
from workers.launch import stack as stack_module
from workers.launch.redisproc import RedisServer

pytestmark = pytest.mark.integration


def _marked_pids(mark: str) -> list[int]:
    """Processes whose environment carries ``INFERQ_TEST_MARK=mark``."""
    found = []
    needle = f"INFERQ_TEST_MARK={mark}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _wait_gone(mark: str, timeout: float = 30.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := _marked_pids(mark)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def test_demo_runs_the_whole_stack(fresh_redis: RedisServer) -> None:
    mark = uuid.uuid4().hex
    env = python_env(INFERQ_BROKER_URL=fresh_redis.url, INFERQ_TEST_MARK=mark)
    out = subprocess.run([PY, "-m", "workers.launch.cli", "demo"], capture_output=True, text=True,
                         timeout=300, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    accuracy = float(re.search(r"accuracy\s+([0-9.]+)", out.stdout).group(1))  # type: ignore[union-attr]
    assert accuracy >= 0.95
    assert re.search(r"throughput\s+[0-9,]+ jobs/s", out.stdout)
    assert re.search(r"one job at a time\s+p50 [0-9.]+ ms", out.stdout)
    for stage in ("queued", "batch_wait", "inference", "total"):
        assert re.search(rf"^\s+{stage}\s+[0-9.]+\s+[0-9.]+\s+[0-9.]+$", out.stdout, re.M)
    assert "batch sizes (rows)" in out.stdout and "Flower" in out.stdout
    assert _wait_gone(mark) == []


def test_up_stops_cleanly_on_ctrl_c(fresh_redis: RedisServer) -> None:
    mark = uuid.uuid4().hex
    env = python_env(INFERQ_BROKER_URL=fresh_redis.url, INFERQ_TEST_MARK=mark,
                     PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([PY, "-m", "workers.launch.cli", "up"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, cwd=ROOT, env=env)
    try:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("ready"):
                break
        assert any(line.startswith("flower  http://127.0.0.1:") for line in lines), lines
        assert len(_marked_pids(mark)) >= 3  # supervisor, a worker, Flower
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert _wait_gone(mark) == []


def test_private_redis_when_nothing_is_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("INFERQ_BROKER_URL", raising=False)
    monkeypatch.delenv("INFERQ_RESULT_URL", raising=False)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.setattr(stack_module, "answers", lambda url, timeout=0.5: False)
    with stack_module.LocalStack(gpus=[], flower=False) as local:
        assert local.redis is not None
        server = local.redis
        assert local.broker_url == server.url and ":6379/" not in server.url
        client = redis.Redis.from_url(server.url)
        assert client.config_get("appendonly")["appendonly"] == "yes"
        assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
        pid, directory = server.pid, server.directory
        assert pid is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not directory.exists()


def test_check_passes_only_for_a_ready_worker(
    fresh_redis: RedisServer, start_worker: type, tmp_path: Path
) -> None:
    health = tmp_path / "health.json"
    check = [PY, "-m", "workers.launch.cli", "check", "--file", str(health)]
    before = subprocess.run(check, capture_output=True, text=True, timeout=60, cwd=ROOT,
                            env=python_env())
    assert before.returncode == 1 and "no health record" in before.stdout
    worker = start_worker(fresh_redis.url, INFERQ_HEALTH_FILE=str(health))
    worker.start()
    ready = subprocess.run(check, capture_output=True, text=True, timeout=60, cwd=ROOT,
                           env=python_env())
    assert ready.returncode == 0, ready.stdout
    assert "ready" in ready.stdout and "digits" in ready.stdout
    assert worker.stop() == 0
    after = subprocess.run(check, capture_output=True, text=True, timeout=60, cwd=ROOT,
                           env=python_env())
    assert after.returncode == 1
