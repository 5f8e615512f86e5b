"""``inferq gateway`` as a service sees it: a real gateway process (uvicorn, started by the
CLI) in front of the session's Redis and worker, driven over HTTP with httpx, curl (the
README's examples, run as written) and headless Chromium (Swagger UI, served offline).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgpack
import numpy as np
import pytest
import redis
from sklearn.datasets import load_digits

from producer import wire
from tests.conftest import IN_CI, PY, ROOT, WorkerProcess, python_env
from workers.gateway import keys
from workers.launch.redisproc import RedisServer, free_port

pytestmark = pytest.mark.integration

DIGITS = load_digits()
PIXELS = DIGITS.data.astype(np.float32)
INFERQ = [PY, "-m", "workers.launch.cli"]
#: A gateway's exit after SIGTERM: uvicorn shuts down gracefully, then re-raises the signal.
STOPPED = (0, -signal.SIGTERM)


def tensor(row: np.ndarray[Any, Any]) -> dict[str, Any]:
    return {"name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": row.tolist()}


class Gateway:
    """An ``inferq gateway serve`` process on a free loopback port."""

    def __init__(self, url: str, log_path: Path, *args: str, scheme: str = "http",
                 verify: Any = True) -> None:
        self.port = free_port()
        self.base = f"{scheme}://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.verify = verify
        env = python_env(INFERQ_BROKER_URL=url, INFERQ_RESULT_URL=url, INFERQ_LOG_FORMAT="json")
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*INFERQ, "gateway", "serve", "--port", str(self.port), *args], env=env,
                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.wait_ready()

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, f"gateway exited:\n{self.log()}"
            try:
                if httpx.get(f"{self.base}/healthz", verify=self.verify, timeout=2).is_success:
                    return
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"gateway not up:\n{self.log()}"
            time.sleep(0.1)

    def client(self, key: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.base, headers=headers, timeout=30, verify=self.verify)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def records(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log().splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
        return out

    def stop(self) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="module")
def gateway(redis_server: RedisServer, shared_worker: WorkerProcess,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gw = Gateway(redis_server.url, tmp_path_factory.mktemp("gateway") / "gateway.log",
                 "--max-body-mb", "2")
    yield gw
    assert gw.stop() in STOPPED, gw.log()[-3000:]


@pytest.fixture(scope="module")
def admin(redis_server: RedisServer) -> redis.Redis:
    return redis.Redis.from_url(redis_server.url)


def new_key(r: redis.Redis, models: tuple[str, ...] = ("digits",),
            scopes: tuple[str, ...] = ("submit", "read")) -> str:
    name = f"test-{wire.new_id()[:8]}"
    key, _ = keys.create(r, name, models, scopes)
    return key


@pytest.fixture(scope="module")
def key(admin: redis.Redis) -> str:
    return new_key(admin)


def problem(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text[:1000]
    assert response.headers["content-type"].startswith("application/problem+json")
    doc: dict[str, Any] = response.json()
    assert doc["code"] == code and doc["status"] == status and doc["detail"], doc
    assert doc["type"].startswith("urn:inferq:problem:") and doc["title"]
    return doc


# --- the job path ------------------------------------------------------------------------


def test_submit_read_and_predict(gateway: Gateway, key: str) -> None:
    with gateway.client(key) as http:
        r = http.post("/v1/models/digits/jobs", json={"inputs": [tensor(PIXELS[0])]})
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
        assert r.json()["status_url"] == f"/v1/jobs/{job_id}" == r.headers["location"]
        done = http.get(f"/v1/jobs/{job_id}", params={"wait": 10})
        assert done.status_code == 200, done.text
        doc = done.json()
        assert doc["status"] == "SUCCESS" and doc["job_id"] == job_id
        assert doc["model"] == "digits" and doc["version"] == 2
        label = {o["name"]: o for o in doc["outputs"]}["label"]
        assert label == {"name": "label", "datatype": "INT64", "shape": [1],
                         "data": [int(DIGITS.target[0])]}
        assert set(doc["timings_ms"]) == {"queued", "batch_wait", "inference", "total"}
        assert http.get(f"/v1/jobs/{job_id}").json() == doc  # read again, no wait

        r = http.post("/v1/models/digits:predict",
                      json={"inputs": [tensor(PIXELS[1])], "version": "1", "priority": 3})
        assert r.status_code == 200, r.text
        assert r.json()["version"] == 1
        assert {o["name"]: o for o in r.json()["outputs"]}["label"]["data"] == [1]


def test_version_numbers_latest_and_aliases(gateway: Gateway, key: str, admin: redis.Redis
                                            ) -> None:
    from producer.wire.routes import Route, route_key

    admin.set(route_key("digits"), Route(aliases={"first": 1}).to_json())
    try:
        with gateway.client(key) as http:
            for version, served in (("first", 1), ("latest", 2), ("1", 1), (2, 2)):
                r = http.post("/v1/models/digits:predict",
                              json={"inputs": [tensor(PIXELS[9])], "version": version})
                assert r.status_code == 200 and r.json()["version"] == served, (version, r.text)
            doc = problem(http.post("/v1/models/digits/jobs", json={
                "inputs": [tensor(PIXELS[9])], "version": "nightly"}), 404, "NOT_FOUND")
            assert "no alias 'nightly'" in doc["detail"] and "first" in doc["detail"]
    finally:
        admin.delete(route_key("digits"))


def test_binary_and_msgpack_tensors(gateway: Gateway, key: str) -> None:
    raw = base64.b64encode(PIXELS[2].astype("<f4").tobytes()).decode()
    with gateway.client(key) as http:
        r = http.post("/v1/models/digits:predict", json={"inputs": [
            {"name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": raw,
             "parameters": {"binary": True}}]})
        assert r.status_code == 200, r.text
        assert {o["name"]: o for o in r.json()["outputs"]}["label"]["data"] == [2]
        body = msgpack.packb({"inputs": {"pixels": wire.encode_tensor(PIXELS[3:5])},
                              "deadline_s": 30}, use_bin_type=True)
        r = http.post("/v1/models/digits:predict", content=body,
                      headers={"Content-Type": "application/x-msgpack",
                               "Accept": "application/x-msgpack"})
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "application/x-msgpack"
        doc = msgpack.unpackb(r.content, raw=False)
        assert wire.decode_tensor(doc["outputs"]["label"]).tolist() == [3, 4]
        assert wire.decode_tensor(doc["outputs"]["probabilities"]).shape == (2, 10)


def test_batch_endpoint_one_id_per_job(gateway: Gateway, key: str) -> None:
    rows = PIXELS[:100]
    with gateway.client(key) as http:
        r = http.post("/v1/models/digits/jobs:batch",
                      json={"jobs": [{"inputs": [tensor(x)]} for x in rows], "version": 2})
        assert r.status_code == 202, r.text
        jobs = r.json()["jobs"]
        assert len(jobs) == 100 and len({j["job_id"] for j in jobs}) == 100
        labels = []
        for job in jobs:
            doc = http.get(job["status_url"], params={"wait": 10}).json()
            labels.append({o["name"]: o for o in doc["outputs"]}["label"]["data"][0])
    assert np.mean(np.array(labels) == DIGITS.target[:100]) > 0.95


def test_pending_unknown_and_failed_jobs(gateway: Gateway, key: str, admin: redis.Redis
                                         ) -> None:
    with gateway.client(key) as http:
        problem(http.get(f"/v1/jobs/{wire.new_id()}"), 404, "NOT_FOUND")
        # An accepted job nobody answers yet: 202 PENDING, and ?wait waits before saying so.
        owner = keys.ApiKey.from_document(admin.hget(keys.KEYS_KEY, keys.digest(key)) or b"")
        pending = wire.new_id()
        admin.set(wire.accepted_key(pending), b"1", ex=60)
        admin.set(keys.owner_key(pending), owner.id, ex=60)
        started = time.monotonic()
        r = http.get(f"/v1/jobs/{pending}", params={"wait": 0.5})
        assert r.status_code == 202 and r.json() == {"job_id": pending, "status": "PENDING"}
        assert r.headers["retry-after"] == "1" and time.monotonic() - started >= 0.5
        # A failed job is a FAILURE document (the GET worked; the job failed) ...
        admin.set(wire.result_key(pending), wire.failure_document(
            pending, wire_error("POISONED", "crashed its worker 3 times"), "digits"))
        doc = http.get(f"/v1/jobs/{pending}").json()
        assert doc["status"] == "FAILURE" and doc["error"]["code"] == "POISONED"
        assert doc["error"]["type"] == "Poisoned"
        # ... and a problem when waited for with :predict (a job failing on the worker).
        r = http.post("/v1/models/digits:predict?wait=0.001",
                      json={"inputs": [tensor(PIXELS[0])]})
        if r.status_code != 200:  # a fast worker may answer within 1 ms
            doc = problem(r, 504, "WAIT_TIMEOUT")
            assert r.headers["location"] == f"/v1/jobs/{doc['job_id']}"


def wire_error(code: str, message: str) -> Any:
    from producer.errors import error_for_code

    return error_for_code(code, message)


def test_errors_are_problem_details(gateway: Gateway, key: str, admin: redis.Redis) -> None:
    good = {"inputs": [tensor(PIXELS[0])]}
    with gateway.client() as anonymous:
        r = anonymous.post("/v1/models/digits/jobs", json=good)
        problem(r, 401, "UNAUTHENTICATED")
        assert r.headers["www-authenticate"].startswith("Bearer")
        problem(anonymous.get("/v1/models", headers={"Authorization": "Bearer iq_nope"}),
                401, "UNAUTHENTICATED")
    with gateway.client(key) as http:
        doc = problem(http.post("/v1/models/nope/jobs", json=good), 403, "PERMISSION_DENIED")
        assert "nope" in doc["detail"]
        bad_shape = {"inputs": [{**tensor(PIXELS[0]), "shape": [1, 32],
                                 "data": PIXELS[0][:32].tolist()}]}
        doc = problem(http.post("/v1/models/digits/jobs", json=bad_shape), 400,
                      "INVALID_ARGUMENT")
        assert "dimension 1 must be 64" in doc["detail"]
        problem(http.post("/v1/models/digits/jobs", json={"inputs": [
            {**tensor(PIXELS[0]), "datatype": "BYTES"}]}), 400, "INVALID_ARGUMENT")
        problem(http.post("/v1/models/digits/jobs", json={**good, "version": 99}), 404,
                "NOT_FOUND")
        problem(http.post("/v1/models/digits/jobs", json={**good, "priority": 10}), 400,
                "INVALID_ARGUMENT")
        problem(http.post("/v1/models/digits/jobs", content=b"{not json",
                          headers={"Content-Type": "application/json"}), 400,
                "INVALID_ARGUMENT")
        problem(http.post("/v1/models/digits/jobs", content=b"x",
                          headers={"Content-Type": "text/plain"}), 415, "INVALID_ARGUMENT")
        problem(http.get("/v1/jobs/x", params={"wait": "soon"}), 400, "INVALID_ARGUMENT")
        problem(http.get("/v1/nothing-here"), 404, "NOT_FOUND")
        big = np.ones((10_000, 64), np.float32)  # about 2.6 MB of JSON, over the 2 MB limit
        problem(http.post("/v1/models/digits/jobs", json={"inputs": [{
            "name": "pixels", "datatype": "FP32", "shape": [10_000, 64],
            "data": big.tolist()}]}), 413, "INVALID_ARGUMENT")
        mine = http.post("/v1/models/digits/jobs", json=good).json()["job_id"]
    # Another key: not its model, not its scope, not its job.
    everything = new_key(admin, models=("*",))
    read_only = new_key(admin, scopes=("read",))
    with gateway.client(everything) as other:
        doc = problem(other.get(f"/v1/jobs/{mine}"), 404, "NOT_FOUND")
        assert doc["job_id"] == mine
        problem(other.post("/v1/models/nope/jobs", json=good), 404, "NOT_FOUND")
    with gateway.client(read_only) as reader:
        problem(reader.post("/v1/models/digits/jobs", json=good), 403, "PERMISSION_DENIED")
        assert reader.get("/v1/models").status_code == 200


def test_the_fast_path_answers_as_the_framework(gateway: Gateway, key: str) -> None:
    """The job routes' usual requests skip Starlette's stack and FastAPI's dependency
    solving; with another query parameter the same request goes through them. The answers
    are the same, and both are counted and logged under the route."""
    with gateway.client(key) as http:
        job_id = http.post("/v1/models/digits/jobs",
                           json={"inputs": [tensor(PIXELS[4])]}).json()["job_id"]
        fast = http.get(f"/v1/jobs/{job_id}?wait=10")
        framework = http.get(f"/v1/jobs/{job_id}?wait=10&unused=1")
        assert fast.status_code == framework.status_code == 200, (fast.text, framework.text)
        assert fast.json() == framework.json() and fast.json()["status"] == "SUCCESS"
        assert fast.headers["content-type"] == framework.headers["content-type"]
        assert fast.headers["x-request-id"] != framework.headers["x-request-id"]
        unknown = wire.new_id()
        for query in ("?wait=0", "?wait=0&unused=1"):
            doc = problem(http.get(f"/v1/jobs/{unknown}{query}"), 404, "NOT_FOUND")
            assert doc["instance"] == f"/v1/jobs/{unknown}"
        for query in ("", "?wait=10", "?wait=1e1"):
            r = http.post(f"/v1/models/digits:predict{query}",
                          json={"inputs": [tensor(PIXELS[4])]})
            assert r.status_code == 200 and r.json()["outputs"], r.text
        text = http.get("/metrics").text
    counted = re.search(r'inferq_gateway_requests_total\{method="GET",'
                        r'route="/v1/jobs/\{job_id\}",status="404"\} (\S+)', text)
    assert counted and float(counted.group(1)) >= 2, text
    with gateway.client() as anonymous:
        for path in (f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}?unused=1"):
            problem(anonymous.get(path), 401, "UNAUTHENTICATED")


def test_idempotency_key_submits_once(gateway: Gateway, key: str, admin: redis.Redis) -> None:
    body = {"inputs": [tensor(PIXELS[5])]}
    idem = {"Idempotency-Key": f"order-{wire.new_id()}"}
    with gateway.client(key) as http:
        first = http.post("/v1/models/digits/jobs", json=body, headers=idem)
        again = http.post("/v1/models/digits/jobs", json=body, headers=idem)
        assert first.status_code == again.status_code == 202
        assert first.json() == again.json()
        problem(http.post("/v1/models/digits/jobs", json={"inputs": [tensor(PIXELS[6])]},
                          headers=idem), 400, "INVALID_ARGUMENT")

    async def concurrent() -> set[str]:
        headers = {"Authorization": f"Bearer {key}", "Idempotency-Key": wire.new_id()}
        async with httpx.AsyncClient(base_url=gateway.base, headers=headers, timeout=30) as h:
            answers = await asyncio.gather(*(h.post("/v1/models/digits/jobs:batch", json={
                "jobs": [body, body]}) for _ in range(10)))
        assert {a.status_code for a in answers} == {202}
        return {json.dumps(a.json()) for a in answers}

    assert len(asyncio.run(concurrent())) == 1  # ten requests, one pair of jobs


def test_models_health_and_metrics(gateway: Gateway, key: str, admin: redis.Redis) -> None:
    with gateway.client(key) as http:
        models = http.get("/v1/models").json()["models"]
        assert [m["name"] for m in models] == ["digits"]  # only what the key may use
        digits = models[0]
        assert digits["versions"] == [1, 2]
        assert digits["inputs"] == [{"name": "pixels", "datatype": "FP32", "shape": [-1, 64]}]
        assert http.get("/v1/models/digits").json() == digits
        assert http.get("/healthz").json() == {"status": "ok"}
        ready = http.get("/readyz")
        assert ready.status_code == 200 and "digits" in ready.json()["models"]
        text = http.get("/metrics").text
    assert re.search(r'inferq_gateway_requests_total\{method="POST",'
                     r'route="/v1/models/\{model\}/jobs",status="202"\} [1-9]', text), text
    assert "inferq_gateway_request_seconds_bucket" in text
    assert re.search(r'inferq_gateway_jobs_submitted_total\{model="digits"\} [1-9]', text)


def test_access_log_has_job_ids(gateway: Gateway, key: str) -> None:
    with gateway.client(key) as http:
        job_id = http.post("/v1/models/digits/jobs",
                           json={"inputs": [tensor(PIXELS[7])]}).json()["job_id"]
    deadline = time.monotonic() + 5
    while True:
        lines = [r for r in gateway.records() if r.get("event") == "request"
                 and job_id in (r.get("job_ids") or [])]
        if lines or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    [line] = lines
    assert line["status"] == 202 and line["route"] == "/v1/models/{model}/jobs"
    assert line["key"].startswith("test-") and line["method"] == "POST" and line["ms"] > 0
    assert key not in gateway.log()  # never the key itself


# --- the docs ----------------------------------------------------------------------------


def test_openapi_has_each_models_paths_and_examples(gateway: Gateway, admin: redis.Redis
                                                    ) -> None:
    with gateway.client() as http:
        doc = http.get("/openapi.json").json()
        assert doc["openapi"].startswith("3.1")
        op = doc["paths"]["/v1/models/digits/jobs"]["post"]
        example = op["requestBody"]["content"]["application/json"]["example"]
        assert example["inputs"][0] == {"name": "pixels", "datatype": "FP32",
                                        "shape": [1, 64], "data": [0.0] * 64}
        assert "application/x-msgpack" in op["requestBody"]["content"]
        assert {"/v1/models/digits:predict", "/v1/models/digits/jobs:batch",
                "/v1/models/{model}/jobs", "/v1/jobs/{job_id}"} <= set(doc["paths"])
        schema = doc["components"]["schemas"]["digits_JobRequest"]
        pixels = schema["properties"]["inputs"]["items"]["properties"]
        assert pixels["name"] == {"const": "pixels"} and pixels["datatype"] == {"const": "FP32"}
        assert doc["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
        # The example is accepted as it is.
        with gateway.client(new_key(admin)) as h:
            assert h.post("/v1/models/digits/jobs", json=example).status_code == 202
        page = http.get("/docs").text
        assert "/docs/static/swagger-ui-bundle.js" in page and "cdn" not in page.lower()
        asset = http.get("/docs/static/swagger-ui-bundle.js")
        assert asset.status_code == 200 and len(asset.content) > 500_000


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return name
    if IN_CI:
        pytest.fail("chromium is required in CI (.ci/run installs it)")
    pytest.skip("no chromium to render Swagger UI")


def test_swagger_ui_renders_the_operations_offline(gateway: Gateway, tmp_path: Path) -> None:
    browser = chromium()
    out = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=15000",
         "--dump-dom", f"{gateway.base}/docs"],
        capture_output=True, text=True, timeout=120)
    dom = out.stdout
    assert 'class="swagger-ui' in dom, out.stderr[-2000:]
    # Operations rendered by Swagger UI from /openapi.json, per model too.
    assert dom.count('class="opblock ') >= 10, dom[-2000:]
    for path in ("/v1/models/digits/jobs", "/v1/models/digits:predict", "/v1/jobs/{job_id}"):
        assert path.replace("{", "").replace("}", "") in re.sub(r"[{}\u200b]", "", dom), path
    assert "Submit a job" in dom and "model: digits" in dom


# --- keys, limits, security ---------------------------------------------------------------


def test_keys_cli_create_list_revoke(gateway: Gateway, redis_server: RedisServer) -> None:
    env = python_env(INFERQ_BROKER_URL=redis_server.url)
    name = f"cli-{wire.new_id()[:8]}"
    out = subprocess.run([*INFERQ, "gateway", "keys", "create", name, "--models", "digits",
                          "--scopes", "read"], env=env, capture_output=True, text=True,
                         timeout=60, check=True).stdout
    key = out.strip().splitlines()[-1]
    assert key.startswith("iq_") and len(key) > 40
    assert redis.Redis.from_url(redis_server.url).hget(keys.KEYS_KEY, key) is None  # hashed
    listed = subprocess.run([*INFERQ, "gateway", "keys", "list"], env=env, capture_output=True,
                            text=True, timeout=60, check=True).stdout
    assert name in listed and key not in listed
    with gateway.client(key) as http:
        assert http.get("/v1/models").status_code == 200
        subprocess.run([*INFERQ, "gateway", "keys", "revoke", name], env=env, timeout=60,
                       check=True, capture_output=True)
        problem(http.get("/v1/models"), 401, "UNAUTHENTICATED")
    again = subprocess.run([*INFERQ, "gateway", "keys", "revoke", name], env=env,
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 1 and "no key named" in again.stderr


def test_plain_http_is_refused_off_loopback(redis_server: RedisServer) -> None:
    out = subprocess.run([*INFERQ, "gateway", "serve", "--host", "0.0.0.0", "--port",
                          str(free_port())], env=python_env(INFERQ_BROKER_URL=redis_server.url),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "refusing plain HTTP on 0.0.0.0" in out.stderr and "--certfile" in out.stderr
    assert len(out.stderr.strip().splitlines()) <= 2


def test_rate_limit_shared_by_two_processes(redis_server: RedisServer,
                                            shared_worker: WorkerProcess, admin: redis.Redis,
                                            tmp_path: Path) -> None:
    gw = Gateway(redis_server.url, tmp_path / "limited.log", "--workers", "2",
                 "--rate-limit", "5")
    try:
        limited = new_key(admin)

        async def burst() -> list[httpx.Response]:
            headers = {"Authorization": f"Bearer {limited}"}
            async with httpx.AsyncClient(base_url=gw.base, headers=headers, timeout=30,
                                         limits=httpx.Limits(max_keepalive_connections=0)) as h:
                # New connections: uvicorn's two processes share the listening socket.
                return await asyncio.gather(*(h.get("/v1/models") for _ in range(30)))

        answers = asyncio.run(burst())
        statuses = [a.status_code for a in answers]
        assert statuses.count(200) >= 5 and statuses.count(429) >= 10, statuses
        # At most 5 a second for the key, across both processes (30 requests, a few seconds).
        refused = next(a for a in answers if a.status_code == 429)
        doc = problem(refused, 429, "RESOURCE_EXHAUSTED")
        assert int(refused.headers["retry-after"]) >= 1 and "rate limit" in doc["detail"]
        with gw.client(limited) as http:
            time.sleep(1.1)
            text = http.get("/metrics").text
        # Both processes' counts, summed through PROMETHEUS_MULTIPROC_DIR.
        counted = sum(float(m) for m in re.findall(
            r'inferq_gateway_requests_total\{method="GET",route="/v1/models",'
            r'status="(?:200|429)"\} (\S+)', text))
        assert counted == 30, text
        pids = {r.get("pid") for r in gw.records()} - {None}
        assert gw.proc.poll() is None and pids is not None
    finally:
        assert gw.stop() in STOPPED, gw.log()[-3000:]


def test_tls(redis_server: RedisServer, shared_worker: WorkerProcess, admin: redis.Redis,
             tmp_path: Path) -> None:
    from tests.security.support import make_certs

    certs = make_certs(tmp_path / "certs")
    trusted = ssl.create_default_context(cafile=str(certs.ca))
    gw = Gateway(redis_server.url, tmp_path / "tls.log", "--certfile", str(certs.server_cert),
                 "--keyfile", str(certs.server_key), scheme="https", verify=trusted)
    try:
        with gw.client(new_key(admin)) as http:
            r = http.post("/v1/models/digits:predict", json={"inputs": [tensor(PIXELS[8])]})
            assert r.status_code == 200, r.text
        with pytest.raises(httpx.HTTPError):  # plain HTTP on the TLS port
            httpx.get(f"http://127.0.0.1:{gw.port}/healthz", timeout=5)
        with pytest.raises(httpx.ConnectError):  # a client that does not trust the CA
            httpx.get(f"{gw.base}/healthz", timeout=5,
                      verify=ssl.create_default_context(cafile=str(certs.other_ca)))
    finally:
        gw.stop()


# --- the README ----------------------------------------------------------------------------


def readme_block() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## HTTP gateway", 1)[1].split("\n## ", 1)[0]
    [block] = re.findall(r"```bash\n(# the gateway, from a shell.*?)```", section, re.S)
    return str(block)


def test_readme_curl_examples_run_as_written(gateway: Gateway, redis_server: RedisServer,
                                             tmp_path: Path) -> None:
    if shutil.which("curl") is None:
        if IN_CI:
            pytest.fail("curl is required in CI")
        pytest.skip("no curl")
    script = tmp_path / "readme.sh"
    script.write_text("set -euo pipefail\n" + readme_block())
    env = python_env(INFERQ_BROKER_URL=redis_server.url, INFERQ_GATEWAY=gateway.base,
                     PATH=f"{Path(PY).parent}{os.pathsep}{os.environ['PATH']}")
    out = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    docs = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    statuses = [d.get("status") for d in docs]
    assert statuses.count("SUCCESS") >= 2, out.stdout
    labels = [{o["name"]: o for o in d["outputs"]}["label"]["data"] for d in docs
              if d.get("status") == "SUCCESS"]
    assert [0] in labels, out.stdout
