"""``inferq models``: add, check, list and remove through the command line, and a model
brought in with ``models add`` served by a real worker.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner, Result

from producer import InferenceClient
from tests.conftest import ROOT
from workers.launch.cli import main
from workers.launch.redisproc import RedisServer

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

DIGITS = ROOT / "models" / "digits"


def _classifier(path: Path) -> Path:
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    x, y = load_iris(return_X_y=True)
    clf = LogisticRegression(max_iter=500).fit(x.astype(np.float32), y)
    model = to_onnx(clf, initial_types=[("features", FloatTensorType([None, 4]))],
                    options={id(clf): {"zipmap": False}}, target_opset={"": 17, "ai.onnx.ml": 3})
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path


def _fixed_batch(path: Path) -> Path:
    """y = x @ W with the batch dimension fixed to 1 in the graph."""
    w = numpy_helper.from_array(np.ones((4, 2), np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])], "fixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path


@pytest.fixture(scope="module")
def iris(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _classifier(tmp_path_factory.mktemp("src") / "iris.onnx")


def inferq(*args: Any, env: dict[str, str] | None = None, stdin: str | None = None) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args], env=env, input=stdin)


def test_add_then_check(tmp_path: Path, iris: Path) -> None:
    repo = tmp_path / "models"
    added = inferq("models", "add", iris, "--name", "iris", "--description", "iris species",
                   "--model-dir", repo)
    assert added.exit_code == 0, added.output
    assert "added iris v1" in added.stdout and "in  features: float32[-1, 4]" in added.stdout
    assert "max_batch_rows 64, max_wait_ms 2.0" in added.stdout
    checked = inferq("models", "check", "--model-dir", repo)
    assert checked.exit_code == 0, checked.output
    assert re.fullmatch(r"iris v1 OK \(cpu, \d+ ms\)\n", checked.stdout)
    listed = inferq("models", "--model-dir", repo)
    assert listed.exit_code == 0 and "iris  versions [1]" in listed.stdout
    assert "  iris species" in listed.stdout


def test_check_names_every_broken_model(tmp_path: Path, iris: Path) -> None:
    repo = tmp_path / "models"
    shutil.copytree(DIGITS, repo / "digits", ignore=shutil.ignore_patterns("build.py"))
    toml = repo / "digits" / "model.toml"
    good = hashlib.sha256((DIGITS / "1" / "model.onnx").read_bytes()).hexdigest()
    toml.write_text(toml.read_text().replace(good, "0" * 64))  # v1's checksum is wrong
    (repo / "malformed").mkdir()
    (repo / "malformed" / "model.toml").write_text("max_batch_rows = [\n")
    fixed = repo / "fixed"
    (fixed / "1").mkdir(parents=True)
    _fixed_batch(fixed / "1" / "model.onnx")
    sha = hashlib.sha256((fixed / "1" / "model.onnx").read_bytes()).hexdigest()
    (fixed / "model.toml").write_text(  # declared as if it batched
        'max_batch_rows = 64\n'
        'inputs = [{name = "x", dtype = "float32", shape = [-1, 4]}]\n'
        'outputs = [{name = "y", dtype = "float32", shape = [-1, 2]}]\n'
        f'[versions.1]\nsha256 = "{sha}"\n')
    result = inferq("models", "check", "--model-dir", repo)
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert lines[0].startswith("digits v1 FAILED: model digits v1: ") and "sha256" in lines[0]
    assert re.fullmatch(r"digits v2 OK \(cpu, \d+ ms\)", lines[1])
    assert lines[2] == ("fixed v1 FAILED: model fixed v1: the graph's input 'x' has a fixed "
                        "batch dimension 1; set max_batch_rows = 1 (or re-export with a dynamic "
                        "batch axis)")
    assert lines[3].startswith("malformed FAILED: ") and "model.toml" in lines[3]
    assert len(lines) == 4
    assert "Traceback" not in result.output
    assert "3 of the models" in result.stderr
    listed = inferq("models", "--model-dir", repo)  # the listing fails on the malformed one
    assert listed.exit_code == 1 and "malformed  FAILED" in listed.stdout


def test_tune_writes_values_with_the_measurement(tmp_path: Path, iris: Path) -> None:
    repo = tmp_path / "models"
    result = inferq("models", "add", iris, "--name", "tuned", "--tune", "--model-dir", repo,
                    env={"INFERQ_INTRA_OP_THREADS": "1"})
    assert result.exit_code == 0, result.output
    text = (repo / "tuned" / "model.toml").read_text()
    doc = tomllib.loads(text)
    comment = re.search(r"# inferq models add --tune \(cpu, 1 threads, [\d-]+\): rows/s by batch "
                        r"size 1: [\d,]+, 2: [\d,]+.*\n# max_batch_rows = (\d+) ", text)
    assert comment is not None, text
    assert doc["max_batch_rows"] == int(comment.group(1))
    assert doc["max_wait_ms"] >= 1.0
    assert inferq("models", "check", "--model-dir", repo).exit_code == 0


def test_model_dir_from_the_environment(tmp_path: Path, iris: Path) -> None:
    repo = tmp_path / "env-models"
    env = {"INFERQ_MODEL_DIR": str(repo)}
    assert inferq("models", "add", iris, "--name", "iris", env=env).exit_code == 0
    assert inferq("models", "add", iris, "--name", "iris", env=env).exit_code == 0
    assert (repo / "iris" / "2" / "model.onnx").is_file()
    listed = inferq("models", env=env)
    assert listed.exit_code == 0 and "iris  versions [1, 2]" in listed.stdout
    assert "digits" not in listed.stdout
    checked = inferq("models", "check", env=env)
    assert checked.exit_code == 0 and "iris v2 OK" in checked.stdout
    removed = inferq("models", "remove", "iris", "--version", "1", env=env)
    assert removed.exit_code == 0 and "removed iris v1" in removed.stdout
    kept = inferq("models", "remove", "iris", "--version", "2", env=env, stdin="n\n")
    assert kept.exit_code == 1 and (repo / "iris").is_dir()  # the last version asks first
    gone = inferq("models", "remove", "iris", "--version", "2", "--yes", env=env)
    assert gone.exit_code == 0 and not (repo / "iris").exists()


def test_refusals_are_one_or_two_lines(tmp_path: Path, iris: Path) -> None:
    repo = tmp_path / "models"
    assert inferq("models", "add", iris, "--name", "iris", "--model-dir", repo).exit_code == 0
    other = _fixed_batch(tmp_path / "fixed.onnx")
    result = inferq("models", "add", other, "--name", "iris", "--model-dir", repo)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "input 'features': float32[-1, 4] in the manifest, not in the graph" in result.stderr
    missing = inferq("models", "check", "--model-dir", tmp_path / "nowhere")
    assert missing.exit_code == 1 and "does not exist" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) <= 2


@pytest.mark.integration
def test_a_model_brought_in_is_served(redis_server: RedisServer, start_worker: Any,
                                      tmp_path: Path, iris: Path) -> None:
    import onnxruntime as ort

    repo = tmp_path / "models"
    name = f"iris-{uuid.uuid4().hex[:8]}"  # its own queue on the shared Redis
    added = inferq("models", "add", iris, "--name", name, "--model-dir", repo)
    assert added.exit_code == 0, added.output
    start_worker(redis_server.url, model_dir=repo).start()
    x = np.array([[5.9, 3.0, 5.1, 1.8]], dtype=np.float32)
    with InferenceClient(redis_server.url) as client:
        result = client.submit(name, {"features": x[0]}).result(timeout=30)
    session = ort.InferenceSession(str(iris), providers=["CPUExecutionProvider"])
    label, probabilities = session.run(["label", "probabilities"], {"features": x})
    assert result.model == name and result.version == 1
    np.testing.assert_array_equal(result["label"], label)
    np.testing.assert_array_equal(result["probabilities"], probabilities)
