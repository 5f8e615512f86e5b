"""End to end against a real redis-server and real worker processes."""

from __future__ import annotations

import json
import shutil
import subprocess
import textwrap
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import redis
from sklearn.datasets import load_digits

from producer import InferenceClient, JobFailed, JobStatus, ModelNotFound, wire
from tests.conftest import PY, ROOT, WorkerProcess, python_env
from workers.launch.redisproc import RedisServer, free_port
from workers.ops import deadletter

pytestmark = pytest.mark.integration

DIGITS = load_digits()
X = DIGITS.data.astype(np.float32)
Y = DIGITS.target


def _tensor(arr: np.ndarray) -> dict[str, object]:
    return wire.encode_tensor(arr)


def _digits_copy(tmp_path: Path, edit: Callable[[str], str]) -> Path:
    """A model repository holding the shipped digits model with its model.toml edited."""
    models = tmp_path / "models"
    shutil.copytree(ROOT / "models" / "digits", models / "digits")
    manifest = models / "digits" / "model.toml"
    manifest.write_text(edit(manifest.read_text()))
    return models


def test_round_trip(redis_server: RedisServer, shared_worker: WorkerProcess) -> None:
    with InferenceClient(redis_server.url) as client:
        handle = client.submit("digits", {"pixels": X[0]})  # no batch axis: the client adds it
        result = handle.result(timeout=30)
        assert handle.status() is JobStatus.SUCCESS
    assert result.id == handle.id
    assert result.model == "digits" and result.version == 2
    assert result.worker == shared_worker.hostname
    assert result["label"].shape == (1,) and int(result["label"][0]) == Y[0]
    assert result["probabilities"].shape == (1, 10)
    assert abs(float(result["probabilities"].sum()) - 1.0) < 1e-4
    assert set(result.timings_ms) == {"queued", "batch_wait", "inference", "total"}
    assert all(v is not None and v >= 0 for v in result.timings_ms.values())
    assert result.batch_size >= 1


def test_many_jobs_batch_together_and_match_labels(
    redis_server: RedisServer, shared_worker: WorkerProcess
) -> None:
    with InferenceClient(redis_server.url) as client:
        handles = client.submit_many("digits", [{"pixels": x} for x in X[:300]])
        results = client.results([h.id for h in handles], timeout=60)
    assert [r.id for r in results] == [h.id for h in handles]
    labels = np.array([int(r["label"][0]) for r in results])
    assert np.mean(labels == Y[:300]) > 0.95
    assert max(r.batch_size for r in results) > 1
    assert max(r.batch_size for r in results) <= 64  # the manifest's max_batch_rows


def test_model_instances_from_the_manifest_split_the_threads(
    fresh_redis: RedisServer, start_worker: type, tmp_path: Path
) -> None:
    # A Redis of its own: the session's shared worker also serves digits and, started
    # first, could take every job before either instance of this worker reads one.
    models = _digits_copy(tmp_path, lambda toml: "instances = 2\n" + toml)
    worker = start_worker(fresh_redis.url, model_dir=models, INFERQ_INTRA_OP_THREADS="2",
                          INFERQ_MODELS="digits").start()
    with InferenceClient(fresh_redis.url) as client:
        handles = client.submit_many("digits", [{"pixels": x} for x in X[:1200]])
        results = client.results([h.id for h in handles], timeout=60)
    labels = np.array([int(r["label"][0]) for r in results])
    assert np.mean(labels == Y[:1200]) > 0.95
    records = worker.log_records()
    loaded = [r for r in records if r.get("event") == "model_loaded"]
    assert {(r["instances"], r["intra_op_threads"]) for r in loaded} == {(2, 1)}
    # Both instances took jobs off the queue and ran batches of their own.
    ran = {r["instance"] for r in records if r.get("event") == "batch"}
    assert ran == {0, 1}


def test_a_worker_takes_only_what_its_next_batch_needs(
    redis_server: RedisServer, start_worker: type, tmp_path: Path
) -> None:
    # Batches of 8 rows from messages of 32 jobs: a worker that drained a message on every
    # batch would take the whole queue, starving any other worker or instance.
    models = _digits_copy(
        tmp_path, lambda toml: toml.replace("max_batch_rows = 64", "max_batch_rows = 8"))
    start_worker(redis_server.url, model_dir=models, INFERQ_MODELS="digits").start()
    broker = redis.Redis.from_url(redis_server.url)
    queue = wire.queue_name("digits")

    def observe(client: InferenceClient) -> tuple[list[int], list[int]]:
        """Jobs in flight per reader and messages waiting, sampled while the queue drains."""
        handles = client.submit_many("digits", [{"pixels": X[i % 300]} for i in range(3200)])
        in_flight, waiting = [], []
        while client.status(handles[-1].id) is JobStatus.PENDING:
            # Per reader (a tag starts with its reader's prefix): other workers of the
            # session may serve digits from the same Redis.
            readers = Counter(t.decode().rsplit("-", 2)[0] for t in broker.hkeys("unacked"))
            in_flight.append(max(readers.values(), default=0))
            waiting.append(broker.llen(queue))
            time.sleep(0.01)
        results = client.results([h.id for h in handles], timeout=60)
        assert len(results) == 3200
        return in_flight, waiting

    with InferenceClient(redis_server.url) as client:
        # The queue drains in about half a second: a loaded machine that keeps this process
        # off the CPU that long after the push misses it, and the measurement runs again.
        for _ in range(3):
            in_flight, waiting = observe(client)
            if max(waiting, default=0) > 20:
                break
    assert max(waiting, default=0) > 20  # the queue really was deep while we looked
    # The messages of the batch being worked on and of the one taken ahead, plus those
    # whose results the writer has not acked yet (a hoarding reader would hold ~100). The
    # session's shared worker reads the same queue in batches of 64 (two messages each).
    assert max(in_flight) <= 16, max(in_flight)


def test_plain_celery_client_without_inferq(
    redis_server: RedisServer, shared_worker: WorkerProcess
) -> None:
    script = textwrap.dedent(f"""
        import base64, json, sys
        import numpy as np
        from celery import Celery
        from sklearn.datasets import load_digits
        x = load_digits().data[:1].astype("<f4")
        app = Celery(broker="{redis_server.url}", backend="{redis_server.url}")
        out = {{}}
        for serializer in ("msgpack", "json"):
            r = app.send_task(
                "inferq.infer",
                args=["digits", {{"pixels": {{"dtype": "float32", "shape": [1, 64],
                                             "data": x.tobytes()}}}}],
                kwargs={{"version": None}}, queue="inferq.digits", serializer=serializer)
            res = app.AsyncResult(r.id).get(timeout=30)
            label = np.frombuffer(base64.b64decode(res["outputs"]["label"]["data"]), "<i8")
            out[serializer] = [r.id, res["model"], res["version"], int(label[0])]
        bad = app.send_task("inferq.infer", args=["digits", {{"pixels": {{"dtype": "int64",
              "shape": [1, 64], "data": x.astype("<i8").tobytes()}}}}],
              kwargs={{"version": None}}, queue="inferq.digits", serializer="msgpack")
        try:
            bad.get(timeout=30)
        except Exception as exc:
            out["error"] = [type(exc).__name__, str(exc)]
        out["modules"] = sorted(m for m in sys.modules if m.split(".")[0] in
                                ("producer", "workers", "onnxruntime"))
        print(json.dumps(out))
    """)
    proc = subprocess.run([PY, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd="/", env=python_env(PYTHONPATH=""))
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["modules"] == []
    for serializer in ("msgpack", "json"):
        _, model, version, label = out[serializer]
        assert (model, version, label) == ("digits", 2, int(Y[0]))
    assert out["error"][0] == "InvalidInput"
    assert "expected float32, got int64" in out["error"][1]


def test_bad_jobs_fail_alone_inside_a_batch(
    redis_server: RedisServer, shared_worker: WorkerProcess
) -> None:
    queue = wire.queue_name("digits")
    bad = {
        3: {"pixels": _tensor(X[3:4].astype(np.float64))},  # wrong dtype
        11: {"pixels": _tensor(X[11:12].reshape(1, 8, 8))},  # wrong shape
        20: {"image": _tensor(X[20:21])},  # unknown input name
    }
    ids = [str(uuid.uuid4()) for _ in range(32)]
    client = redis_server.client()
    pipe = client.pipeline(transaction=True)  # all 32 land at once, so they share batches
    for i, job_id in enumerate(ids):
        inputs = bad.get(i, {"pixels": _tensor(X[i : i + 1])})
        pipe.lpush(queue, wire.build_message(
            task=wire.TASK_NAME, task_id=job_id, args=["digits", inputs],
            kwargs={"version": None}, queue=queue))
        pipe.set(wire.accepted_key(job_id), 1, ex=600)  # accepted, as inferq's client records
    pipe.execute()
    with InferenceClient(redis_server.url) as inferq:
        outcomes = inferq.outcomes(ids, timeout=30)
    failed = {i: o for i, o in enumerate(outcomes) if isinstance(o, JobFailed)}
    assert sorted(failed) == sorted(bad)
    assert {o.code for o in failed.values()} == {"INVALID_ARGUMENT"}
    assert "float32" in failed[3].message and "float64" in failed[3].message
    assert "rank" in failed[11].message
    assert "image" in failed[20].message and "pixels" in failed[20].message
    good = [o for i, o in enumerate(outcomes) if i not in bad]
    assert len(good) == 29
    assert [int(o["label"][0]) for o in good] == [int(Y[i]) for i in range(32) if i not in bad]
    assert max(o.batch_size for o in good) > 1  # the good jobs really were batched
    # The worker process keeps serving.
    pid = shared_worker.advertised_pid()
    with InferenceClient(redis_server.url) as inferq:
        assert int(inferq.submit("digits", {"pixels": X[5]}).result(30)["label"][0]) == Y[5]
    assert shared_worker.advertised_pid() == pid == shared_worker.pid
    assert shared_worker.proc is not None and shared_worker.proc.poll() is None


def test_unknown_model_and_version(
    redis_server: RedisServer, shared_worker: WorkerProcess
) -> None:
    with InferenceClient(redis_server.url) as client:
        with pytest.raises(ModelNotFound, match="nope"):
            client.submit("nope", {"pixels": X[0]})
        with pytest.raises(ModelNotFound, match="version 9"):
            client.submit("digits", {"pixels": X[0]}, version=9)
        # A client that does not check first gets the typed failure from the worker.
        unchecked = InferenceClient(redis_server.url, validate=False)
        handle = unchecked.submit("digits", {"pixels": X[0]}, version=9)
        with pytest.raises(JobFailed) as info:
            handle.result(timeout=30)
        assert info.value.code == "NOT_FOUND"
    queue = wire.queue_name("digits")
    job_id = str(uuid.uuid4())
    redis_server.client().lpush(queue, wire.build_message(
        task=wire.TASK_NAME, task_id=job_id, args=["nope", {"pixels": _tensor(X[:1])}],
        kwargs={"version": None}, queue=queue))
    with InferenceClient(redis_server.url) as client, pytest.raises(JobFailed) as info:
        client.results([job_id], timeout=30)
    assert info.value.code == "NOT_FOUND"


def test_pinned_version_is_served_by_that_version(
    redis_server: RedisServer, shared_worker: WorkerProcess
) -> None:
    with InferenceClient(redis_server.url) as client:
        v1 = client.submit("digits", {"pixels": X[:4]}, version=1).result(30)
        v2 = client.submit("digits", {"pixels": X[:4]}, version=2).result(30)
        latest = client.submit("digits", {"pixels": X[:4]}).result(30)
    assert (v1.version, v2.version, latest.version) == (1, 2, 2)
    # The two versions are different models: their probabilities differ.
    assert not np.allclose(v1["probabilities"], v2["probabilities"])
    assert np.array_equal(v2["probabilities"], latest["probabilities"])


def _get_json(url: str) -> object:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def test_flower_sees_finished_job(
    redis_server: RedisServer, shared_worker: WorkerProcess, tmp_path: Path
) -> None:
    port = free_port()
    log = open(tmp_path / "flower.log", "wb")  # noqa: SIM115
    flower = subprocess.Popen(
        [PY, "-m", "celery", f"--broker={redis_server.url}", "flower", "--address=127.0.0.1",
         f"--port={port}"],
        env=python_env(FLOWER_UNAUTHENTICATED_API="true"), stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:  # Flower must be listening for events before the job runs
            try:
                workers = _get_json(f"{base}/api/workers?refresh=1")
                if isinstance(workers, dict) and shared_worker.hostname in workers:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "flower.log").read_text()
            time.sleep(0.3)
        with InferenceClient(redis_server.url) as client:
            job = client.submit("digits", {"pixels": X[7]})
            job.result(timeout=30)
        info: object = None
        while time.monotonic() < deadline:
            try:
                info = _get_json(f"{base}/api/task/info/{job.id}")
            except OSError:
                info = None
            if isinstance(info, dict) and info.get("state") == "SUCCESS":
                break
            time.sleep(0.2)
        assert isinstance(info, dict), info
        assert info["state"] == "SUCCESS"
        assert info["name"] == wire.TASK_NAME
        assert info["worker"] == shared_worker.hostname
        # Jobs that travelled 32 to a message are each their own task in Flower too.
        with InferenceClient(redis_server.url) as client:
            bulk = client.submit_many("digits", [{"pixels": x} for x in X[:40]])
            client.results([h.id for h in bulk], timeout=30)
        wanted = {h.id for h in bulk}
        seen: dict[str, object] = {}
        while time.monotonic() < deadline and seen != dict.fromkeys(wanted, "SUCCESS"):
            tasks = _get_json(f"{base}/api/tasks?limit=1000")
            assert isinstance(tasks, dict)
            seen = {k: v["state"] for k, v in tasks.items() if k in wanted}
            time.sleep(0.2)
        assert seen == dict.fromkeys(wanted, "SUCCESS")
    finally:
        flower.terminate()
        flower.wait(timeout=10)
        log.close()


def test_cli_submit_and_result(
    redis_server: RedisServer, shared_worker: WorkerProcess, tmp_path: Path
) -> None:
    env = python_env(INFERQ_BROKER_URL=redis_server.url)
    np.save(tmp_path / "x.npy", X[9:11])
    inferq = [PY, "-m", "workers.launch.cli"]
    waited = subprocess.run([*inferq, "submit", "digits", "--input", str(tmp_path / "x.npy"),
                             "--wait"], capture_output=True, text=True, env=env, timeout=60,
                            cwd=ROOT)
    assert waited.returncode == 0, waited.stderr
    doc = json.loads(waited.stdout)
    assert doc["status"] == "SUCCESS" and doc["outputs"]["label"] == [int(Y[9]), int(Y[10])]
    (tmp_path / "x.json").write_text(json.dumps({"pixels": X[12].tolist()}))
    job_id = subprocess.run([*inferq, "submit", "digits", "--input", str(tmp_path / "x.json")],
                            capture_output=True, text=True, env=env, timeout=60, cwd=ROOT
                            ).stdout.strip()
    got = subprocess.run([*inferq, "result", job_id, "--timeout", "30"], capture_output=True,
                         text=True, env=env, timeout=60, cwd=ROOT)
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout)["outputs"]["label"] == [int(Y[12])]
    missing = subprocess.run([*inferq, "result", str(uuid.uuid4())], capture_output=True,
                             text=True, env=env, timeout=60, cwd=ROOT)
    # An ID nobody submitted is told apart from a pending job, at once.
    assert missing.returncode == 3 and json.loads(missing.stdout)["status"] == "UNKNOWN"


def test_models_command_lists_signatures() -> None:
    out = subprocess.run([PY, "-m", "workers.launch.cli", "models"], capture_output=True, text=True,
                         timeout=60, cwd=ROOT, env=python_env())
    assert out.returncode == 0, out.stderr
    assert "digits  versions [1, 2]" in out.stdout
    assert "in  pixels: float32[-1, 64]" in out.stdout
    assert "out probabilities: float32[-1, 10]" in out.stdout


def test_worker_refuses_missing_gpu(redis_server: RedisServer, start_worker: type) -> None:
    worker = start_worker(redis_server.url, INFERQ_DEVICE="cuda")
    with pytest.raises(RuntimeError, match="exited") as info:
        worker.start(timeout=60)
    assert "CUDA" in str(info.value) or "GPU" in str(info.value)
    assert not redis.Redis.from_url(redis_server.url).exists(
        wire.WORKER_KEY_PREFIX + worker.hostname)


def test_malformed_messages_never_stop_the_worker(
    redis_server: RedisServer, shared_worker: WorkerProcess
) -> None:
    queue = wire.queue_name("digits")
    client = redis_server.client()
    before = client.llen(deadletter.DLQ_KEY)
    garbage = [b"[]", b"5", b'{"headers": "x"}', b"\xff\xfe not json"]
    client.lpush(queue, *garbage)
    hostile = {
        "huge dims": {"pixels": {"dtype": "float32", "shape": [0, 2**40, 2**40], "data": b""}},
        "object dtype": {"pixels": {"dtype": "object", "shape": [1], "data": b"x"}},
        "ref outside blobs": {"pixels": {"dtype": "float32", "shape": [1, 64],
                                         "ref": wire.result_key("x")}},
    }
    ids = {}
    for name, inputs in hostile.items():
        ids[name] = str(uuid.uuid4())
        client.lpush(queue, wire.build_message(
            task=wire.TASK_NAME, task_id=ids[name], args=["digits", inputs],
            kwargs={"version": None}, queue=queue, headers={wire.HEADER_NOTIFY: 5}))
        client.set(wire.accepted_key(ids[name]), 1, ex=600)  # as an inferq producer records
    with InferenceClient(redis_server.url) as inferq:
        outcomes = inferq.outcomes(list(ids.values()), timeout=30)
        assert all(isinstance(o, JobFailed) and o.code == "INVALID_ARGUMENT" for o in outcomes)
        assert int(inferq.submit("digits", {"pixels": X[1]}).result(30)["label"][0]) == Y[1]
    assert client.llen(deadletter.DLQ_KEY) == before + len(garbage)
    assert shared_worker.proc is not None and shared_worker.proc.poll() is None
    assert shared_worker.advertised_pid() == shared_worker.pid


def test_large_tensors_travel_by_reference(
    redis_server: RedisServer, shared_worker: WorkerProcess
) -> None:
    with InferenceClient(redis_server.url, blob_threshold=1024) as client:
        rows = X[:8]  # 2 KiB: over the threshold, so the bytes go in their own key
        handle = client.submit("digits", {"pixels": rows})
        assert [int(v) for v in handle.result(30)["label"]] == [int(y) for y in Y[:8]]
        many = client.submit_many("digits", [{"pixels": X[i : i + 8]} for i in range(0, 64, 8)])
        results = client.results([h.id for h in many], timeout=30)
    with InferenceClient(redis_server.url) as inline:
        expected = inline.submit("digits", {"pixels": X[:64]}).result(30)
    by_ref = np.concatenate([r["probabilities"] for r in results])
    assert np.allclose(by_ref, expected["probabilities"], atol=1e-6)
    # Blobs are deleted once their jobs are done.
    assert not list(redis_server.client().scan_iter(wire.BLOB_KEY_PREFIX + "*"))


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_worker_metrics_count_the_jobs_sent(
    redis_server: RedisServer, shared_worker: WorkerProcess
) -> None:
    ports = [r["port"] for r in shared_worker.log_records()
             if r.get("event") == "metrics_listening"]
    assert ports, "the worker did not log its metrics port"
    port = int(ports[-1])  # type: ignore[call-overload]

    def count(name: str, **labels: str) -> float:
        return sum(v for (n, ls), v in _scrape(port).items()
                   if n == name and all(dict(ls).get(k) == w for k, w in labels.items()))

    ok_before = count("inferq_jobs_total", model="digits", code="OK")
    bad_before = count("inferq_jobs_total", model="digits", code="INVALID_ARGUMENT")
    latency_before = count("inferq_job_latency_seconds_count", model="digits")
    with InferenceClient(redis_server.url) as client:
        good = client.submit_many("digits", [{"pixels": x} for x in X[:20]])
        client.results([h.id for h in good], timeout=30)
        unchecked = InferenceClient(redis_server.url, validate=False)
        bad = [unchecked.submit("digits", {"pixels": X[:1].astype(np.float64)}) for _ in range(2)]
        assert all(isinstance(o, JobFailed) for o in client.outcomes([h.id for h in bad], 30))
    assert count("inferq_jobs_total", model="digits", code="OK") - ok_before == 20
    assert count("inferq_jobs_total", model="digits", code="INVALID_ARGUMENT") - bad_before == 2
    assert count("inferq_job_latency_seconds_count", model="digits") - latency_before == 20
    assert count("inferq_batch_rows_count", model="digits") >= 1
    assert count("inferq_worker_ready") == 1
    assert count("inferq_model_info", model="digits", version="2") == 1
    # Collector pauses by generation, and the heap loaded before serving kept out of them.
    scraped = _scrape(port)
    assert {dict(ls).get("generation") for (n, ls) in scraped
            if n == "inferq_worker_gc_pause_seconds_count"} == {"0", "1", "2"}
    ready = [r for r in shared_worker.log_records() if r.get("event") == "worker_ready"]
    assert ready and int(ready[-1]["gc_frozen"]) > 10_000  # type: ignore[call-overload]


def test_logs_are_json_lines_per_batch_and_per_failed_job(
    redis_server: RedisServer, shared_worker: WorkerProcess
) -> None:
    with InferenceClient(redis_server.url, validate=False) as client:
        ok = client.submit("digits", {"pixels": X[:3]})
        bad = client.submit("digits", {"pixels": X[:1].astype(np.float64)})
        ok.result(30)
        with pytest.raises(JobFailed):
            bad.result(30)
    deadline = time.monotonic() + 10
    while True:
        records = shared_worker.log_records()
        failed = [r for r in records
                  if r.get("event") == "job_failed" and r.get("job_id") == bad.id]
        if failed or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert failed and failed[0]["code"] == "INVALID_ARGUMENT" and "float32" in failed[0]["message"]
    assert failed[0]["level"] == "info" and failed[0]["model"] == "digits"
    batches = [r for r in records if r.get("event") == "batch" and r.get("rows") == 3]
    assert batches, "no batch line for the 3-row job"
    line = batches[-1]
    assert {"model", "version", "device", "jobs", "rows", "oldest_wait_ms", "compute_ms",
            "worker", "timestamp", "level"} <= line.keys()
    assert line["model"] == "digits" and line["device"] == "CPUExecutionProvider"
    # Celery's own records come out as JSON lines through the same formatter.
    assert any(r.get("logger", "").startswith("celery") for r in records)
