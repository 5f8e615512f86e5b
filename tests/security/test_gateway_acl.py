"""The ``gateway`` user of ``ops/redis/users.acl``: a real gateway process talks to a real
redis-server (the shipped ACL file) only as that user, in front of a worker running as the
``worker`` user. Everything the HTTP API does leaves ``ACL LOG`` empty; what the gateway
never needs is refused.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import redis

from producer import wire
from tests.conftest import WorkerProcess, _need_redis
from tests.security.support import GatewayProcess, SecureRedis, describe_acl_log
from workers.gateway import keys

pytestmark = pytest.mark.integration

ROW = np.linspace(0, 16, 64, dtype=np.float32)
BODY = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64],
                    "data": ROW.tolist()}]}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[tuple[SecureRedis, GatewayProcess]]:
    _need_redis()
    directory = tmp_path_factory.mktemp("gateway-acl")
    with SecureRedis(directory / "redis") as server:
        url = server.url_for("worker")
        worker = WorkerProcess(server.url, directory, INFERQ_BROKER_URL=url,
                               INFERQ_RESULT_URL=url).start()
        gateway = GatewayProcess(server.url_for("gateway"), directory / "gateway.log")
        try:
            gateway.wait_ready()
            yield server, gateway
        finally:
            gateway.stop()
            worker.stop()


def _key(server: SecureRedis, **kwargs: Any) -> str:
    """An API key, created as the admin (the gateway user may only read keys)."""
    admin = server.client()
    try:
        key, _ = keys.create(admin, f"acl-{wire.new_id()[:8]}", ("digits",),
                             kwargs.get("scopes", {"submit", "read"}))
        return key
    finally:
        admin.close()


def test_the_http_api_as_the_gateway_user_leaves_acl_log_empty(
    stack: tuple[SecureRedis, GatewayProcess]
) -> None:
    server, gateway = stack
    server.acl_log_reset()
    key, other = _key(server), _key(server)
    with httpx.Client(base_url=gateway.base, timeout=30,
                      headers={"Authorization": f"Bearer {key}"}) as http:
        # submit -> result: the push with the owner record, the rate count, the wait
        r = http.post("/v1/models/digits/jobs", json=BODY)
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
        done = http.get(f"/v1/jobs/{job_id}", params={"wait": 10})
        assert done.status_code == 200 and done.json()["status"] == "SUCCESS", done.text
        r = http.post("/v1/models/digits:predict", json=BODY)
        assert r.status_code == 200 and r.json()["status"] == "SUCCESS", r.text
        r = http.post("/v1/models/digits/jobs:batch", json={"jobs": [BODY] * 3})
        assert r.status_code == 202 and len(r.json()["jobs"]) == 3, r.text
        # idempotency keys: reserved, recorded, replayed
        first = http.post("/v1/models/digits/jobs", json=BODY,
                          headers={"Idempotency-Key": "order-1"})
        again = http.post("/v1/models/digits/jobs", json=BODY,
                          headers={"Idempotency-Key": "order-1"})
        assert first.status_code == again.status_code == 202
        assert first.json()["job_id"] == again.json()["job_id"]
        # a refused submit gives its Idempotency-Key back (UNLINK): the key is free again
        wrong = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 63],
                             "data": ROW[:63].tolist()}]}
        r = http.post("/v1/models/digits/jobs", json=wrong, headers={"Idempotency-Key": "o-2"})
        assert r.status_code == 400, r.text
        r = http.post("/v1/models/digits/jobs", json=BODY, headers={"Idempotency-Key": "o-2"})
        assert r.status_code == 202, r.text
        # aliases and 'latest' read the model's route; models and readiness
        r = http.post("/v1/models/digits:predict", json={**BODY, "version": "latest"})
        assert r.status_code == 200, r.text
        assert http.get("/v1/models").status_code == 200
        assert http.get("/readyz").status_code == 200
        # another key's job does not exist for this one
        foreign = http.get(f"/v1/jobs/{job_id}",
                           headers={"Authorization": f"Bearer {other}"})
        assert foreign.status_code == 404
        assert http.get("/v1/jobs/no-such-job").status_code == 404
        # the gateway follows revocations (SUBSCRIBE): a revoked key it had cached is
        # refused within milliseconds
        assert http.get("/v1/models").status_code == 200  # cached in the gateway now
        admin = server.client()
        [name] = [k.name for k in keys.list_keys(admin) if k.id == keys.digest(key)[:16]]
        assert keys.revoke(admin, name)
        deadline = time.monotonic() + 0.5
        while http.get("/v1/models").status_code != 401:
            assert time.monotonic() < deadline, "the revoked key is still accepted"
    log = server.acl_log()
    assert log == [], describe_acl_log(log) + "\n" + gateway.log()[-3000:]


# What the gateway user must never do: server-wide commands, the worker's state, results,
# advertisements, control; and its own API keys are read-only (keys are made by the admin).
REFUSED: list[tuple[str, ...]] = [
    ("FLUSHALL",), ("FLUSHDB",), ("CONFIG", "GET", "dir"), ("KEYS", "*"), ("SCAN", "0"),
    ("ACL", "LIST"), ("MONITOR",), ("SHUTDOWN", "NOSAVE"), ("SCRIPT", "FLUSH"),
    ("EVAL", "return 1", "0"), ("SET", "elsewhere", "x"), ("GET", "elsewhere"),
    ("HGETALL", "unacked"), ("HDEL", "unacked", "tag"), ("RPOP", "inferq.digits"),
    ("LRANGE", "inferq.digits", "0", "-1"), ("DEL", "inferq.digits"),
    ("SET", "celery-task-meta-x", "{}"), ("PUBLISH", "celery-task-meta-x", "{}"),
    ("HSET", "inferq:models", "m", "{}"), ("SET", "inferq:worker:w", "{}"),
    ("PUBLISH", "/0.celery.pidbox", "shutdown"),
    ("HSET", keys.KEYS_KEY, "digest", "{}"), ("HDEL", keys.KEYS_KEY, "digest"),
    ("DEL", keys.KEYS_KEY), ("SET", "inferq:route:digits", "{}"),
    ("PUBLISH", keys.REVOKED_CHANNEL, "digest"),  # only the admin announces revocations
]


def test_the_gateway_user_is_refused_what_it_does_not_need(
    stack: tuple[SecureRedis, GatewayProcess]
) -> None:
    server, _ = stack
    server.acl_log_reset()
    client = redis.Redis.from_url(server.url_for("gateway"), socket_timeout=5)
    allowed = []
    for command in REFUSED:
        try:
            client.execute_command(*command)
        except redis.exceptions.NoPermissionError:
            continue
        except redis.exceptions.ResponseError as exc:
            allowed.append(f"{' '.join(command)} -> {exc}")
            continue
        allowed.append(" ".join(command))
    assert allowed == [], f"gateway may run: {allowed}"
    assert server.client().dbsize() > 0  # nothing was flushed
    log = server.acl_log()
    assert log and {e["username"] for e in log} == {"gateway"}


def test_the_gateway_user_cannot_forge_results_or_see_in_flight_jobs(
    stack: tuple[SecureRedis, GatewayProcess]
) -> None:
    """Results are read-only to it, and the worker's in-flight state is invisible."""
    server, _ = stack
    client = redis.Redis.from_url(server.url_for("gateway"), socket_timeout=5)
    for command in (("SET", wire.result_key("forged"), "{}"), ("HGET", "unacked", "tag"),
                    ("ZRANGE", "unacked_index", "0", "-1")):
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.execute_command(*command)
