"""Bringing a model in: reading a graph's signature, writing its manifest, the batching
defaults, the load-path checks that name a model and say what to change, and the TOML
writer. Every model is built here (skl2onnx, onnx.helper: opset 17, IR 8); nothing is
downloaded.
"""

from __future__ import annotations

import datetime
import hashlib
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from producer.wire import TensorSpec
from workers.repository import ManifestError, load_manifest, manifest_toml
from workers.repository.graph import plan_batching, read_graph
from workers.repository.importing import add_model, remove_version, versions
from workers.repository.manifest import scan_all
from workers.serving import runtime

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "models" / "digits"
RNG = np.random.default_rng(3)


def _verify(manifest: Any, version: int) -> None:
    runtime.load(manifest, version, "cpu", 1)  # the worker's load path


def _finish(graph: Any) -> Any:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _save(model: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path


def _affine(batch: Any = "N", width: int = 4, dtype: int = TensorProto.FLOAT) -> Any:
    """y = x @ W: x [batch, width] -> y [batch, 2]."""
    np_type = helper.tensor_dtype_to_np_dtype(dtype)
    w = numpy_helper.from_array(RNG.standard_normal((width, 2)).astype(np_type), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])], "affine",
        [helper.make_tensor_value_info("x", dtype, [batch, width])],
        [helper.make_tensor_value_info("y", dtype, [batch, 2])], [w])
    return _finish(graph)


def _classifier(zipmap: bool) -> Any:
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    x, y = load_iris(return_X_y=True)
    clf = LogisticRegression(max_iter=500).fit(x.astype(np.float32), y)
    model = to_onnx(clf, initial_types=[("x", FloatTensorType([None, 4]))],
                    options={id(clf): {"zipmap": zipmap}},
                    target_opset={"": 17, "ai.onnx.ml": 3})
    model.ir_version = 8
    return model


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save(_classifier(False), tmp_path_factory.mktemp("src") / "iris.onnx")


def _toml(folder: Path) -> dict[str, Any]:
    return tomllib.loads((folder / "model.toml").read_text())


# --- reading graphs ---------------------------------------------------------------------


def test_classifier_becomes_a_batched_model(tmp_path: Path, classifier: Path) -> None:
    added = add_model(classifier, tmp_path, "iris", verify=_verify)
    m = load_manifest(tmp_path / "iris")
    assert m == added.manifest and added.version == 1
    assert m.inputs == (TensorSpec("x", "float32", (-1, 4)),)
    assert m.outputs == (TensorSpec("label", "int64", (-1,)),
                         TensorSpec("probabilities", "float32", (-1, 3)))
    assert (m.max_batch_rows, m.max_wait_ms, m.batched) == (64, 2.0, True)
    data = (tmp_path / "iris" / "1" / "model.onnx").read_bytes()
    assert data == classifier.read_bytes()
    assert m.versions[1].sha256 == hashlib.sha256(data).hexdigest()
    assert "--tune" in (tmp_path / "iris" / "model.toml").read_text()  # the defaults say so
    x = RNG.standard_normal((5, 4)).astype(np.float32)
    out = runtime.load(m, 1, "cpu", 1).run({"x": x})
    assert out["label"].shape == (5,) and out["probabilities"].shape == (5, 3)


def test_zipmap_is_refused_with_the_fix(tmp_path: Path) -> None:
    source = _save(_classifier(True), tmp_path / "zipped.onnx")
    with pytest.raises(ManifestError) as info:
        add_model(source, tmp_path / "models", "iris")
    message = str(info.value)
    assert "model 'iris'" in message and "output 'output_probability'" in message
    assert "seq(map(int64,tensor(float)))" in message
    assert '{"zipmap": False}' in message and "id(clf)" in message and "type(clf)" in message
    assert not (tmp_path / "models").exists()


def test_string_tensors_are_refused(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["text"], ["same"])], "strings",
        [helper.make_tensor_value_info("text", TensorProto.STRING, ["N"])],
        [helper.make_tensor_value_info("same", TensorProto.STRING, ["N"])])
    source = _save(_finish(graph), tmp_path / "strings.onnx")
    with pytest.raises(ManifestError) as info:
        add_model(source, tmp_path, "words")
    lines = str(info.value).splitlines()
    assert len(lines) == 2  # one line per offending input and output
    assert "input 'text' is tensor(string)" in lines[0] and "int64 ids" in lines[0]
    assert "output 'same' is tensor(string)" in lines[1]


def test_fixed_batch_of_one_runs_row_by_row(tmp_path: Path) -> None:
    source = _save(_affine(batch=1), tmp_path / "single.onnx")
    add_model(source, tmp_path / "models", "single", verify=_verify)
    m = load_manifest(tmp_path / "models" / "single")
    assert m.inputs == (TensorSpec("x", "float32", (-1, 4)),)
    assert (m.max_batch_rows, m.max_wait_ms) == (1, 0.0)
    text = (tmp_path / "models" / "single" / "model.toml").read_text()
    assert "# max_batch_rows = 1: the graph fixes the batch dimension of input 'x', output " \
           "'y' to 1" in text
    with pytest.raises(ManifestError, match="max_batch_rows must be 1"):
        add_model(source, tmp_path / "other", "single", max_batch_rows=8)
    with pytest.raises(ManifestError, match="nothing to tune"):
        add_model(source, tmp_path / "other", "single", tuner=lambda *a: pytest.fail("ran"))


def test_a_fixed_batch_larger_than_one_is_refused_by_the_load_path(tmp_path: Path) -> None:
    source = _save(_affine(batch=8), tmp_path / "eight.onnx")
    assert plan_batching(read_graph(source, "eight")).mode == "none"
    with pytest.raises(ManifestError, match=r"model eight v1: output 'y' has shape \[8, 2\] for "
                                             r"a batch of 1 row"):
        add_model(source, tmp_path / "models", "eight", verify=_verify)
    assert not (tmp_path / "models" / "eight").exists()  # nothing left behind


def test_float16_in_and_out(tmp_path: Path) -> None:
    source = _save(_affine(dtype=TensorProto.FLOAT16), tmp_path / "half.onnx")
    m = add_model(source, tmp_path, "half", verify=_verify).manifest
    assert m.inputs == (TensorSpec("x", "float16", (-1, 4)),)
    assert m.outputs == (TensorSpec("y", "float16", (-1, 2)),)


def test_two_inputs_of_different_dtypes(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Cast", ["ids"], ["ids_f"], to=TensorProto.FLOAT),
         helper.make_node("Add", ["values", "ids_f"], ["total"]),
         helper.make_node("ArgMax", ["total"], ["best"], axis=1, keepdims=0)], "two",
        [helper.make_tensor_value_info("values", TensorProto.FLOAT, ["N", 3]),
         helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 3])],
        [helper.make_tensor_value_info("total", TensorProto.FLOAT, ["N", 3]),
         helper.make_tensor_value_info("best", TensorProto.INT64, ["N"])])
    source = _save(_finish(graph), tmp_path / "two.onnx")
    m = add_model(source, tmp_path, "two", verify=_verify).manifest
    assert m.inputs == (TensorSpec("values", "float32", (-1, 3)),
                        TensorSpec("ids", "int64", (-1, 3)))
    assert m.outputs == (TensorSpec("total", "float32", (-1, 3)),
                         TensorSpec("best", "int64", (-1,)))


def _sequence_mean() -> Any:
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["tokens"], ["pooled"], axes=[1], keepdims=0)], "pool",
        [helper.make_tensor_value_info("tokens", TensorProto.FLOAT, ["batch", "seq", 8])],
        [helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["batch", 8])])
    return _finish(graph)


def test_symbolic_sequence_axis(tmp_path: Path) -> None:
    source = _save(_sequence_mean(), tmp_path / "pool.onnx")
    graph = read_graph(source, "pool")
    assert graph.inputs[0].symbols == ("batch", "seq", None)
    m = add_model(source, tmp_path, "pool", verify=_verify).manifest
    assert m.inputs == (TensorSpec("tokens", "float32", (-1, -1, 8)),)
    assert m.outputs == (TensorSpec("pooled", "float32", (-1, 8)),)
    assert m.batched and m.max_batch_rows == 64


def test_external_data_is_copied_and_declared(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    onnx.save_model(_affine(width=64), str(src / "big.onnx"), save_as_external_data=True,
                    location="weights.bin", size_threshold=0)
    m = add_model(src / "big.onnx", tmp_path / "models", "big", verify=_verify).manifest
    copy = tmp_path / "models" / "big" / "1" / "weights.bin"
    assert copy.read_bytes() == (src / "weights.bin").read_bytes()
    assert m.versions[1].external_data == {"weights.bin": hashlib.sha256(
        copy.read_bytes()).hexdigest()}
    assert _toml(tmp_path / "models" / "big")["versions"]["1"]["external_data"] == \
        m.versions[1].external_data


# --- versions -------------------------------------------------------------------------


def test_next_version_then_a_different_signature_is_refused(tmp_path: Path,
                                                            classifier: Path) -> None:
    add_model(classifier, tmp_path, "iris", description="iris classes", verify=_verify)
    second = add_model(classifier, tmp_path, "iris", verify=_verify)
    assert second.version == 2 and sorted(second.manifest.versions) == [1, 2]
    assert second.manifest.description == "iris classes"  # the user's description stays
    other = _save(_affine(width=5), tmp_path / "other.onnx")
    with pytest.raises(ManifestError) as info:
        add_model(other, tmp_path, "iris", verify=_verify)
    message = str(info.value)
    assert "input 'x': float32[-1, 4] in the manifest, float32[-1, 5] in the graph" in message
    assert "output 'label': int64[-1] in the manifest, not in the graph" in message
    assert "output 'y': float32[-1, 2] in the graph, not in the manifest" in message
    assert "--name iris-2" in message
    with pytest.raises(ManifestError, match="already has version 2"):
        add_model(classifier, tmp_path, "iris", version=2)
    assert versions(tmp_path, "iris") == [1, 2]


def test_remove(tmp_path: Path, classifier: Path) -> None:
    for _ in range(3):
        add_model(classifier, tmp_path, "iris", max_batch_rows=16)
    assert remove_version(tmp_path, "iris", 2) is False
    assert sorted(load_manifest(tmp_path / "iris").versions) == [1, 3]
    assert not (tmp_path / "iris" / "2").exists()
    with pytest.raises(ManifestError, match=r"has no version 2 \(versions: \[1, 3\]\)"):
        remove_version(tmp_path, "iris", 2)
    remove_version(tmp_path, "iris", 1)
    with pytest.raises(ManifestError, match="last version"):
        remove_version(tmp_path, "iris", 3)
    assert load_manifest(tmp_path / "iris").max_batch_rows == 16
    assert remove_version(tmp_path, "iris", 3, remove_model=True) is True
    assert not (tmp_path / "iris").exists()


def test_a_new_version_of_digits_keeps_its_manifest(tmp_path: Path) -> None:
    shutil.copytree(DIGITS, tmp_path / "digits")
    before = load_manifest(tmp_path / "digits")
    add_model(DIGITS / "2" / "model.onnx", tmp_path, "digits", verify=_verify)
    text = (tmp_path / "digits" / "model.toml").read_text()
    assert text.startswith("# Generated by models/digits/build.py")  # its comment survives
    doc = _toml(tmp_path / "digits")
    assert doc["versions"]["1"]["test_accuracy"] == 0.9667  # and its own keys
    after = load_manifest(tmp_path / "digits")
    assert sorted(after.versions) == [1, 2, 3]
    assert (after.inputs, after.outputs, after.max_batch_rows, after.max_wait_ms,
            after.description) == (before.inputs, before.outputs, before.max_batch_rows,
                                   before.max_wait_ms, before.description)


def test_in_place_and_refusals(tmp_path: Path, classifier: Path) -> None:
    placed = tmp_path / "iris" / "1" / "model.onnx"
    shutil.copytree(classifier.parent, placed.parent)
    shutil.move(placed.parent / classifier.name, placed)
    add_model(placed, tmp_path, "iris", verify=_verify)  # the file is already where it goes
    assert load_manifest(tmp_path / "iris").versions[1].path == placed
    (tmp_path / "iris" / "2").mkdir()
    (tmp_path / "iris" / "2" / "stray.txt").write_text("x")
    with pytest.raises(ManifestError, match="exists but is not in the manifest"):
        add_model(classifier, tmp_path, "iris")
    with pytest.raises(ManifestError, match="model name"):
        add_model(classifier, tmp_path, "no/slashes")
    (tmp_path / "iris" / "model.toml").write_text("max_batch_rows = [broken\n")
    with pytest.raises(ManifestError, match="its manifest does not load"):
        add_model(classifier, tmp_path, "iris", version=3)


# --- the manifest loader: batching defaults, scan_all ------------------------------------


def _write(folder: Path, body: str) -> Path:
    (folder / "1").mkdir(parents=True)
    (folder / "1" / "model.onnx").write_bytes(b"x")
    sha = hashlib.sha256(b"x").hexdigest()
    (folder / "model.toml").write_text(body + f'\n[versions.1]\nsha256 = "{sha}"\n')
    return folder


@pytest.mark.parametrize(("shapes", "extra", "expected"), [
    (([-1, 4], [-1]), "", (64, 2.0)),
    (([-1, 4], [-1, 2]), "max_batch_rows = 8", (8, 2.0)),
    (([-1, 4], [-1, 2]), "max_wait_ms = 0.5", (64, 0.5)),
    (([4], [1]), "", (1, 0.0)),
    (([-1, 4], [2]), "", (1, 0.0)),
])
def test_omitted_batching_fields_depend_on_the_batch_axis(
        tmp_path: Path, shapes: tuple[list[int], list[int]], extra: str,
        expected: tuple[int, float]) -> None:
    body = (f'{extra}\ninputs = [{{name = "x", dtype = "float32", shape = {shapes[0]}}}]\n'
            f'outputs = [{{name = "y", dtype = "float32", shape = {shapes[1]}}}]\n')
    m = load_manifest(_write(tmp_path / "m", body))
    assert (m.max_batch_rows, m.max_wait_ms) == expected


def test_shipped_digits_still_loads_the_same() -> None:
    m = load_manifest(DIGITS)
    assert (m.max_batch_rows, m.max_wait_ms, m.max_queue, m.instances) == (64, 2.0, 100_000, None)
    assert sorted(m.versions) == [1, 2] and m.batched


def test_scan_all_isolates_bad_models(tmp_path: Path, classifier: Path) -> None:
    add_model(classifier, tmp_path, "good")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model.toml").write_text("inputs = [unclosed\n")
    found, failed = scan_all(tmp_path)
    assert list(found) == ["good"] and list(failed) == ["bad"]
    assert "model.toml" in failed["bad"]
    found, failed = scan_all(tmp_path, only=["good", "gone"])
    assert list(found) == ["good"] and "not found" in failed["gone"]
    with pytest.raises(ManifestError, match="does not exist"):
        scan_all(tmp_path / "nowhere")


# --- the load path names the model and says what to change ------------------------------


def test_fixed_batch_declared_free_is_refused_at_load(tmp_path: Path) -> None:
    add_model(_save(_affine(batch=1), tmp_path / "one.onnx"), tmp_path, "one")
    toml = tmp_path / "one" / "model.toml"
    toml.write_text(toml.read_text().replace("max_batch_rows = 1", "max_batch_rows = 64"))
    with pytest.raises(ManifestError, match=r"model one v1: the graph's input 'x' has a fixed "
                                            r"batch dimension 1; set max_batch_rows = 1"):
        runtime.load(load_manifest(tmp_path / "one"), 1, "cpu", 1)


def test_outputs_without_a_row_per_input_row_are_refused_at_load(tmp_path: Path) -> None:
    # [N, 4] -> [2N, 2]: ONNX Runtime cannot tell from the graph that rows double.
    shape = numpy_helper.from_array(np.array([-1, 2], np.int64), "shape")
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["pairs"])], "pairs",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("pairs", TensorProto.FLOAT, ["M", 2])], [shape])
    source = _save(_finish(graph), tmp_path / "pairs.onnx")
    with pytest.raises(ManifestError, match=r"model pairs v1: output 'pairs' has shape \[2, 2\] "
                                            r"for a batch of 1 row\(s\); inferq needs one output "
                                            r"row per input row"):
        add_model(source, tmp_path / "models", "pairs", verify=_verify)
    assert not (tmp_path / "models" / "pairs").exists()


def test_unloadable_graph_names_the_model(tmp_path: Path) -> None:
    body = ('inputs = [{name = "x", dtype = "float32", shape = [-1]}]\n'
            'outputs = [{name = "y", dtype = "float32", shape = [-1]}]\n')
    junk = load_manifest(_write(tmp_path / "junk", body))
    with pytest.raises(ManifestError, match=r"model junk v1: malformed ONNX protobuf"):
        runtime.load(junk, 1, "cpu", 1)
    graph = helper.make_graph([helper.make_node("NoSuchOp", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    folder = tmp_path / "odd"
    data = _save(model, folder / "1" / "model.onnx").read_bytes()
    (folder / "model.toml").write_text(
        body + f'[versions.1]\nsha256 = "{hashlib.sha256(data).hexdigest()}"\n')
    with pytest.raises(ManifestError, match=r"model odd v1: ONNX Runtime cannot load .*NoSuchOp"):
        runtime.load(load_manifest(folder), 1, "cpu", 1)


# --- the TOML writer ---------------------------------------------------------------------


def test_toml_round_trip() -> None:
    doc = {
        "description": 'quotes " and \\ and\nnewlines, tabs\t, unicode é ✓, DEL \x7f',
        "max_batch_rows": 64, "max_wait_ms": 2.5, "max_queue": 0, "instances": 2,
        "custom": [1, 2.0, True, "x"], "big": 1e300, "tiny": 1e-7, "neg": -0.0,
        "inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 64]}],
        "outputs": [{"name": "y", "dtype": "int64", "shape": [-1]}],
        "versions": {
            "10": {"sha256": "ab" * 32, "source": "x.onnx"},
            "2": {"sha256": "cd" * 32,
                  "external_data": {"weights.bin": "ef" * 32, "sub dir/w 2.bin": "01" * 32},
                  "built": datetime.date(2026, 11, 29), "meta": {"a": [1, {"b": False}]}},
        },
    }
    text = manifest_toml.dumps(doc)
    assert tomllib.loads(text) == doc
    assert text.index("[versions.2]") < text.index("[versions.10]")
    assert text.splitlines()[:2] == [f"description = {manifest_toml.value(doc['description'])}",
                                     "max_batch_rows = 64"]


def test_comments_above_top_level_keys_survive() -> None:
    text = "# header\ndescription = \"d\"\n# why 8\n\nmax_batch_rows = 8 # inline\n[[inputs]]\n"
    comments = manifest_toml.top_comments(text)
    assert comments == {"description": ["# header"], "max_batch_rows": ["# why 8"]}
    out = manifest_toml.dumps({"description": "d", "max_batch_rows": 8}, comments)
    assert out == '# header\ndescription = "d"\n# why 8\nmax_batch_rows = 8\n'


# --- tuning ------------------------------------------------------------------------------


def test_choose_stops_where_a_bigger_batch_adds_under_ten_percent() -> None:
    from workers.bench.tuning import choose

    assert choose({1: 100.0, 2: 200.0, 4: 390.0, 8: 420.0, 16: 900.0}) == 4
    assert choose({1: 100.0, 2: 250.0, 4: 600.0}) == 4  # still growing: the largest measured
    assert choose({1: 100.0, 2: 105.0}) == 1


def test_tune_measures_with_the_named_dimensions(tmp_path: Path) -> None:
    from workers.bench import tuning

    source = _save(_sequence_mean(), tmp_path / "pool.onnx")
    graph = read_graph(source, "pool")
    batching = plan_batching(graph)
    tuned = tuning.tune(source, graph, batching, dims={"seq": 3}, threads=1, budget_s=0.002)
    assert tuned.max_batch_rows in tuning.SIZES and tuned.max_wait_ms >= 1.0
    assert len(tuned.comment) == 2 and all(c.startswith("# ") for c in tuned.comment)
    assert "rows/s by batch size 1: " in tuned.comment[0] and "seq=3" in tuned.comment[1]
    with pytest.raises(ManifestError, match=r"--dim width: not a dimension .*\['seq'\]"):
        tuning.tune(source, graph, batching, dims={"width": 3})
    assert tuning.parse_dims(["seq=128"]) == {"seq": 128}
    with pytest.raises(ManifestError, match="NAME=VALUE"):
        tuning.parse_dims(["seq"])
