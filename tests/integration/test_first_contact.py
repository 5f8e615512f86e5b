"""A new user's first contact with the ``inferq`` command, one test per thing that went wrong.

Each failure must end in one or two lines that say what to do, a non-zero exit and no
traceback (unless ``--debug``). The in-process tests use click's CliRunner; the ones that
need processes start private redis-servers and real workers (never Redis on 6379).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import numpy as np
import pytest
import redis
from click.testing import CliRunner, Result
from sklearn.datasets import load_digits

from producer import InferenceClient, wire
from tests.conftest import MODELS, PY, ROOT, WorkerProcess, python_env
from workers.launch import cli, launcher
from workers.launch import stack as stack_module
from workers.launch.redisproc import RedisServer, free_port

#: The fault suite's short profile: unacked messages come back after 10 s.
PROFILE = {
    "INFERQ_VISIBILITY_TIMEOUT": "10",
    "INFERQ_RESTORE_INTERVAL": "1",
    "INFERQ_BATCH_TIME_LIMIT": "3",
}
DIGITS = load_digits()


def invoke(*args: str, **env: str) -> Result:
    return CliRunner().invoke(cli.main, list(args), env=env)


def assert_short_failure(result: Result, *needles: str) -> None:
    """Exit non-zero with at most two lines naming each needle, and no traceback."""
    assert result.exit_code not in (0, None), result.output
    assert isinstance(result.exception, SystemExit), result.exception  # not a crash
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert 1 <= len(lines) <= 2, result.output
    for needle in needles:
        assert needle in result.output, result.output


def unreachable_url() -> str:
    """A Redis URL, with a password, on a port nobody listens on."""
    return f"redis://app:s3cret@127.0.0.1:{free_port()}/0"


def running(pid: int) -> bool:
    """The process exists and is not a zombie (a container's PID 1 may never reap one)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def marked_pids(mark: str) -> list[int]:
    """Running processes whose environment carries ``INFERQ_TEST_MARK=mark``."""
    needle = f"INFERQ_TEST_MARK={mark}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and needle in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            continue
    return [pid for pid in found if running(pid)]


def wait_until(condition: Any, timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


# --- the command itself ------------------------------------------------------------------------


def test_version_and_short_help_everywhere() -> None:
    from importlib.metadata import version

    result = invoke("--version")
    assert result.exit_code == 0 and result.output.strip() == f"inferq {version('inferq')}"

    def walk(command: click.Command, path: list[str]) -> Iterator[list[str]]:
        yield path
        for name, sub in getattr(command, "commands", {}).items():
            yield from walk(sub, [*path, name])

    paths = list(walk(cli.main, []))
    assert ["up"] in paths and ["dlq", "list"] in paths
    for path in paths:
        short, long = invoke(*path, "-h"), invoke(*path, "--help")
        assert short.exit_code == 0 and short.output.startswith("Usage: "), (path, short.output)
        assert short.output == long.output


def test_every_option_has_help_text() -> None:
    def options(command: click.Command, path: str) -> Iterator[tuple[str, click.Option]]:
        for param in command.params:
            if isinstance(param, click.Option):
                yield path, param
        for name, sub in getattr(command, "commands", {}).items():
            yield from options(sub, f"{path} {name}")

    missing = [f"{path} {opt.opts[0]}" for path, opt in options(cli.main, "inferq")
               if not (opt.help or "").strip()]
    assert missing == []
    up = {o.opts[0] for o in cli.main.commands["up"].params if isinstance(o, click.Option)}
    assert {"--gpus", "--flower-port", "--workers"} <= up


# --- Redis unreachable -------------------------------------------------------------------------


@pytest.mark.parametrize("args", [["dlq", "list"], ["up"], ["result", "some-job-id"],
                                  ["submit", "digits", "--input", "x.npy"]])
def test_unreachable_redis_names_the_setting(args: list[str], tmp_path: Path) -> None:
    url = unreachable_url()
    np.save(tmp_path / "x.npy", DIGITS.data[:1].astype(np.float32))
    args = [str(tmp_path / a) if a == "x.npy" else a for a in args]
    result = invoke(*args, INFERQ_BROKER_URL=url, INFERQ_RESULT_URL=url)
    assert_short_failure(result, f"INFERQ_BROKER_URL={url.replace('s3cret', '***')}")
    assert "s3cret" not in result.output


def test_debug_shows_the_traceback() -> None:
    result = invoke("--debug", "dlq", "list", INFERQ_BROKER_URL=unreachable_url())
    assert isinstance(result.exception, redis.exceptions.ConnectionError)


# --- submit -------------------------------------------------------------------------------------


def test_submit_a_missing_file() -> None:
    result = invoke("submit", "digits", "--input", "nope.npy",
                    INFERQ_BROKER_URL=unreachable_url())  # the file is checked first
    assert_short_failure(result, "no such file: nope.npy")


@pytest.mark.integration
def test_submit_a_misspelt_model(shared_worker: WorkerProcess, tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", DIGITS.data[:1].astype(np.float32))
    result = invoke("submit", "digit", "--input", str(tmp_path / "x.npy"),
                    INFERQ_BROKER_URL=shared_worker.url)
    assert_short_failure(result, "model 'digit' is not served", "did you mean 'digits'?")


@pytest.mark.integration
def test_submit_casts_float64_to_the_models_float32(shared_worker: WorkerProcess,
                                                     tmp_path: Path) -> None:
    assert DIGITS.data.dtype == np.float64  # what a user's numpy code saves
    np.save(tmp_path / "x.npy", DIGITS.data[:5])
    result = invoke("submit", "digits", "--input", str(tmp_path / "x.npy"), "--wait",
                    INFERQ_BROKER_URL=shared_worker.url)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["outputs"]["label"] == DIGITS.target[:5].tolist()
    assert "float64 -> float32" in invoke("submit", "-h").output


@pytest.mark.integration
def test_submit_refuses_values_a_cast_would_change(shared_worker: WorkerProcess,
                                                   tmp_path: Path) -> None:
    too_big = DIGITS.data[:1].copy()
    too_big[0, 0] = 1e39  # past float32's range: would become inf
    np.save(tmp_path / "x.npy", too_big)
    result = invoke("submit", "digits", "--input", str(tmp_path / "x.npy"),
                    INFERQ_BROKER_URL=shared_worker.url)
    assert_short_failure(result, "float64", "float32", "x.astype('float32')")


# --- up -----------------------------------------------------------------------------------------


def _broken_repository(root: Path) -> Path:
    model = root / "digits"
    model.mkdir(parents=True)
    (model / "model.toml").write_text('description = "digits"\nmax_batch_rows = \n')
    return root


@pytest.mark.parametrize("command", [["up"], ["worker", "--cpu"]])
def test_a_broken_manifest_stops_before_anything_starts(command: list[str],
                                                        tmp_path: Path) -> None:
    # Nothing is started: the repository is checked before Redis is even looked for.
    result = invoke(*command, INFERQ_MODEL_DIR=str(_broken_repository(tmp_path)),
                    INFERQ_BROKER_URL=unreachable_url())
    assert_short_failure(result, str(tmp_path / "digits" / "model.toml"), "INFERQ_MODEL_DIR")


def test_up_takes_gpus_and_a_flower_port(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[dict[str, Any]] = []

    class Stack:
        broker_url, flower_url = "redis://x", "http://127.0.0.1:6000"

        def __init__(self, **kw: Any) -> None:
            made.append(kw)

        def __enter__(self) -> Stack:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def run_until_stopped(self, announce: Any = None) -> None:
            if announce is not None:
                announce()

    monkeypatch.setattr(stack_module, "LocalStack", Stack)
    monkeypatch.setattr(launcher, "detect_gpus", lambda: [0, 1])
    assert invoke("up", "--gpus", "1", "--flower-port", "6000").exit_code == 0
    assert invoke("up", "--gpus", "all").exit_code == 0
    assert invoke("up", "--cpu").exit_code == 0
    assert [(m["gpus"], m["flower_port"]) for m in made] == [([1], 6000), ([0, 1], None),
                                                              ([], None)]
    assert_short_failure(invoke("up", "--gpus", "2"), "GPUs [2] not found")
    assert_short_failure(invoke("up", "--gpus", "0", "--cpu"), "exclude each other")
    monkeypatch.setattr(launcher, "detect_gpus", lambda: [])
    assert_short_failure(invoke("up", "--gpus", "all"), "no NVIDIA GPU found")


def test_up_refuses_a_flower_port_in_use(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = invoke("up", "--cpu", "--flower-port", str(port))
    assert_short_failure(result, f"port {port} is in use", "--flower-port")


# --- demo ---------------------------------------------------------------------------------------


@pytest.mark.integration
def test_demo_prints_a_clean_summary_and_keeps_flower_until_ctrl_c(
        fresh_redis: RedisServer, tmp_path: Path) -> None:
    mark = uuid.uuid4().hex
    log_path = tmp_path / "demo.log"
    env = python_env(INFERQ_BROKER_URL=fresh_redis.url, INFERQ_TEST_MARK=mark,
                     PYTHONUNBUFFERED="1", INFERQ_METRICS_PORT="0")
    with open(tmp_path / "stderr.txt", "w") as stderr:
        proc = subprocess.Popen([PY, "-m", "workers.launch.cli", "demo", "--keep", "--log",
                                 str(log_path)], stdout=subprocess.PIPE, stderr=stderr,
                                text=True, cwd=ROOT, env=env)
    try:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if line.startswith("Flower"):
                break
        summary = "\n".join(lines)
        assert re.search(r"^accuracy\s+0\.9", summary, re.M), summary
        assert f"logs                {log_path}" in lines
        # Nothing from the workers between the summary's lines.
        assert not [line for line in lines if line.startswith("{") or "celery" in line.lower()]
        flower = re.fullmatch(r"Flower\s+(http://127\.0\.0\.1:\d+)\s+\(Ctrl-C stops the stack\)",
                              lines[-1])
        assert flower, lines[-1]
        flower_url = flower.group(1)

        def flower_answers() -> bool:
            try:
                with urllib.request.urlopen(f"{flower_url}/healthcheck", timeout=2) as r:
                    return bool(r.status == 200)
            except OSError:
                return False

        assert wait_until(flower_answers, timeout=20), "Flower is not up at the printed URL"
        records = [json.loads(line) for line in log_path.read_text().splitlines()
                   if line.startswith("{")]
        assert any("compute_ms" in r for r in records)  # the batch logs went to the file
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
        err = (tmp_path / "stderr.txt").read_text()
        assert proc.returncode == 0, err
        assert out.strip().splitlines()[-1] == "stopped"
        assert "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert wait_until(lambda: not marked_pids(mark), timeout=30), marked_pids(mark)


# --- workers never outlive their supervisor ------------------------------------------------------


@pytest.mark.integration
def test_workers_stop_when_their_supervisor_is_killed(
        fresh_redis: RedisServer, start_worker: Any, tmp_path: Path) -> None:
    mark = uuid.uuid4().hex
    url = fresh_redis.url
    env = python_env(**PROFILE, INFERQ_BROKER_URL=url, INFERQ_RESULT_URL=url,
                     INFERQ_MODEL_DIR=str(MODELS), INFERQ_METRICS_PORT="0",
                     INFERQ_LOG_FORMAT="json", INFERQ_INTRA_OP_THREADS="1",
                     INFERQ_HEALTH_FILE=str(tmp_path / "health.json"),
                     CUDA_VISIBLE_DEVICES="", INFERQ_TEST_MARK=mark)
    log_path = tmp_path / "supervisor.log"
    client = redis.Redis.from_url(url)
    key = wire.worker_key(f"cpu0@{socket.gethostname()}")  # the name the launcher gives it
    with open(log_path, "wb") as log:
        supervisor = subprocess.Popen([PY, "-m", "workers.launch.cli", "worker", "--cpu"],
                                      stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    try:
        assert wait_until(lambda: client.exists(key) or supervisor.poll() is not None, 60)
        assert supervisor.poll() is None, log_path.read_text()
        worker_pid = int(json.loads(client.get(key) or b"{}")["pid"])
        assert worker_pid != supervisor.pid and running(worker_pid)

        rows = [{"pixels": DIGITS.data[i % 360:i % 360 + 1].astype(np.float32)}
                for i in range(3000)]
        with InferenceClient(url) as producer:
            ids = [h.id for h in producer.submit_many("digits", rows)]
            # With the worker in the middle of them (measured: about 250 of 3,000 done).
            supervisor.send_signal(signal.SIGKILL)
            supervisor.wait(timeout=10)
            # SIGTERM from the kernel: a warm shutdown, within a few seconds.
            assert wait_until(lambda: not running(worker_pid), timeout=15), \
                f"worker {worker_pid} outlived its supervisor"
            assert marked_pids(mark) == []
            assert "Warm shutdown" in log_path.read_text()

            # Nothing accepted is lost: a new worker serves what is left, and what the old
            # one had taken comes back after the visibility timeout.
            start_worker(url, **PROFILE).start()
            results = producer.results(ids, timeout=40)
        assert len(results) == len(ids)
        assert {r.id for r in results} == set(ids)
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
            supervisor.wait()
        for pid in marked_pids(mark):
            os.kill(pid, signal.SIGKILL)


# --- answers that must not wait -----------------------------------------------------------------


@pytest.mark.integration
def test_result_of_an_id_never_submitted_is_unknown_at_once(fresh_redis: RedisServer) -> None:
    """Neither a result nor a record of the job being accepted: UNKNOWN (exit 3) at once,
    even when told to wait 60 s for it."""
    for extra in ([], ["--timeout", "60"]):
        job_id = str(uuid.uuid4())
        started = time.monotonic()
        result = invoke("result", job_id, *extra, INFERQ_BROKER_URL=fresh_redis.url)
        took = time.monotonic() - started
        assert result.exit_code == 3, result.output
        doc = json.loads(result.stdout)
        assert (doc["id"], doc["status"]) == (job_id, "UNKNOWN")
        assert "no such job" in doc["message"]
        assert took < 5, f"{extra}: {took:.1f}s"


@pytest.mark.integration
def test_submit_with_no_live_worker_says_how_to_start_one(fresh_redis: RedisServer,
                                                          tmp_path: Path) -> None:
    """A Redis no worker serves: ``submit --wait`` fails at once (no 60 s wait for a job
    nobody will take), naming the model and the command that starts a worker."""
    np.save(tmp_path / "x.npy", DIGITS.data[:1].astype(np.float32))
    started = time.monotonic()
    result = invoke("submit", "digits", "--input", str(tmp_path / "x.npy"), "--wait",
                    INFERQ_BROKER_URL=fresh_redis.url)
    took = time.monotonic() - started
    assert_short_failure(result, "no live worker serves model 'digits'", "inferq worker")
    assert took < 5, f"{took:.1f}s"
    # Nothing was queued for nobody.
    assert fresh_redis.client().llen(wire.queue_name("digits")) == 0
