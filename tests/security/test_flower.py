"""``inferq up`` never starts Flower without authentication where other hosts can reach it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from producer.wire.connect import is_loopback
from tests.conftest import ROOT, _need_redis
from tests.security.support import http_get, wait_http
from workers.launch import stack as stack_module
from workers.launch.redisproc import RedisServer
from workers.launch.stack import FlowerConfigError, LocalStack

NON_LOOPBACK = ["0.0.0.0", "::", "10.1.2.3", "192.168.0.7", "2001:db8::1", "flower.example.com",
                "localhost.example.com", "127.0.0.1.nip.io"]
LOOPBACK = ["127.0.0.1", "127.0.0.53", "localhost", "LOCALHOST", "::1", "[::1]"]


@pytest.fixture
def nothing_may_start(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("something was started before the Flower check")

    for name in ("Supervisor", "RedisServer", "detect_gpus", "answers"):
        monkeypatch.setattr(stack_module, name, refuse)
    monkeypatch.setattr(stack_module.subprocess, "Popen", refuse)
    for var in ("INFERQ_FLOWER_ADDRESS", "INFERQ_FLOWER_AUTH"):
        monkeypatch.delenv(var, raising=False)


@pytest.mark.parametrize("address", NON_LOOPBACK)
def test_non_loopback_without_auth_is_refused_before_anything_starts(
    nothing_may_start: None, address: str
) -> None:
    assert not is_loopback(address)
    with pytest.raises(FlowerConfigError, match="INFERQ_FLOWER_AUTH"):
        LocalStack(flower_address=address)  # gpus=None: not even nvidia-smi runs
    with pytest.raises(FlowerConfigError), LocalStack(flower_address=address):
        pass


def test_the_address_comes_from_the_environment(
    nothing_may_start: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("INFERQ_FLOWER_ADDRESS", "0.0.0.0")
    with pytest.raises(FlowerConfigError, match=r"'0\.0\.0\.0' would be reachable"):
        LocalStack()
    monkeypatch.setenv("INFERQ_FLOWER_AUTH", "ops:secret")
    assert LocalStack(gpus=[]).flower_address == "0.0.0.0"


@pytest.mark.parametrize("address", LOOPBACK)
def test_loopback_needs_no_auth(nothing_may_start: None, address: str) -> None:
    assert is_loopback(address)
    local = LocalStack(gpus=[], flower_address=address)
    assert local.flower_address == address and local.flower_auth == ""


def test_default_is_loopback(nothing_may_start: None) -> None:
    assert LocalStack(gpus=[]).flower_address == "127.0.0.1"


def test_non_loopback_with_auth_or_without_flower_is_allowed(nothing_may_start: None) -> None:
    assert LocalStack(gpus=[], flower_address="0.0.0.0", flower_auth="ops:pw").flower_auth
    assert LocalStack(gpus=[], flower=False, flower_address="0.0.0.0").flower_auth == ""


@pytest.mark.parametrize("auth", ["ops", "ops:", ":pw", " :pw", "ops:pw,", "ops:pw,second"])
def test_malformed_credentials_are_refused(nothing_may_start: None, auth: str) -> None:
    with pytest.raises(FlowerConfigError, match="user:password"):
        LocalStack(gpus=[], flower_auth=auth)


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode(errors="replace").partition("=")[::2] for item in raw if item)


@pytest.mark.integration
def test_flower_with_auth_answers_401_without_credentials(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _need_redis()
    with RedisServer(appendonly=False) as server:
        monkeypatch.setenv("INFERQ_BROKER_URL", server.url)
        monkeypatch.setenv("PYTHONPATH", str(ROOT))
        monkeypatch.setenv("INFERQ_METRICS_PORT", "0")
        monkeypatch.setenv("INFERQ_FLOWER_AUTH", "ops:s3cret-pw")
        # Inherited from the caller's shell: must not open the API once auth is set.
        monkeypatch.setenv("FLOWER_UNAUTHENTICATED_API", "true")
        with LocalStack(gpus=[], cpu_workers=1) as local:
            assert local.flower is not None
            assert local.flower_url == f"http://127.0.0.1:{local.flower_port}"
            env = _environ(local.flower.pid)
            assert "FLOWER_UNAUTHENTICATED_API" not in env
            assert env["FLOWER_BASIC_AUTH"] == "ops:s3cret-pw"
            assert "INFERQ_FLOWER_AUTH" not in env
            assert local.supervisor is not None
            for worker_pid in [p.pid for p in local.supervisor.procs.values()]:
                assert "s3cret" not in Path(f"/proc/{worker_pid}/environ").read_text(
                    errors="replace")
            cmdline = Path(f"/proc/{local.flower.pid}/cmdline").read_bytes()
            assert b"s3cret" not in cmdline and b"--address=127.0.0.1" in cmdline

            base = local.flower_url
            wait_http(base)
            assert http_get(base, "/api/workers")[0] == 401
            assert http_get(base, "/api/workers", ("ops", "wrong"))[0] == 401
            assert http_get(base, "/api/workers", ("other", "s3cret-pw"))[0] == 401
            assert http_get(base, "/")[0] == 401
            status, body = http_get(base, "/api/workers?refresh=1", ("ops", "s3cret-pw"))
            assert status == 200, body
            # By Flower's design these two stay open whatever the auth settings.
            assert http_get(base, "/healthcheck")[0] == 200
            assert http_get(base, "/metrics")[0] == 200


@pytest.mark.integration
def test_loopback_flower_without_auth_keeps_the_open_api(monkeypatch: pytest.MonkeyPatch) -> None:
    """The development default, unchanged: loopback only, API without credentials."""
    _need_redis()
    monkeypatch.delenv("INFERQ_FLOWER_AUTH", raising=False)
    monkeypatch.delenv("INFERQ_FLOWER_ADDRESS", raising=False)
    monkeypatch.delenv("FLOWER_BASIC_AUTH", raising=False)
    with RedisServer(appendonly=False) as server:
        monkeypatch.setenv("INFERQ_BROKER_URL", server.url)
        monkeypatch.setenv("PYTHONPATH", str(ROOT))
        monkeypatch.setenv("INFERQ_METRICS_PORT", "0")
        with LocalStack(gpus=[], cpu_workers=1) as local:
            assert local.flower is not None
            assert _environ(local.flower.pid)["FLOWER_UNAUTHENTICATED_API"] == "true"
            wait_http(local.flower_url)
            assert http_get(local.flower_url, "/api/workers")[0] == 200
