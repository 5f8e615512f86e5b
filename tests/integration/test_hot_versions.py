"""Hot versions against a real worker: versions added to the repository are loaded, warmed
and advertised while serving, refused ones leave the others serving, removed ones are
unloaded once no route and no job needs them; a roll-out under load loses and fails nothing.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fakeredis
import numpy as np
import pytest
import redis
from click.testing import CliRunner, Result

from producer import InferenceClient, wire
from producer.errors import ModelNotFound
from producer.wire.routes import choose
from tests.conftest import MODELS, WorkerProcess, _need_redis
from workers.launch.cli import main
from workers.launch.redisproc import RedisServer
from workers.ops import routes
from workers.ops.health import Monitor
from workers.repository import load_manifest
from workers.serving import hotload
from workers.serving.batching import BatchPolicy
from workers.serving.hotload import mem_available, memory_refusal
from workers.serving.observers import Observer
from workers.serving.service import model_server
from workers.settings import Settings

pytestmark = pytest.mark.integration

ROW = np.zeros((1, 64), np.float32)
PIXELS = {"pixels": wire.encode_tensor(ROW)}
V2 = MODELS / "digits" / "2" / "model.onnx"


def digits_v1_repo(root: Path) -> Path:
    """A repository holding digits v1 only."""
    (root / "digits" / "1").mkdir(parents=True)
    shutil.copy(MODELS / "digits" / "1" / "model.onnx", root / "digits" / "1" / "model.onnx")
    toml = (MODELS / "digits" / "model.toml").read_text()
    (root / "digits" / "model.toml").write_text(toml[:toml.index("[versions.2]")])
    return root


@dataclass
class Served:
    url: str
    r: redis.Redis
    repo: Path
    worker: WorkerProcess

    def inferq(self, *args: object) -> Result:
        return CliRunner().invoke(main, [str(a) for a in args],
                                  env={"INFERQ_BROKER_URL": self.url, "INFERQ_MODEL_DIR":
                                       str(self.repo)})

    def advertised(self) -> list[int]:
        raw = self.r.hget(wire.MODELS_KEY, "digits")
        return sorted(json.loads(raw)["versions"]) if raw else []


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    _need_redis()
    repo = digits_v1_repo(tmp_path_factory.mktemp("repo"))
    with RedisServer(appendonly=True) as server:
        worker = WorkerProcess(server.url, tmp_path_factory.mktemp("hot"), model_dir=repo,
                               INFERQ_RESCAN_S="1", INFERQ_UNLOAD_GRACE_S="2").start()
        try:
            yield Served(server.url, redis.Redis.from_url(server.url), repo, worker)
        finally:
            worker.stop()


def wait_for(what: str, check: Callable[[], object], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def plain_job(r: redis.Redis, version: int | None = None) -> str:
    """One job as a plain Celery client sends it (no inferq headers)."""
    job_id = wire.new_id()
    r.lpush("inferq.digits", wire.build_message(
        task=wire.TASK_NAME, task_id=job_id, args=["digits", PIXELS],
        kwargs={"version": version}, queue="inferq.digits"))
    return job_id


def outcome(r: redis.Redis, job_id: str, timeout: float = 30.0) -> wire.JobResult | Exception:
    wait_for(f"the result of {job_id}", lambda: r.exists(wire.result_key(job_id)), timeout)
    raw = r.get(wire.result_key(job_id))
    assert raw is not None
    return wire.read_result(job_id, raw)


# --- a steady producer -------------------------------------------------------------------------


@dataclass
class Producer:
    """Submits jobs at a steady rate from a thread: through the client with no version,
    through the client pinned to v1, and as plain Celery messages."""

    url: str
    rate: float = 100.0
    #: (job ID, kind, submitted at, pinned version)
    sent: list[tuple[str, str, float, int | None]] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        r = redis.Redis.from_url(self.url)
        with InferenceClient(self.url) as client:
            n, started = 0, time.monotonic()
            while not self.stop.is_set():
                try:
                    kind = ("client", "plain", "pinned")[n % 3]
                    at = wire.now()
                    if kind == "plain":
                        self.sent.append((plain_job(r), kind, at, None))
                    else:
                        version = 1 if kind == "pinned" else None
                        job = client.submit("digits", {"pixels": ROW}, version=version)
                        self.sent.append((job.id, kind, at, version))
                except Exception as exc:  # a refused submit is a failed job too
                    self.errors.append(exc)
                n += 1
                time.sleep(max(0.0, started + n / self.rate - time.monotonic()))


def test_a_roll_out_under_load_fails_and_loses_nothing(served: Served) -> None:
    r, worker = served.r, served.worker
    pid = worker.advertised_pid()
    splits: dict[int, dict[int, float]] = {}
    changes: list[tuple[float, int]] = []  # (when, rev) of every route change

    def changed(_: object) -> None:
        route = routes.current(r, "digits")
        splits[route.rev] = dict(route.split)
        changes.append((wire.now(), route.rev))

    changed(routes.set_split(r, "digits", {1: 1}, by="test"))  # v1 serves while v2 rolls out
    producer = Producer(served.url)
    thread = threading.Thread(target=producer.run)
    thread.start()
    try:
        time.sleep(1.0)
        added = served.inferq("models", "add", V2, "--name", "digits")
        assert added.exit_code == 0, added.output
        assert "added digits v2" in added.output and "told 1 running worker(s)" in added.output
        wait_for("v2 advertised warm", lambda: served.advertised() == [1, 2])
        steps: list[Callable[[], object]] = [
            lambda: routes.set_split(r, "digits", {1: 90, 2: 10}, by="test"),
            lambda: routes.promote(r, "digits", 2, by="test"),
            lambda: routes.rollback(r, "digits", by="test")]
        for step in steps:
            time.sleep(1.5)
            changed(step())
        time.sleep(1.5)
    finally:
        producer.stop.set()
        thread.join()
    assert not producer.errors, producer.errors[:3]

    ids = [job_id for job_id, *_ in producer.sent]
    assert len(ids) >= 500
    with InferenceClient(served.url) as client:
        results = dict(zip(ids, client.outcomes(ids, timeout=60), strict=True))  # 0 lost
    failed = [res for res in results.values() if not isinstance(res, wire.JobResult)]
    assert not failed, failed[:3]  # 0 failed
    served_by: dict[int, int] = {}
    plain_revs: set[int] = set()
    for job_id, kind, at, pinned in producer.sent:
        result = results[job_id]
        assert isinstance(result, wire.JobResult)
        served_by[result.version] = served_by.get(result.version, 0) + 1
        label = str(result.route)
        if pinned is not None:
            assert (result.version, label) == (pinned, "pinned"), (kind, result)
        elif label.startswith("split:"):
            rev = int(label.split(":")[1])
            assert result.version == choose(splits[rev], job_id), (kind, rev, result)
            if kind == "plain":
                # Resolved by the worker at pick-up: every change reaches it within 1 s.
                newest = max((rv for when, rv in changes if when <= at - 1.0), default=0)
                assert rev >= newest, (kind, at, rev, newest, changes)
                plain_revs.add(rev)
        else:
            raise AssertionError(f"{kind} job {job_id} answered through {label!r}")
    assert plain_revs == set(splits), (plain_revs, splits)  # every route served some
    assert served_by.get(2, 0) > 50 and served_by.get(1, 0) > 50, served_by
    assert worker.advertised_pid() == pid and worker.proc is not None and \
        worker.proc.poll() is None  # no restart
    loaded = [rec for rec in worker.log_records() if rec.get("event") == "model_loaded"]
    assert [rec["version"] for rec in loaded] == [1, 2]


def test_a_broken_version_is_refused_and_the_others_keep_serving(served: Served) -> None:
    r, repo = served.r, served.repo
    toml = repo / "digits" / "model.toml"
    before = toml.read_text()
    (repo / "digits" / "3").mkdir()
    broken = repo / "digits" / "3" / "model.onnx"
    broken.write_bytes(b"not an onnx model")
    sha = hashlib.sha256(broken.read_bytes()).hexdigest()
    try:
        toml.write_text(before + f'\n[versions.3]\nsha256 = "{sha}"\n')  # an edit by hand
        reload = served.inferq("models", "reload", "digits")
        assert reload.exit_code == 0 and "told 1 running worker(s)" in reload.output

        def refused() -> list[dict[str, object]]:
            return [rec for rec in served.worker.log_records()
                    if rec.get("event") == "model_not_served" and rec.get("version") == 3]
        wait_for("v3 refused", refused)
        assert str(refused()[0]["reason"]).startswith("model digits v3: malformed ONNX")
        assert refused()[0]["serving"] == [1, 2]
        doc = json.loads(r.get(wire.worker_key(served.worker.hostname)) or b"{}")
        wait_for("v3 reported not ready", lambda: "digits v3" in json.loads(
            r.get(wire.worker_key(served.worker.hostname)) or b"{}").get("failed", {}))
        assert served.advertised() == [1, 2], doc
        with InferenceClient(served.url) as client:
            job = client.submit("digits", {"pixels": ROW}, version=1)
            assert job.result(timeout=30).version == 1
            with pytest.raises(ModelNotFound):
                client.submit("digits", {"pixels": ROW}, version=3)
        result = outcome(r, plain_job(r, 3))
        assert isinstance(result, ModelNotFound) and "no version 3" in str(result)
        time.sleep(1.5)  # a rescan does not try the same file again
        assert len(refused()) == 1
    finally:
        toml.write_text(before)
        shutil.rmtree(repo / "digits" / "3")
    wait_for("v3 no longer reported once it left the repository", lambda: "digits v3" not in
             json.loads(r.get(wire.worker_key(served.worker.hostname)) or b"{}")["failed"])


def test_a_removed_version_stays_while_a_route_names_it_then_is_unloaded(
    served: Served
) -> None:
    r, worker = served.r, served.worker
    routes.set_split(r, "digits", {1: 50, 2: 50}, by="test")
    removed = served.inferq("models", "remove", "digits", "--version", "1")
    assert removed.exit_code == 0 and "removed digits v1" in removed.output, removed.output
    wait_for("v1 no longer advertised", lambda: served.advertised() == [2], timeout=3)
    with InferenceClient(served.url) as client, pytest.raises(ModelNotFound):
        client.submit("digits", {"pixels": ROW}, version=1)  # producers refuse new pins
    time.sleep(3.0)  # past the grace: the route keeps it
    kept = outcome(r, plain_job(r, 1))
    assert isinstance(kept, wire.JobResult) and kept.version == 1
    routes.promote(r, "digits", 2, by="test")  # nothing names v1 any more

    def unloaded() -> bool:
        return any(rec.get("event") == "model_unloaded" and rec.get("version") == 1
                   for rec in worker.log_records())
    wait_for("v1 unloaded", unloaded, timeout=10)
    # v1 was loaded at start, frozen with the startup heap: given back to the collector.
    wait_for("heap refrozen", lambda: any(
        rec.get("event") == "gc_refrozen" and int(rec["objects"]) > 10_000  # type: ignore[call-overload]
        for rec in worker.log_records()), timeout=10)
    gone = outcome(r, plain_job(r, 1))
    assert isinstance(gone, ModelNotFound) and "no version 1" in str(gone), gone
    assert isinstance(outcome(r, plain_job(r)), wire.JobResult)


def test_a_version_that_does_not_fit_in_memory_is_refused(tmp_path: Path) -> None:
    _need_redis()
    repo = digits_v1_repo(tmp_path / "repo")
    with RedisServer() as server:
        worker = WorkerProcess(server.url, tmp_path, model_dir=repo, INFERQ_RESCAN_S="1",
                               INFERQ_MEMORY_HEADROOM_MB=str(10**9)).start()
        try:
            added = CliRunner().invoke(main, ["models", "add", str(V2), "--name", "digits"],
                                       env={"INFERQ_BROKER_URL": server.url,
                                            "INFERQ_MODEL_DIR": str(repo)})
            assert added.exit_code == 0, added.output

            def refused() -> list[dict[str, object]]:
                return [rec for rec in worker.log_records()
                        if rec.get("event") == "model_not_served" and rec.get("version") == 2]
            wait_for("v2 refused", refused)
            reason = str(refused()[0]["reason"])
            assert re.search(r"model digits v2 does not fit in memory: loading it takes about "
                             r"[\d.]+ MB", reason), reason
            assert "INFERQ_MEMORY_HEADROOM_MB" in reason
            r = redis.Redis.from_url(server.url)
            assert json.loads(r.hget(wire.MODELS_KEY, "digits") or b"{}")["versions"] == [1]
            kept = outcome(r, plain_job(r))
            assert isinstance(kept, wire.JobResult) and kept.version == 1
        finally:
            worker.stop()


def test_memory_refusal_compares_with_what_is_available() -> None:
    assert memory_refusal("m v1", 100, 1000, 500) is None
    assert memory_refusal("m v1", 100, None, 10**12) is None  # unknown: not refused
    why = memory_refusal("m v1", 600 * 2**20, 1000 * 2**20, 500 * 2**20, "GPU memory")
    assert why is not None and why.startswith("m v1 does not fit in GPU memory")
    assert "500.0 MB are free for it" in why
    available = mem_available()
    assert available is None or available > 0


def test_a_gpu_worker_also_checks_the_gpu_s_free_memory(monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    manifest = load_manifest(MODELS / "digits")
    monkeypatch.setattr(hotload, "mem_available", lambda: 10**12)
    monkeypatch.setattr(hotload, "gpu_free", lambda: 1000)
    assert hotload.fits(manifest, 2, Settings(device="cpu")) is None
    why = hotload.fits(manifest, 2, Settings(device="cuda", memory_headroom_mb=0))
    assert why is not None and why.startswith("model digits v2 does not fit in GPU memory")
    monkeypatch.setattr(hotload, "gpu_free", lambda: None)  # NVML cannot say: not refused
    assert hotload.fits(manifest, 2, Settings(device="cuda")) is None


def test_a_new_model_gets_its_servers_without_restart(served: Served) -> None:
    pid = served.worker.advertised_pid()
    added = served.inferq("models", "add", MODELS / "digits" / "1" / "model.onnx",
                          "--name", "digits-b")
    assert added.exit_code == 0, added.output
    wait_for("digits-b advertised", lambda: served.r.hget(wire.MODELS_KEY, "digits-b"))
    with InferenceClient(served.url) as client:
        result = client.submit("digits-b", {"pixels": ROW}).result(timeout=30)
    assert (result.model, result.version) == ("digits-b", 1)
    wait_for("digits-b in the health record", lambda: "digits-b" in json.loads(
        served.r.get(wire.worker_key(served.worker.hostname)) or b"{}")["models"], timeout=10)
    assert served.worker.advertised_pid() == pid


def test_a_version_is_advertised_once_every_live_worker_has_it_warm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = fakeredis.FakeRedis()

    @dataclass
    class Server:
        name: str = "digits"
        batch_started: float | None = None
        jobs_done: int = 0

    def monitor(host: str) -> Monitor:
        monkeypatch.setenv("INFERQ_HEALTH_FILE", str(tmp_path / f"{host}.json"))
        return Monitor(Settings(), host, [Server()], fake, threading.Event(),
                       {"digits": json.dumps({"versions": [1]})})

    def advertised() -> list[int]:
        return list(json.loads(fake.hget(wire.MODELS_KEY, "digits") or b"{}")["versions"])

    def serve(m: Monitor, versions: list[int]) -> None:
        m.advertise("digits", json.dumps({"versions": versions}))
        m._beat(ready=True)

    a, b = monitor("a@test"), monitor("b@test")
    serve(a, [1])
    serve(b, [1])
    serve(a, [1, 2])
    assert advertised() == [1]  # b has no v2 yet: a job pinned to it could reach b
    serve(b, [1, 2])
    assert advertised() == [1, 2]
    serve(a, [2])  # v1 removed from a's repository: gone at once
    assert advertised() == [2]
    b._beat(ready=True)
    assert advertised() == [2]  # b still has v1 loaded, but a does not advertise it
    a.advertise("digits", None)
    a._beat(ready=True)
    assert fake.zscore(wire.live_key("digits"), "a@test") is None
    b._beat(ready=True)
    assert advertised() == [1, 2]  # a no longer serves the model: b alone decides


class _Digits:
    """What the loop uses of a loaded digits version: ``run`` and ``provider``."""

    provider = "FakeExecutionProvider"

    def run(self, feeds: dict[str, np.ndarray[Any, Any]]) -> dict[str, np.ndarray[Any, Any]]:
        rows = len(feeds["pixels"])
        return {"label": np.zeros(rows, np.int64),
                "probabilities": np.full((rows, 10), 0.1, np.float32)}


def test_jobs_waiting_for_a_version_unloaded_meanwhile_fail_alone() -> None:
    fake = fakeredis.FakeRedis()
    server = model_server(
        "digits", {1: _Digits(), 2: _Digits()},  # type: ignore[dict-item]
        load_manifest(MODELS / "digits").inputs, broker=fake, results=fake, same_server=True,
        observer=Observer(), policy=BatchPolicy(8, 60.0), settings=Settings(),
        worker="cpu0@test")
    one, two = plain_job(fake, 1), plain_job(fake, 2)
    server._fill()  # both taken, waiting for their batches
    server.versions = {2: server.versions[2]}  # v1 unloaded meanwhile (as Served.install does)
    for _ in range(5):
        server.cycle(block_s=0.01)
    server.writer.close()
    gone = wire.read_result(one, fake.get(wire.result_key(one)) or b"")
    assert isinstance(gone, ModelNotFound) and "no version 1" in str(gone), gone
    kept = wire.read_result(two, fake.get(wire.result_key(two)) or b"")
    assert isinstance(kept, wire.JobResult) and kept.version == 2
    assert not fake.hkeys(wire.UNACKED)  # both messages acknowledged: nothing lost
