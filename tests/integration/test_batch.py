"""inferq batch and InferenceClient.map end to end: real Redis, real workers, digits."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import redis
from sklearn.datasets import load_digits

from producer import InferenceClient, JobResult, wire
from tests.conftest import MODELS, PY, ROOT, WorkerProcess, python_env
from workers.batch import runs
from workers.batch.errors import BatchStopped
from workers.batch.runner import RunSpec
from workers.batch.spool import Spool, errors_path, spool_dir
from workers.batch.state import RunState
from workers.bench.refmodels import _finish, write_model
from workers.launch.redisproc import RedisServer

pytestmark = pytest.mark.integration

DIGITS = load_digits().data.astype(np.float32)
SESSION = ort.InferenceSession(str(MODELS / "digits" / "2" / "model.onnx"),
                               providers=["CPUExecutionProvider"])
PIXELS = [f"p{j}" for j in range(64)]


def _rows(n: int) -> np.ndarray:
    return DIGITS[np.arange(n) % len(DIGITS)]


def _direct(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The digits model run by ONNX Runtime in this process."""
    label, probabilities = SESSION.run(["label", "probabilities"], {"pixels": x})
    return label, probabilities


def _table(x: np.ndarray) -> pa.Table:
    """Pixel columns stored out of order, with the id column in the middle."""
    order = [PIXELS[j] for j in np.random.default_rng(3).permutation(64)]
    order.insert(20, "id")
    return pa.table({c: np.arange(len(x)) * 10 if c == "id" else x[:, int(c[1:])]
                     for c in order})


def _write(path: Path, x: np.ndarray) -> list[str]:
    """``x`` in the format of ``path``'s suffix; the --columns that read it."""
    if path.suffix == ".parquet":
        pq.write_table(_table(x), path, row_group_size=50)
    elif path.suffix == ".csv":
        pacsv.write_csv(_table(x), path)
    elif path.suffix == ".npy":
        np.save(path, x)
        return []
    else:
        np.savez(path, images=x)
        return ["pixels=images"]
    return ["pixels=p0:p63"]


def _run(url: str, **kw: Any) -> Any:
    spec = RunSpec(**{"model": "digits", "columns": [], "id_column": None, "chunk_rows": 64,
                      **kw})
    with InferenceClient(url) as client:
        return runs.run(client, spec, bar=False)


@pytest.mark.parametrize("name,rows", [("in.parquet", 130), ("in.parquet", 1),
                                       ("in.parquet", 0), ("in.csv", 130), ("in.csv", 0),
                                       ("in.npy", 130), ("in.npz", 1)])
def test_every_format_in_order_and_equal_to_onnxruntime(
        redis_server: RedisServer, shared_worker: WorkerProcess, tmp_path: Path, name: str,
        rows: int) -> None:
    x = _rows(rows)
    columns = _write(tmp_path / name, x)
    tabular = name.endswith((".parquet", ".csv"))
    out = tmp_path / "out.parquet"
    summary = _run(redis_server.url, input=str(tmp_path / name), output=str(out),
                   columns=columns, id_column="id" if tabular else None)
    assert (summary.rows, summary.rows_failed) == (rows, 0)
    assert summary.jobs_submitted == -(-rows // 64)
    table = pq.read_table(out)
    assert table.num_rows == rows
    assert table.schema.names == (["id"] if tabular else []) + ["label", "probabilities"]
    if tabular:
        assert table.column("id").to_pylist() == [i * 10 for i in range(rows)]
    if rows:
        label, probabilities = _direct(x)
        assert table.column("label").to_pylist() == label.tolist()
        got = np.array(table.column("probabilities").to_pylist(), np.float32)
        assert np.allclose(got, probabilities, atol=1e-6)
        assert summary.rows_by_version == {2: rows}
    assert not spool_dir(out).exists()  # the run directory goes once the output is whole


def test_npy_output_of_one_output(redis_server: RedisServer, shared_worker: WorkerProcess,
                                  tmp_path: Path) -> None:
    np.save(tmp_path / "in.npy", _rows(70))
    # digits has two outputs: a .npy output is refused before anything is sent
    with pytest.raises(Exception, match="one fixed-shape output"):
        _run(redis_server.url, input=str(tmp_path / "in.npy"), output=str(tmp_path / "o.npy"))
    assert not spool_dir(tmp_path / "o.npy").exists()  # nothing left behind


def test_bad_rows_fail_their_chunk_only_and_the_errors_file_names_them(
        redis_server: RedisServer, shared_worker: WorkerProcess, tmp_path: Path) -> None:
    x = _rows(200)
    x[70, 9] = np.nan  # the worker refuses chunk 1 (rows 64-127): INVALID_ARGUMENT
    table = _table(x)
    p3 = table.column("p3").to_pylist()
    p3[5] = None  # chunk 0: an empty cell, never sent
    table = table.set_column(table.schema.get_field_index("p3"), "p3", pa.array(p3))
    pq.write_table(table, tmp_path / "in.parquet")
    out = tmp_path / "scores.parquet"
    env = python_env(INFERQ_BROKER_URL=redis_server.url, INFERQ_RESULT_URL=redis_server.url)
    proc = subprocess.run(
        [PY, "-m", "workers.launch.cli", "batch", "run", "digits", "--input",
         str(tmp_path / "in.parquet"), "--output", str(out), "--columns", "pixels=p0:p63",
         "--id-column", "id"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 4, proc.stderr  # finished, with failed rows skipped
    assert "128 failed" in proc.stdout and "INVALID_ARGUMENT 128" in proc.stdout
    errors = [json.loads(line) for line in errors_path(out).read_text().splitlines()]
    assert [(e["chunk"], e["first_row"], e["last_row"], e["code"]) for e in errors] == [
        (0, 0, 63, "INVALID_ARGUMENT"), (1, 64, 127, "INVALID_ARGUMENT")]
    assert errors[0]["bad_rows"] == [5]
    assert "row 5: column 'p3' is empty" in errors[0]["message"]
    assert "NaN" in errors[1]["message"] and errors[1]["tries"] == 1  # not retried
    assert errors[1]["ids"] == [i * 10 for i in range(64, 128)]
    result = pq.read_table(out)
    labels = result.column("label").to_pylist()
    assert labels[:128] == [None] * 128
    assert labels[128:] == _direct(x[128:])[0].tolist()
    run_id = proc.stdout.split()[1].rstrip(":")  # "run <id>: digits -> ..."
    status = subprocess.run([PY, "-m", "workers.launch.cli", "batch", "status", run_id],
                            env=env, cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert status.returncode == 0, status.stderr
    assert "finished" in status.stdout and "72/200 done, 128 failed" in status.stdout


def _results(url: str) -> int:
    client = redis.Redis.from_url(url)
    return sum(1 for _ in client.scan_iter(match=wire.RESULT_KEY_PREFIX + "*", count=1000))


def test_resume_after_sigkill_sends_only_the_missing_chunks(
        fresh_redis: RedisServer, start_worker: Any, tmp_path: Path) -> None:
    start_worker(fresh_redis.url).start()
    rows, chunk = 4000, 8
    chunks = rows // chunk
    x = _rows(rows)
    pq.write_table(_table(x), tmp_path / "in.parquet")
    out = tmp_path / "out.parquet"
    env = python_env(INFERQ_BROKER_URL=fresh_redis.url, INFERQ_RESULT_URL=fresh_redis.url)
    argv = [PY, "-m", "workers.launch.cli", "batch", "run", "digits", "--input",
            str(tmp_path / "in.parquet"), "--output", str(out), "--columns", "pixels=p0:p63",
            "--id-column", "id", "--chunk-rows", str(chunk)]
    first = subprocess.Popen([*argv, "--max-in-flight", "2"], env=env, cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    spool = Spool(spool_dir(out))
    deadline = time.monotonic() + 30
    while not (spool.directory.is_dir() and len(list(spool.directory.glob("*.arrow"))) >= 6):
        assert first.poll() is None and time.monotonic() < deadline, first.stderr
        time.sleep(0.005)
    first.send_signal(signal.SIGKILL)
    first.wait()
    run_id = spool.run()["run_id"]
    finished = set(spool.finished())
    assert 6 <= len(finished) < chunks
    state = RunState(redis.Redis.from_url(fresh_redis.url), run_id)
    recorded = {i: j for i, j in state.jobs().items() if i not in finished}
    adopt = {i for i, j in recorded.items() if j}
    unsure = len(recorded) - len(adopt)  # pushed or not: the kill came between two writes
    submitted_before = int(state.r.hget(state.key, "jobs_submitted") or 0)

    resumed = subprocess.run([*argv, "--resume", "--max-in-flight", "600", "--json"],
                             env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert summary["run_id"] == run_id and summary["rows"] == rows
    assert summary["jobs_adopted"] == len(adopt)
    assert summary["jobs_submitted"] == chunks - len(finished) - len(adopt)
    # Every job ever sent left one result: none but the chunks missing was sent again.
    assert submitted_before + summary["jobs_submitted"] <= _results(fresh_redis.url) \
        <= submitted_before + summary["jobs_submitted"] + unsure
    assert chunks <= _results(fresh_redis.url) <= chunks + unsure
    table = pq.read_table(out)
    assert table.column("id").to_pylist() == [i * 10 for i in range(rows)]  # no gap, no twin
    assert table.column("label").to_pylist() == _direct(x)[0].tolist()


def test_map_in_order_with_bounded_jobs_in_flight(
        redis_server: RedisServer, shared_worker: WorkerProcess,
        monkeypatch: pytest.MonkeyPatch) -> None:
    x = _rows(100)
    with InferenceClient(redis_server.url) as client:
        submitted: list[int] = []
        one, many = client.submit, client.submit_many

        def submit(*args: Any, **kw: Any) -> Any:
            submitted.append(1)
            return one(*args, **kw)

        def submit_many(*args: Any, **kw: Any) -> Any:
            handles = many(*args, **kw)
            submitted.append(len(handles))
            return handles

        monkeypatch.setattr(client, "submit", submit)
        monkeypatch.setattr(client, "submit_many", submit_many)
        labels = []
        for i, outcome in enumerate(client.map("digits", ({"pixels": r} for r in x),
                                               chunk_rows=8, max_in_flight=4)):
            assert isinstance(outcome, JobResult)
            labels.append(int(outcome["label"][0]))
            # jobs submitted and not handed back: at most 4, whatever the worker does
            assert sum(submitted) - i // 8 <= 4
    assert labels == _direct(x)[0].tolist()
    assert sum(submitted) == 13


def test_online_jobs_are_served_ahead_of_queued_batch_jobs(
        redis_server: RedisServer, shared_worker: WorkerProcess) -> None:
    x = _rows(64)
    with InferenceClient(redis_server.url) as client:
        def online(n: int) -> list[float]:
            out = []
            for i in range(n):
                start = time.perf_counter()
                client.submit("digits", {"pixels": x[i]}).result(timeout=30)
                out.append((time.perf_counter() - start) * 1000)
            return out

        quiet = online(30)
        backlog = [h.id for h in client.submit_many("digits", [{"pixels": x}] * 600,
                                                    priority=9, jobs_per_message=1)]
        busy, left = [], []
        for _ in range(30):
            busy += online(1)
            left.append(sum(1 for doc in redis.Redis.from_url(redis_server.url).mget(
                [wire.result_key(i) for i in backlog]) if doc is None))
        client.results(backlog, timeout=120)
    # Each online job was answered while batch jobs queued before it were still waiting.
    assert min(left) > 0, left
    assert left == sorted(left, reverse=True)
    print(f"online p99 {np.percentile(quiet, 99):.2f} ms quiet, "
          f"{np.percentile(busy, 99):.2f} ms behind {len(backlog)} queued batch jobs "
          f"(still queued at the last online job: {left[-1]})")


def test_stop_on_error_then_resume_by_run_id(
        redis_server: RedisServer, shared_worker: WorkerProcess, tmp_path: Path) -> None:
    table = _table(_rows(130))
    p9 = table.column("p9").to_pylist()
    p9[100] = None  # chunk 1 (rows 64-127)
    table = table.set_column(table.schema.get_field_index("p9"), "p9", pa.array(p9))
    pq.write_table(table, tmp_path / "in.parquet")
    out = tmp_path / "out.parquet"
    env = python_env(INFERQ_BROKER_URL=redis_server.url, INFERQ_RESULT_URL=redis_server.url)
    cli = [PY, "-m", "workers.launch.cli", "batch"]

    def inferq(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*cli, *args], env=env, cwd=ROOT, capture_output=True,
                              text=True, timeout=60)

    stopped = inferq("run", "digits", "--input", str(tmp_path / "in.parquet"), "--output",
                     str(out), "--columns", "pixels=p0:p63", "--on-error", "fail")
    assert stopped.returncode == 1, stopped.stderr
    assert "rows 64-127 (chunk 1) failed: INVALID_ARGUMENT" in stopped.stderr
    run_id = stopped.stderr.split("inferq batch resume ")[1].split()[0]
    assert not out.exists()
    status = inferq("status", run_id)
    assert "status   stopped" in status.stdout and "row 100: column 'p9' is empty" in \
        status.stdout
    finished = inferq("resume", run_id, "--on-error", "skip", "--json")
    assert finished.returncode == 4, finished.stderr
    summary = json.loads(finished.stdout)
    assert (summary["rows"], summary["rows_failed"]) == (130, 64)
    assert (summary["jobs_submitted"], summary["jobs_adopted"]) == (2, 0)  # chunks 0 and 2
    labels = pq.read_table(out).column("label").to_pylist()
    assert labels[64:128] == [None] * 64 and None not in labels[:64] + labels[128:]


# --- retries ------------------------------------------------------------------------------

#: The lookup model: y = TABLE[int(x)]. A row with x outside 0-9 passes every input check
#: and makes ONNX Runtime itself fail (Gather index out of bounds): INTERNAL, which may pass,
#: so its chunk is retried.
TABLE = np.arange(10, dtype=np.float32) * 10


def _lookup_model() -> bytes:
    import onnx

    h = onnx.helper
    graph = h.make_graph(
        [h.make_node("Cast", ["x"], ["i"], to=onnx.TensorProto.INT64),
         h.make_node("Gather", ["table", "i"], ["y"], axis=0)],
        "lookup",
        [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 1])],
        [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 1])],
        [onnx.numpy_helper.from_array(TABLE, "table")])
    return _finish(graph)


@pytest.fixture(scope="module")
def lookup_worker(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
                  ) -> Any:
    root = tmp_path_factory.mktemp("lookup-models")
    write_model(root, "lookup", _lookup_model(), description="y = table[x]", max_rows=8,
                input_name="x", input_shape=[-1, 1], output_name="y", output_shape=[-1, 1])
    worker = WorkerProcess(redis_server.url, tmp_path_factory.mktemp("lookup-worker"),
                           model_dir=root)
    worker.start()
    yield worker
    worker.stop()


def _lookup_input(path: Path, bad_row: int | None, rows: int = 12) -> np.ndarray:
    x = (np.arange(rows) % 10).astype(np.float32)
    if bad_row is not None:
        x[bad_row] = 12.0  # out of the table: the model fails on this row's chunk
    pq.write_table(pa.table({"id": np.arange(rows), "x": x}), path)
    return x


def _lookup_run(url: str, tmp_path: Path, **kw: Any) -> Any:
    spec = RunSpec(**{"model": "lookup", "input": str(tmp_path / "in.parquet"),
                      "output": str(tmp_path / "out.parquet"), "columns": ["x=x"],
                      "id_column": "id", "chunk_rows": 4, **kw})
    with InferenceClient(url) as client:
        return runs.run(client, spec, bar=False)


def test_a_chunk_the_model_fails_on_is_retried_then_recorded(
        redis_server: RedisServer, lookup_worker: WorkerProcess, tmp_path: Path) -> None:
    x = _lookup_input(tmp_path / "in.parquet", bad_row=5)
    before = len(_model_failures(lookup_worker))
    summary = _lookup_run(redis_server.url, tmp_path, retries=2)
    assert (summary.rows, summary.rows_failed, summary.retries) == (12, 4, 2)
    assert summary.failed_by_code == {"INTERNAL": 4}
    [error] = [json.loads(line) for line in
               errors_path(tmp_path / "out.parquet").read_text().splitlines()]
    assert (error["chunk"], error["first_row"], error["last_row"]) == (1, 4, 7)
    assert (error["code"], error["tries"], error["ids"]) == ("INTERNAL", 3, [4, 5, 6, 7])
    assert "the model failed on this job" in error["message"]
    y = pq.read_table(tmp_path / "out.parquet").column("y").to_pylist()
    want = [[float(TABLE[int(v) % 10])] for v in x]
    assert y[:4] == want[:4] and y[4:8] == [None] * 4 and y[8:] == want[8:]
    # Each try was a job the worker ran and failed: the first result plus two retries.
    assert len(_model_failures(lookup_worker)) - before == 3


def _model_failures(worker: WorkerProcess) -> list[dict[str, object]]:
    return [r for r in worker.log_records() if r.get("event") == "job_run_failed"]


def test_a_chunk_that_still_fails_stops_a_fail_run_after_its_retries(
        redis_server: RedisServer, lookup_worker: WorkerProcess, tmp_path: Path) -> None:
    _lookup_input(tmp_path / "in.parquet", bad_row=9)
    with pytest.raises(BatchStopped, match=r"rows 8-11 \(chunk 2\) failed: INTERNAL"):
        _lookup_run(redis_server.url, tmp_path, retries=1, on_error="fail")
    spool = Spool(spool_dir(tmp_path / "out.parquet"))
    state = RunState(redis.Redis.from_url(redis_server.url), spool.run()["run_id"])
    assert state.r.hget(state.key, "status") == b"stopped"
    assert not (tmp_path / "out.parquet").exists()
    assert 2 not in spool.finished(), "no chunk file: a resume sends the chunk again"


def test_a_chunk_lost_with_its_worker_is_sent_again_and_scored(
        fresh_redis: RedisServer, start_worker: Any, tmp_path: Path) -> None:
    worker = start_worker(fresh_redis.url).start()
    worker.kill()  # still advertised for a few seconds: the run starts, nothing answers
    x = _rows(40)
    pq.write_table(_table(x), tmp_path / "in.parquet")
    out = tmp_path / "out.parquet"
    env = python_env(INFERQ_BROKER_URL=fresh_redis.url, INFERQ_RESULT_URL=fresh_redis.url)
    run = subprocess.Popen(
        [PY, "-m", "workers.launch.cli", "batch", "run", "digits", "--input",
         str(tmp_path / "in.parquet"), "--output", str(out), "--columns", "pixels=p0:p63",
         "--id-column", "id", "--chunk-rows", "16", "--timeout", "1", "--retries", "8",
         "--json"], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    time.sleep(2.5)  # past the first timeout: every chunk was sent again at least once
    assert run.poll() is None
    start_worker(fresh_redis.url).start()
    stdout, stderr = run.communicate(timeout=60)
    assert run.returncode == 0, stderr
    summary = json.loads(stdout)
    assert (summary["rows"], summary["rows_failed"]) == (40, 0)
    assert summary["retries"] >= 3 and summary["jobs_submitted"] > 3
    table = pq.read_table(out)
    assert table.column("id").to_pylist() == [i * 10 for i in range(40)]  # no gap, no twin
    assert table.column("label").to_pylist() == _direct(x)[0].tolist()


# --- versions -----------------------------------------------------------------------------


def test_version_by_alias_or_number_is_what_the_summary_reports(
        redis_server: RedisServer, shared_worker: WorkerProcess, tmp_path: Path) -> None:
    from workers.ops.routes import set_alias

    x = _rows(20)
    pq.write_table(_table(x), tmp_path / "in.parquet")
    env = python_env(INFERQ_BROKER_URL=redis_server.url, INFERQ_RESULT_URL=redis_server.url)
    r = redis.Redis.from_url(redis_server.url)

    def batch(out: str, version: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [PY, "-m", "workers.launch.cli", "batch", "run", "digits", "--input",
             str(tmp_path / "in.parquet"), "--output", str(tmp_path / out), "--columns",
             "pixels=p0:p63", "--version", version, "--json"],
            env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)

    set_alias(r, "digits", "batch-canary", 1)
    try:
        by_alias = batch("alias.parquet", "batch-canary")
    finally:
        set_alias(r, "digits", "batch-canary", None)
    assert by_alias.returncode == 0, by_alias.stderr
    assert json.loads(by_alias.stdout)["rows_by_version"] == {"1": 20}
    by_number = batch("number.parquet", "2")
    assert by_number.returncode == 0, by_number.stderr
    assert json.loads(by_number.stdout)["rows_by_version"] == {"2": 20}
    assert pq.read_table(tmp_path / "number.parquet").column("label").to_pylist() == \
        _direct(x)[0].tolist()
    unknown = batch("unknown.parquet", "no-such-alias")
    assert unknown.returncode == 1
    assert "has no alias 'no-such-alias'" in unknown.stderr
    assert not spool_dir(tmp_path / "unknown.parquet").exists()  # refused before anything
