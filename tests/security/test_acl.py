"""``ops/redis/users.acl``: each role gets only the commands, keys and channels it needs.

A real redis-server loads the shipped file (test passwords put in for its placeholders);
real worker and Flower processes run as their users; ``ACL LOG`` must stay empty through
a normal run, including the visibility sweep, dead-lettering and shutdown.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from producer import InferenceClient, JobStatus, ResourceExhausted, wire
from tests.conftest import WorkerProcess, _need_redis
from tests.security.support import (
    ACL_TEMPLATE,
    FlowerProcess,
    SecureRedis,
    describe_acl_log,
)
from workers.launch.redisproc import RedisServer

pytestmark = pytest.mark.integration

ROW = np.linspace(0, 16, 64, dtype=np.float32)


@pytest.fixture(scope="module")
def acl_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureRedis]:
    _need_redis()
    with SecureRedis(tmp_path_factory.mktemp("acl-redis")) as server:
        yield server


@pytest.fixture
def clean_log(acl_redis: SecureRedis) -> SecureRedis:
    acl_redis.acl_log_reset()
    return acl_redis


def _client(server: SecureRedis, role: str) -> redis.Redis:
    return redis.Redis.from_url(server.url_for(role), socket_timeout=5)


def _worker(server: SecureRedis, log_dir: Path, **env: str) -> WorkerProcess:
    """A real worker process that talks to Redis only as the ``worker`` user."""
    url = server.url_for("worker")
    return WorkerProcess(server.url, log_dir, INFERQ_BROKER_URL=url, INFERQ_RESULT_URL=url,
                         **env)


def _wait(condition: Callable[[], Any], timeout: float = 30.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return value


def _expired_unacked(admin: redis.Redis, job_id: str) -> None:
    """Leave a job as a worker that died mid-batch leaves it: in ``unacked``, long expired."""
    message = wire.build_message(
        task=wire.TASK_NAME, task_id=job_id,
        args=["digits", {"pixels": wire.encode_tensor(ROW[np.newaxis])}],
        kwargs={"version": None}, queue=wire.queue_name("digits"))
    tag = f"dead-worker-{job_id}"
    admin.hset("unacked", tag, "[" + message.decode() + ', "", "inferq.digits"]')
    admin.zadd("unacked_index", {tag: 1.0})
    admin.set(wire.accepted_key(job_id), 1, ex=600)  # it had been accepted by a producer


# --- the file itself --------------------------------------------------------------------------


def test_the_shipped_template_fails_closed(tmp_path: Path) -> None:
    """Unrendered placeholders are not valid ACL rules: Redis refuses to start with them."""
    _need_redis()
    assert "{{" in ACL_TEMPLATE.read_text()
    server = RedisServer(directory=tmp_path, extra_args=["--aclfile", str(ACL_TEMPLATE)])
    with pytest.raises(RuntimeError, match=r"ACL|password"):
        server.start(timeout=5)
    server.stop()


def test_the_default_user_is_off(acl_redis: SecureRedis) -> None:
    anonymous = redis.Redis.from_url(acl_redis.url_for(None), socket_timeout=5)
    with pytest.raises(redis.exceptions.AuthenticationError):
        anonymous.ping()
    wrong = redis.Redis.from_url(acl_redis.url_for("producer", password="wrong"),
                                 socket_timeout=5)
    with pytest.raises(redis.exceptions.AuthenticationError):
        wrong.ping()
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis.from_url(acl_redis.url_for("default", password="x"), socket_timeout=5).ping()


# --- a normal run leaves ACL LOG empty -----------------------------------------------------------


def test_round_trip_with_role_users_leaves_acl_log_empty(
    clean_log: SecureRedis, tmp_path: Path
) -> None:
    server = clean_log
    admin = server.client()
    # Production profile: the worker also checks durability (INFO) at start.
    worker = _worker(server, tmp_path, INFERQ_PROFILE="production",
                     INFERQ_RESTORE_INTERVAL="0.5").start()
    try:
        producer_url = server.url_for("producer")
        with InferenceClient(producer_url) as client:
            job = client.submit("digits", {"pixels": ROW})
            result = job.result(timeout=30)
            assert result.worker == worker.hostname and result["label"].shape == (1,)
            assert job.status() is JobStatus.SUCCESS
            jobs = client.submit_many("digits", [{"pixels": ROW}] * 40)
            assert len(client.results([j.id for j in jobs], timeout=30)) == 40
        # Tensors by reference (SET / UNLINK of inferq:blob:* keys).
        with InferenceClient(producer_url, blob_threshold=1) as client:
            big = client.submit("digits", {"pixels": np.tile(ROW, (64, 1))})
            assert big.result(timeout=30)["label"].shape == (64,)
        _wait(lambda: not admin.keys(wire.BLOB_KEY_PREFIX + "*"), what="blobs acked")

        # The visibility sweep (kombu's, in the worker) gives back a dead worker's job,
        # which then runs as a redelivered (counted) job.
        lost = wire.new_id()
        _expired_unacked(admin, lost)
        with InferenceClient(producer_url) as client:
            assert client.results([lost], timeout=30)[0].worker == worker.hostname

        # An unreadable message is dead-lettered (MULTI: LPUSH inferq:dlq, ZREM, HDEL).
        _client(server, "producer").lpush(wire.queue_name("digits"), b"not a message")
        _wait(lambda: admin.llen("inferq:dlq") == 1, what="the dead-lettered message")

        # A full queue: the producer takes its blob back (UNLINK).
        signature = json.loads(admin.hget(wire.MODELS_KEY, "digits") or b"{}")
        admin.hset(wire.MODELS_KEY, "full", json.dumps({**signature, "max_queue": 1}))
        admin.zadd(wire.live_key("full"), {"nobody@test": time.time() + 60})  # "served"
        with InferenceClient(producer_url, blob_threshold=0) as client:
            client.submit("full", {"pixels": ROW})
            with pytest.raises(ResourceExhausted):
                client.submit("full", {"pixels": ROW})
        assert admin.llen(wire.queue_name("full")) == 1
        time.sleep(1.5)  # a few sweeps, heartbeats and metric samples
    finally:
        assert worker.stop() == 0, worker.log()
        admin.hdel(wire.MODELS_KEY, "full")
        admin.delete(wire.queue_name("full"), wire.live_key("full"), "inferq:dlq")
    # Shutdown too: the worker deletes its pidbox queue and heartbeat key.
    log = server.acl_log()
    assert log == [], describe_acl_log(log)


def test_flower_with_the_flower_user_sees_workers_and_jobs(
    clean_log: SecureRedis, tmp_path: Path
) -> None:
    server = clean_log
    worker = _worker(server, tmp_path).start()
    flower = FlowerProcess(server.url_for("flower"), tmp_path / "flower.log",
                           FLOWER_BASIC_AUTH="ops:flower-secret")
    auth = ("ops", "flower-secret")
    try:
        flower.wait_listening()
        _wait(lambda: worker.hostname.encode() in flower.request(
            "/api/workers?refresh=1", auth)[1], what="Flower to list the worker")
        with InferenceClient(server.url_for("producer")) as client:
            job = client.submit("digits", {"pixels": ROW})
            job.result(timeout=30)
        _wait(lambda: b'"SUCCESS"' in flower.request(f"/api/task/info/{job.id}", auth)[1],
              what="Flower to see the job succeed")
        status, body = flower.request("/api/queues/length", auth)
        assert status == 200, body
    finally:
        flower.stop()
        worker.stop()
    log = server.acl_log()
    assert log == [], describe_acl_log(log) + "\n" + flower.log()[-3000:]


def test_exporter_user_reads_queue_metrics(clean_log: SecureRedis) -> None:
    exporter_module = pytest.importorskip("workers.ops.exporter")
    exporter = exporter_module.QueueExporter(_client(clean_log, "exporter"), ["digits"])
    exporter.sample()
    assert exporter.collect()
    log = clean_log.acl_log()
    assert log == [], describe_acl_log(log)


# --- what each role is refused --------------------------------------------------------------------

# (command, args) every non-admin role is refused: server-wide, dangerous, or other keys.
DANGEROUS: list[tuple[str, ...]] = [
    ("FLUSHALL",), ("FLUSHDB",), ("CONFIG", "GET", "dir"), ("CONFIG", "SET", "dir", "/tmp"),
    ("KEYS", "*"), ("SWAPDB", "0", "1"), ("MONITOR",), ("ACL", "LIST"),
    ("REPLICAOF", "NO", "ONE"), ("MODULE", "LIST"), ("SHUTDOWN", "NOSAVE"),
    ("SCRIPT", "FLUSH"), ("EVAL", "return 1", "0"), ("FUNCTION", "LIST"),
    ("CLIENT", "KILL", "ID", "1"), ("SAVE",), ("BGREWRITEAOF",), ("SET", "elsewhere", "x"),
    ("GET", "elsewhere"),
]

REFUSED: dict[str, list[tuple[str, ...]]] = {
    "producer": [
        ("SCAN", "0"),
        # Worker-only state: taking or forgetting others' in-flight and queued jobs.
        ("HDEL", "unacked", "tag"), ("HGETALL", "unacked"), ("ZREM", "unacked_index", "tag"),
        ("RPOP", "inferq.digits"), ("LRANGE", "inferq.digits", "0", "-1"),
        ("DEL", "inferq.digits"),
        # Forging or deleting results, advertisements, heartbeats, dead letters.
        ("SET", "celery-task-meta-x", "{}"), ("DEL", "celery-task-meta-x"),
        ("PUBLISH", "celery-task-meta-x", "{}"), ("HSET", "inferq:models", "m", "{}"),
        ("SET", "inferq:worker:w", "{}"), ("LPUSH", "inferq:dlq", "x"),
        ("SET", "_kombu.binding.x", "y"), ("PUBLISH", "/0.celery.pidbox", "shutdown"),
    ],
    # SCAN is the worker's: it looks for queues of models no worker registers.
    "worker": [
        ("LRANGE", "inferq.digits", "0", "-1"), ("HGETALL", "unacked"),
        ("PUBLISH", "other-channel", "x"), ("SET", "celery", "x"),
    ],
    "flower": [
        ("SCAN", "0"), ("RPOP", "inferq.digits"), ("LPUSH", "inferq.digits", "x"),
        ("HDEL", "unacked", "t"), ("HGET", "unacked", "t"), ("ZREM", "unacked_index", "t"),
        ("GET", "celery-task-meta-x"),
        ("SET", "celery-task-meta-x", "{}"), ("HSET", "inferq:models", "m", "{}"),
        ("PUBLISH", "celery-task-meta-x", "{}"),
    ],
    "exporter": [
        ("LPUSH", "inferq.digits", "x"), ("RPOP", "inferq.digits"), ("DEL", "inferq:dlq"),
        ("GET", "celery-task-meta-x"), ("PUBLISH", "/0.celery.pidbox", "x"),
    ],
}


@pytest.mark.parametrize("role", sorted(REFUSED))
def test_roles_are_refused_what_they_do_not_need(clean_log: SecureRedis, role: str) -> None:
    client = _client(clean_log, role)
    allowed = []
    for command in DANGEROUS + REFUSED[role]:
        try:
            client.execute_command(*command)
        except redis.exceptions.NoPermissionError:
            continue
        except redis.exceptions.ResponseError as exc:
            allowed.append(f"{' '.join(command)} -> {exc}")
            continue
        allowed.append(" ".join(command))
    assert allowed == [], f"{role} may run: {allowed}"
    assert clean_log.client().dbsize() > 0  # nothing was flushed
    # Every refusal is logged, under this role only.
    log = clean_log.acl_log()
    assert log and {e["username"] for e in log} == {role}


def test_producer_cannot_subscribe_to_control_or_events(clean_log: SecureRedis) -> None:
    pubsub = _client(clean_log, "producer").pubsub()
    for channel in ("/0.celery.pidbox", "/0.celeryev/*"):
        with pytest.raises(redis.exceptions.NoPermissionError):
            pubsub.psubscribe(channel)
            pubsub.get_message(timeout=1)


def test_scripts_do_not_widen_a_role(clean_log: SecureRedis) -> None:
    """Commands a script calls are checked against the caller's ACL: the producer may load
    and run scripts (its push script), but not one that pops queues or forges results."""
    client = _client(clean_log, "producer")
    for body, keys in (("return redis.call('RPOP', KEYS[1])", ["inferq.digits"]),
                       ("return redis.call('HDEL', KEYS[1], 'x')", ["unacked"]),
                       ("return redis.call('SET', KEYS[1], '{}')", ["celery-task-meta-x"])):
        script = client.register_script(body)
        with pytest.raises(redis.exceptions.ResponseError, match=r"(?i)permission|can't run"):
            script(keys=keys)
    assert {e["username"] for e in clean_log.acl_log()} == {"producer"}
