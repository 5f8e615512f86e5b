"""Every kind of graph ``inferq models add`` takes, served by one real worker, answers what
ONNX Runtime answers for the same job alone; the kind it refuses is refused by ``models add``
and, written by hand, by the worker that finds it, while the others serve.

Built here (scikit-learn + skl2onnx and ``onnx.helper``; opset 17, IR 8), one repository:

- ``iris``: LogisticRegression exported with the ZipMap off (int64 label + float32
  probabilities);
- ``zipped``: the same classifier with skl2onnx's default ZipMap: refused by ``models add``,
  then written by hand with a correct sha256 so the worker finds it and refuses it at load;
- ``single``: a graph whose batch dimension is fixed to 1 (a 3-row job runs row by row);
- ``half``: float16 in, float16 out;
- ``pair``: two inputs of different dtypes, one int64 (int64 and float32 outputs);
- ``pool``: mean pooling over a variable-length sequence axis, [batch, seq, 4] -> [batch, 4],
  whose answer zero padding would change: jobs batch only with jobs of their own length.

One worker process serves the module from its own database of the session's redis-server
(the session's ``shared_worker`` uses database 0). Every job is checked against
``onnxruntime.InferenceSession`` on the same file run on that job's inputs alone: exact for
integer outputs, ``np.testing.assert_allclose(rtol=1e-6, atol=0)`` for float outputs.
"""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from click.testing import CliRunner

from producer import InferenceClient, JobResult
from tests.conftest import PY, ROOT, WorkerProcess, python_env
from workers.launch.cli import main
from workers.launch.redisproc import RedisServer

pytestmark = pytest.mark.integration

onnx = pytest.importorskip("onnx")
pytest.importorskip("skl2onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

#: This module's database on the session's redis-server (11 and 12 are other modules').
DB = 13
#: Float outputs must equal ONNX Runtime's to this relative tolerance (and atol 0).
RTOL = 1e-6
RNG = np.random.default_rng(17)
SERVED = ("half", "iris", "pair", "pool", "single")
#: The sequence lengths of the pooling jobs, in submission order.
LENGTHS = (3, 5, 3, 5, 3)


# --- the graphs --------------------------------------------------------------------------


def _finish(graph: Any) -> Any:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _classifier(zipmap: bool) -> Any:
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    x, y = load_iris(return_X_y=True)
    clf = LogisticRegression(max_iter=500).fit(x.astype(np.float32), y)
    model = to_onnx(clf, initial_types=[("features", FloatTensorType([None, 4]))],
                    options={id(clf): {"zipmap": zipmap}},
                    target_opset={"": 17, "ai.onnx.ml": 3})
    model.ir_version = 8
    return model


def _affine(batch: Any, dtype: int) -> Any:
    """y = x @ W + b: x [batch, 4] -> y [batch, 2]."""
    np_type = helper.tensor_dtype_to_np_dtype(dtype)
    w = numpy_helper.from_array(RNG.standard_normal((4, 2)).astype(np_type), "W")
    b = numpy_helper.from_array(RNG.standard_normal(2).astype(np_type), "b")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["xw"]),
         helper.make_node("Add", ["xw", "b"], ["y"])],
        "affine", [helper.make_tensor_value_info("x", dtype, [batch, 4])],
        [helper.make_tensor_value_info("y", dtype, [batch, 2])], [w, b])
    return _finish(graph)


def _pair() -> Any:
    """total = values * 0.5 + float(ids); best = argmax(total) per row."""
    half = numpy_helper.from_array(np.array(0.5, np.float32), "half")
    graph = helper.make_graph(
        [helper.make_node("Cast", ["ids"], ["ids_f"], to=TensorProto.FLOAT),
         helper.make_node("Mul", ["values", "half"], ["scaled"]),
         helper.make_node("Add", ["scaled", "ids_f"], ["total"]),
         helper.make_node("ArgMax", ["total"], ["best"], axis=1, keepdims=0)], "pair",
        [helper.make_tensor_value_info("values", TensorProto.FLOAT, ["N", 3]),
         helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 3])],
        [helper.make_tensor_value_info("total", TensorProto.FLOAT, ["N", 3]),
         helper.make_tensor_value_info("best", TensorProto.INT64, ["N"])], [half])
    return _finish(graph)


def _pool() -> Any:
    """Mean over the sequence axis: zero rows padded on would pull every mean towards 0."""
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["tokens"], ["pooled"], axes=[1], keepdims=0)], "pool",
        [helper.make_tensor_value_info("tokens", TensorProto.FLOAT, ["batch", "seq", 4])],
        [helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["batch", 4])])
    return _finish(graph)


def _tokens(length: int) -> np.ndarray:
    # Offset from 0, so a padded mean would differ from the true one.
    return (RNG.standard_normal((1, length, 4)) + 3.0).astype(np.float32)


def _iris_rows() -> np.ndarray:
    from sklearn.datasets import load_iris

    return load_iris().data[[0, 60, 120, 149]].astype(np.float32)


def _jobs() -> dict[str, list[dict[str, np.ndarray]]]:
    """Each served model's jobs (inputs with their batch axis), one job per entry."""
    return {
        "iris": [{"features": _iris_rows()}, {"features": _iris_rows()[1:2]}],
        "single": [{"x": RNG.standard_normal((3, 4)).astype(np.float32)},
                   {"x": RNG.standard_normal((1, 4)).astype(np.float32)}],
        "half": [{"x": RNG.standard_normal((5, 4)).astype(np.float16)},
                 {"x": RNG.standard_normal((1, 4)).astype(np.float16)}],
        "pair": [{"values": RNG.standard_normal((4, 3)).astype(np.float32),
                  "ids": np.array([[0, 1, 2], [-7, 2**40, 3], [2**62, -(2**62), 0],
                                   [5, 5, 6]], np.int64)},
                 {"values": np.array([[1.0, -1.0, 0.25]], np.float32),
                  "ids": np.array([[9, -3, 2**33]], np.int64)}],
        "pool": [{"tokens": _tokens(3)}, {"tokens": _tokens(5)},
                 {"tokens": np.concatenate([_tokens(4), _tokens(4)])}],
    }


# --- ONNX Runtime alone ------------------------------------------------------------------


class Reference:
    """ONNX Runtime on the repository's own files, one job at a time."""

    def __init__(self, repo: Path) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1  # as the worker runs (INFERQ_INTRA_OP_THREADS=1)
        self.sessions = {
            name: ort.InferenceSession(str(repo / name / "1" / "model.onnx"), options,
                                       providers=["CPUExecutionProvider"])
            for name in SERVED}

    def run(self, model: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        session = self.sessions[model]
        names = [o.name for o in session.get_outputs()]
        if model == "single":  # the graph takes one row per run: the job's rows one by one
            rows = [session.run(names, {k: v[i:i + 1] for k, v in inputs.items()})
                    for i in range(len(next(iter(inputs.values()))))]
            return {n: np.concatenate([r[j] for r in rows]) for j, n in enumerate(names)}
        return dict(zip(names, session.run(names, inputs), strict=True))


def assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray], what: str) -> None:
    assert set(got) == set(want), what
    for name, expected in want.items():
        actual = got[name]
        assert (actual.dtype, actual.shape) == (expected.dtype, expected.shape), (what, name)
        if np.issubdtype(expected.dtype, np.floating):
            np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=0,
                                       err_msg=f"{what} {name}")
        else:
            np.testing.assert_array_equal(actual, expected, err_msg=f"{what} {name}")


# --- the repository, the worker ----------------------------------------------------------


def inferq(*args: Any) -> Any:
    return CliRunner().invoke(main, [str(a) for a in args])


@dataclass
class Stack:
    url: str
    repo: Path
    worker: WorkerProcess
    reference: Reference
    zipmap_refusal: str
    #: The pooling jobs queued before the worker started: (length, inputs, result).
    drained: list[tuple[int, dict[str, np.ndarray], JobResult]] = field(default_factory=list)


def _build_repository(root: Path, sources: Path) -> str:
    """Add every kind with ``inferq models add``; return its refusal of the ZipMap graph,
    then write the ZipMap model into the repository by hand."""
    graphs = {"iris": _classifier(False), "single": _affine(1, TensorProto.FLOAT),
              "half": _affine("N", TensorProto.FLOAT16), "pair": _pair(), "pool": _pool()}
    for name, model in graphs.items():
        source = sources / f"{name}.onnx"
        source.write_bytes(model.SerializeToString())
        added = inferq("models", "add", source, "--name", name, "--model-dir", root)
        assert added.exit_code == 0, added.output
        assert f"added {name} v1" in added.stdout

    zipped = sources / "zipped.onnx"
    zipped.write_bytes(_classifier(True).SerializeToString())
    refused = inferq("models", "add", zipped, "--name", "zipped", "--model-dir", root)
    assert refused.exit_code == 1 and "Traceback" not in refused.output, refused.output
    assert not (root / "zipped").exists()
    # By hand, as someone would who declared the probabilities as the tensor they expected.
    data = zipped.read_bytes()
    (root / "zipped" / "1").mkdir(parents=True)
    (root / "zipped" / "1" / "model.onnx").write_bytes(data)
    (root / "zipped" / "model.toml").write_text(
        'description = "iris with the ZipMap on, written by hand"\n'
        'inputs = [{name = "features", dtype = "float32", shape = [-1, 4]}]\n'
        'outputs = [{name = "output_label", dtype = "int64", shape = [-1]},\n'
        '           {name = "output_probability", dtype = "float32", shape = [-1, 3]}]\n'
        f'[versions.1]\nsha256 = "{hashlib.sha256(data).hexdigest()}"\n')
    return str(refused.stderr)


@pytest.fixture(scope="module")
def stack(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[Stack]:
    url = f"redis://127.0.0.1:{redis_server.port}/{DB}"
    redis.Redis.from_url(url).flushdb()
    repo = tmp_path_factory.mktemp("kinds") / "models"
    refusal = _build_repository(repo, tmp_path_factory.mktemp("sources"))
    reference = Reference(repo)
    # Pooling jobs of lengths 3, 5, 3, 5, 3 wait on the queue before any worker is live, so
    # the worker's first drain takes all five at once.
    queued = [{"tokens": _tokens(n)} for n in LENGTHS]
    with InferenceClient(url, queue_without_workers=True) as early:
        handles = early.submit_many("pool", queued)
    worker = WorkerProcess(url, tmp_path_factory.mktemp("worker-logs"), model_dir=repo)
    worker.start()
    try:
        with InferenceClient(url) as client:
            results = client.results([h.id for h in handles], timeout=30)
        yield Stack(url, repo, worker, reference, refusal,
                    list(zip(LENGTHS, queued, results, strict=True)))
    finally:
        worker.stop()
        redis.Redis.from_url(url).flushdb()


# --- the tests ---------------------------------------------------------------------------


def test_the_repository_models_add_wrote(stack: Stack) -> None:
    """``models add`` read each signature from the graph (-1 for every free dimension) and
    gave the fixed-batch graph batches of one row; the ZipMap graph was refused with the fix."""
    from workers.repository import load_manifest

    manifests = {name: load_manifest(stack.repo / name) for name in SERVED}
    sig = {name: ([(s.name, s.dtype, s.shape) for s in m.inputs],
                  [(s.name, s.dtype, s.shape) for s in m.outputs])
           for name, m in manifests.items()}
    assert sig == {
        "iris": ([("features", "float32", (-1, 4))],
                 [("label", "int64", (-1,)), ("probabilities", "float32", (-1, 3))]),
        "single": ([("x", "float32", (-1, 4))], [("y", "float32", (-1, 2))]),
        "half": ([("x", "float16", (-1, 4))], [("y", "float16", (-1, 2))]),
        "pair": ([("values", "float32", (-1, 3)), ("ids", "int64", (-1, 3))],
                 [("total", "float32", (-1, 3)), ("best", "int64", (-1,))]),
        "pool": ([("tokens", "float32", (-1, -1, 4))], [("pooled", "float32", (-1, 4))]),
    }
    assert manifests["single"].max_batch_rows == 1
    assert {manifests[n].max_batch_rows for n in SERVED if n != "single"} == {64}
    assert "model 'zipped'" in stack.zipmap_refusal
    assert "output 'output_probability' is seq(map(int64,tensor(float)))" in stack.zipmap_refusal
    assert '{"zipmap": False}' in stack.zipmap_refusal
    assert len(stack.zipmap_refusal.strip().splitlines()) <= 2


def test_the_worker_serves_the_good_ones_and_refuses_the_zipmap(stack: Stack) -> None:
    with InferenceClient(stack.url) as client:
        advertised = client.models()
    assert sorted(advertised) == list(SERVED)  # zipped is not advertised
    assert advertised["pool"].inputs[0].shape == (-1, -1, 4)
    refused = [r for r in stack.worker.log_records() if r.get("event") == "model_not_served"]
    assert [(r.get("model"), r.get("version")) for r in refused] == [("zipped", 1)], refused
    assert "output 'output_probability' is seq(map(int64,tensor(float)))" in str(
        refused[0]["reason"])
    assert stack.worker.proc is not None and stack.worker.proc.poll() is None


def test_inferq_check_names_the_zipmap_model_as_not_ready(stack: Stack) -> None:
    check = subprocess.run(
        [PY, "-m", "workers.launch.cli", "check", "--hostname", stack.worker.hostname],
        env=python_env(), capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert check.returncode == 0, check.stdout + check.stderr
    out = check.stdout
    assert f"ready: {stack.worker.hostname} serving {', '.join(SERVED)}" in out
    assert "zipped v1 not ready: model 'zipped': output 'output_probability' is " \
           "seq(map(int64,tensor(float)))" in out


def test_the_worker_says_how_to_fix_a_zipmap_model(stack: Stack) -> None:
    [refused] = [r for r in stack.worker.log_records() if r.get("event") == "model_not_served"]
    assert "zipmap" in str(refused["reason"]).lower()


@pytest.mark.parametrize("model", SERVED)
def test_inferq_client_gets_what_onnx_runtime_gives(stack: Stack, model: str) -> None:
    jobs = _jobs()[model]
    with InferenceClient(stack.url) as client:
        # One job at a time: each result is that job's run alone.
        results = [client.submit(model, inputs).result(timeout=30) for inputs in jobs]
    for i, (inputs, result) in enumerate(zip(jobs, results, strict=True)):
        assert (result.model, result.version, result.worker) == (model, 1, stack.worker.hostname)
        assert_same(dict(result.outputs), stack.reference.run(model, inputs), f"{model} job {i}")
        rows = len(next(iter(inputs.values())))
        # The fixed-batch graph runs a job row by row; the others run it whole.
        assert result.batch_size == (1 if model == "single" else rows)


_CELERY_CLIENT = textwrap.dedent("""
    import base64, json, sys
    from celery import Celery

    url, jobs = sys.argv[1], json.load(sys.stdin)
    app = Celery(broker=url, backend=url)
    out = []
    for model, inputs in jobs:
        tensors = {name: {"dtype": t["dtype"], "shape": t["shape"],
                          "data": base64.b64decode(t["data"])} for name, t in inputs.items()}
        sent = app.send_task("inferq.infer", args=[model, tensors], kwargs={"version": None},
                             queue="inferq." + model, serializer="msgpack")
        out.append(app.AsyncResult(sent.id).get(timeout=30))
    out.append(sorted(m for m in sys.modules
                      if m.split(".")[0] in ("producer", "workers", "onnxruntime")))
    print(json.dumps(out))
""")


def _to_wire(arr: np.ndarray) -> dict[str, Any]:
    little = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
    return {"dtype": str(arr.dtype), "shape": list(arr.shape),
            "data": base64.b64encode(little.tobytes()).decode()}


def _from_wire(tensor: dict[str, Any]) -> np.ndarray:
    data = base64.b64decode(tensor["data"])
    return np.frombuffer(data, np.dtype(tensor["dtype"]).newbyteorder("<")).reshape(
        tensor["shape"]).astype(tensor["dtype"])


def test_plain_celery_client_gets_what_onnx_runtime_gives(stack: Stack) -> None:
    """The same jobs, sent by ``celery.Celery.send_task`` (msgpack, raw bytes) from a
    process that never imports inferq, read with ``AsyncResult(id).get()``."""
    jobs = [(model, inputs) for model in SERVED for inputs in _jobs()[model]]
    payload = [[model, {k: _to_wire(v) for k, v in inputs.items()}] for model, inputs in jobs]
    proc = subprocess.run([PY, "-c", _CELERY_CLIENT, stack.url], input=json.dumps(payload),
                          capture_output=True, text=True, timeout=120, cwd="/",
                          env=python_env(PYTHONPATH=""))
    assert proc.returncode == 0, proc.stderr
    *answers, modules = json.loads(proc.stdout.strip().splitlines()[-1])
    assert modules == []
    assert len(answers) == len(jobs)
    for (model, inputs), answer in zip(jobs, answers, strict=True):
        assert (answer["model"], answer["version"]) == (model, 1)
        outputs = {name: _from_wire(t) for name, t in answer["outputs"].items()}
        assert_same(outputs, stack.reference.run(model, inputs), f"celery {model}")


def test_sequence_jobs_batch_only_with_jobs_of_their_length(stack: Stack) -> None:
    """Five jobs of lengths 3, 5, 3, 5, 3, all queued before the worker's first drain: the
    three of length 3 ran as one batch of 3 rows, the two of length 5 as one of 2, nothing
    padded (each answer is ORT's for that job alone)."""
    assert [n for n, _, _ in stack.drained] == list(LENGTHS)
    for length, inputs, result in stack.drained:
        assert_same(dict(result.outputs), stack.reference.run("pool", inputs), f"len {length}")
        assert result.batch_size == LENGTHS.count(length), (length, result.batch_size)
    batches = [(r["jobs"], r["rows"]) for r in stack.worker.log_records()
               if r.get("event") == "batch" and r.get("model") == "pool"]
    # The first drain's two batches come first in the log (the fixture waited for them).
    assert sorted(batches[:2]) == [(2, 2), (3, 3)], batches


def test_sequence_jobs_submitted_to_a_live_worker(stack: Stack) -> None:
    """The same lengths with the worker live: however the worker groups them, a batch holds
    jobs of one length only, and each answer is ORT's for that job alone."""
    inputs = [{"tokens": _tokens(n)} for n in LENGTHS]
    with InferenceClient(stack.url) as client:
        handles = client.submit_many("pool", inputs)
        results = client.results([h.id for h in handles], timeout=30)
    for length, job, result in zip(LENGTHS, inputs, results, strict=True):
        assert_same(dict(result.outputs), stack.reference.run("pool", job), f"len {length}")
        # A batch of jobs of one length holds at most the jobs of that length.
        assert 1 <= result.batch_size <= LENGTHS.count(length)
    for length in set(LENGTHS):
        # Every job of a batch of k one-row jobs reports k: among the jobs of one length,
        # each reported size k shows up a multiple of k times.
        got = [r.batch_size for n, r in zip(LENGTHS, results, strict=True) if n == length]
        assert all(got.count(k) % k == 0 for k in set(got)), (length, got)
