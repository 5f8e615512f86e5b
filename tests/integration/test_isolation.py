"""A broken model is that model's problem; advertisements follow live workers; jobs for a
model nobody knows end NOT_FOUND. Real redis-server, real worker processes."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from celery import Celery

from producer import InferenceClient, ModelNotFound, Unavailable, wire
from tests.conftest import MODELS, PY, WorkerProcess, python_env
from workers.launch.redisproc import RedisServer

pytestmark = pytest.mark.integration

PIXELS = np.zeros((1, 64), np.float32)


def fixed_batch_model(folder: Path) -> None:
    """A graph whose batch dimension is fixed at 1, declared with a free one: warm-up with
    max_batch_rows rows fails."""
    pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "fixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    (folder / "1").mkdir(parents=True)
    data = model.SerializeToString()
    (folder / "1" / "model.onnx").write_bytes(data)

    (folder / "model.toml").write_text(
        'description = "fixed batch declared free"\nmax_batch_rows = 64\nmax_wait_ms = 1.0\n'
        '[[inputs]]\nname = "x"\ndtype = "float32"\nshape = [-1, 4]\n'
        '[[outputs]]\nname = "y"\ndtype = "float32"\nshape = [-1, 4]\n'
        f'[versions.1]\nsha256 = "{hashlib.sha256(data).hexdigest()}"\n')


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    shutil.copytree(MODELS / "digits", root / "digits", ignore=shutil.ignore_patterns("*.py"))
    bad_sum = root / "badsum"
    shutil.copytree(MODELS / "digits", bad_sum, ignore=shutil.ignore_patterns("*.py"))
    toml = bad_sum / "model.toml"
    toml.write_text(re.sub(r'sha256 = "[0-9a-f]{64}"', 'sha256 = "' + "0" * 64 + '"',
                           toml.read_text()))
    (root / "garbled").mkdir()
    (root / "garbled" / "model.toml").write_text("this is [not toml\n")
    fixed_batch_model(root / "fixed")
    return root


def test_a_broken_model_does_not_take_the_others_down(
    fresh_redis: RedisServer, tmp_path: Path, repository: Path
) -> None:
    worker = WorkerProcess(fresh_redis.url, tmp_path, model_dir=repository).start()
    try:
        client = InferenceClient(fresh_redis.url)
        result = client.submit("digits", {"pixels": PIXELS}).result(timeout=10)
        assert result.model == "digits"
        assert sorted(client.models()) == ["digits"], "only what loaded is advertised"
        # One clear line per broken model, no restart loop.
        failures = {r.get("model"): r for r in worker.log_records()
                    if r.get("event") == "model_not_served"}
        assert set(failures) == {"badsum", "garbled", "fixed"}
        assert "sha256" in str(failures["badsum"]["reason"])
        assert sum(1 for r in worker.log_records() if r.get("event") == "worker_ready") == 1
        # inferq check names them, and the worker is still ready.
        health = json.loads(Path(worker_health(worker)).read_text())
        assert set(health["failed"]) >= {"badsum v1", "garbled", "fixed v1"}
        check = subprocess.run(
            [PY, "-m", "workers.launch.cli", "check", "--hostname", worker.hostname],
            env=python_env(), capture_output=True, text=True, timeout=60)
        assert check.returncode == 0, check.stdout + check.stderr
        assert "fixed v1 not ready" in check.stdout and "badsum v1 not ready" in check.stdout
        client.close()
    finally:
        worker.stop()


def worker_health(worker: WorkerProcess) -> str:
    from workers.ops.health import health_file

    return str(health_file(worker.hostname))


def test_a_worker_with_nothing_servable_exits_with_every_reason(
    fresh_redis: RedisServer, tmp_path: Path
) -> None:
    root = tmp_path / "models"
    (root / "garbled").mkdir(parents=True)
    (root / "garbled" / "model.toml").write_text("not = [toml\n")
    worker = WorkerProcess(fresh_redis.url, tmp_path, model_dir=root)
    with pytest.raises(RuntimeError, match="worker exited \\(78\\)"):
        worker.start(timeout=60)
    [record] = [r for r in worker.log_records() if r.get("event") == "no_model_served"]
    assert "garbled" in json.dumps(record)


def test_advertisements_follow_live_workers(
    fresh_redis: RedisServer, tmp_path: Path
) -> None:
    worker = WorkerProcess(fresh_redis.url, tmp_path).start()
    client = InferenceClient(fresh_redis.url)
    assert "digits" in client.models()
    worker.stop()  # warm shutdown: it stops advertising at once
    # A client's catalog may answer from what it read up to REFRESH_S ago (the stop can take
    # less): one that has not read it yet sees what the worker left.
    client.close()
    client = InferenceClient(fresh_redis.url)
    started = time.monotonic()
    with pytest.raises(Unavailable, match="no live worker serves model 'digits'"):
        client.submit("digits", {"pixels": PIXELS})
    assert time.monotonic() - started < 3, "refused at once, not after a timeout"
    waiting = InferenceClient(fresh_redis.url, queue_without_workers=True)
    handle = waiting.submit("digits", {"pixels": PIXELS})  # for workers that scale from zero
    second = WorkerProcess(fresh_redis.url, tmp_path).start()
    try:
        assert handle.result(timeout=20).model == "digits"
    finally:
        second.stop()
        client.close()
        waiting.close()


def test_plain_celery_jobs_for_an_unknown_model_end_not_found(
    fresh_redis: RedisServer, tmp_path: Path
) -> None:
    worker = WorkerProcess(fresh_redis.url, tmp_path, INFERQ_UNKNOWN_MODEL_GRACE="1").start()
    try:
        app = Celery(broker=fresh_redis.url, backend=fresh_redis.url)
        app.conf.result_accept_content = ["json"]
        x: dict[str, Any] = {"dtype": "float32", "shape": [1, 64], "data": PIXELS.tobytes()}
        sent = app.send_task("inferq.infer", args=["digitz", {"pixels": x}],
                             kwargs={"version": None}, queue="inferq.digitz",
                             serializer="msgpack")
        started = time.monotonic()
        with pytest.raises(Exception) as raised:
            app.AsyncResult(sent.id).get(timeout=30)
        assert type(raised.value).__name__ == "ModelNotFound"
        # Documented bound: the grace plus up to two heartbeats (5 s each).
        assert time.monotonic() - started < 20
        doc = redis.Redis.from_url(fresh_redis.url).get(wire.result_key(sent.id))
        failed = wire.read_result(sent.id, doc)
        assert isinstance(failed, ModelNotFound) and failed.model == "digitz"
    finally:
        worker.stop()


def test_a_worker_without_redis_says_so_once_and_is_not_ready(tmp_path: Path) -> None:
    from workers.launch.launcher import celery_argv
    from workers.launch.redisproc import free_port
    from workers.ops.health import check

    url = f"redis://:secret@127.0.0.1:{free_port()}/0"
    hostname = "cpu-noredis@test"
    env = python_env(INFERQ_BROKER_URL=url, INFERQ_RESULT_URL=url, INFERQ_HOSTNAME=hostname,
                     INFERQ_LOG_FORMAT="json", INFERQ_METRICS_PORT="0", CUDA_VISIBLE_DEVICES="",
                     INFERQ_INTRA_OP_THREADS="1", INFERQ_HEALTH_FILE=str(tmp_path / "h.json"))
    log_path = tmp_path / "worker.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(celery_argv(hostname), env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "h.json").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(6)  # more than a heartbeat of failing calls
        ok, why = check(tmp_path / "h.json")
        assert not ok and "unreachable" in why and "secret" not in why
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    events = [json.loads(line).get("event") for line in log_path.read_text().splitlines()
              if line.startswith("{")]
    # Each component says so once (queue reader, heartbeat), not twice a second.
    assert 1 <= events.count("redis_unreachable") <= 3, events
    assert "worker_ready" not in events and "worker_waiting_for_redis" in events
    assert "secret" not in log_path.read_text()
