"""ONNX external data: declared in the manifest with a sha256, locations checked before ORT.

Models are written by the ``onnx`` package (a dev dependency) with
``onnx.save_model(..., save_as_external_data=True, location=...)``; the worker reads their
locations with its own protobuf walk and never imports ``onnx``.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import PY, ROOT, python_env
from workers import repository
from workers.repository import ManifestError
from workers.serving import runtime

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from onnx.external_data_helper import _get_all_tensors, uses_external_data  # noqa: E402

RNG = np.random.default_rng(7)
W = RNG.standard_normal((64, 10)).astype(np.float32)
B = RNG.standard_normal((10,)).astype(np.float32)
X = RNG.standard_normal((3, 64)).astype(np.float32)
EXPECTED = X @ W + B


def _model(*, bias_as_constant: bool = False) -> Any:
    """y = x @ W + B; B an initializer, or the value of a Constant node (a node attribute)."""
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"]), helper.make_node("Add", ["m", "B"],
                                                                             ["y"])]
    inits = [numpy_helper.from_array(W, "W")]
    if bias_as_constant:
        nodes.insert(0, helper.make_node("Constant", [], ["B"],
                                         value=numpy_helper.from_array(B, "B_value")))
    else:
        inits.append(numpy_helper.from_array(B, "B"))
    graph = helper.make_graph(
        nodes, "affine",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _write_manifest(folder: Path, versions: dict[int, dict[str, Any]]) -> None:
    lines = [
        'description = "external data test model"',
        "max_batch_rows = 4",
        "max_wait_ms = 1.0",
        'inputs = [{name = "x", dtype = "float32", shape = [-1, 64]}]',
        'outputs = [{name = "y", dtype = "float32", shape = [-1, 10]}]',
    ]
    for number, entry in versions.items():
        lines.append(f"[versions.{number}]")
        for key, value in entry.items():
            if isinstance(value, dict):
                table = ", ".join(f"{json.dumps(k)} = {json.dumps(v)}" for k, v in value.items())
                lines.append(f"{key} = {{{table}}}")
            else:
                lines.append(f"{key} = {json.dumps(value)}")
    (folder / "model.toml").write_text("\n".join(lines) + "\n")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _save(model: Any, folder: Path, **kw: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if "location" in kw:
        (folder / kw["location"]).parent.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, size_threshold=0, **kw)
    return path


def _repo(tmp_path: Path, *, location: str = "weights.bin", declare: dict[str, str] | None = None,
          rewrite_location: str | None = None, **save: Any) -> repository.Manifest:
    """A model "ext" whose version 1 keeps its tensors in ``location``; the manifest declares
    ``declare`` (default: that file with its real sha256). ``rewrite_location`` changes the
    location inside the saved model afterwards (what a hostile model file would say)."""
    folder = tmp_path / "models" / "ext"
    version = folder / "1"
    path = _save(save.pop("model", None) or _model(), version, location=location, **save)
    if rewrite_location is not None:
        proto = onnx.load(str(path), load_external_data=False)
        for tensor in _get_all_tensors(proto):
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = rewrite_location
        onnx.save_model(proto, str(path))
    if declare is None:
        declare = {location: _sha(version / location)}
    _write_manifest(folder, {1: {"sha256": _sha(path), "external_data": declare}})
    return repository.load_manifest(folder)


def _onnx_locations(path: Path) -> list[str]:
    proto = onnx.load(str(path), load_external_data=False)
    return [
        next(e.value for e in t.external_data if e.key == "location")
        for t in _get_all_tensors(proto) if uses_external_data(t)
    ]


# --- the protobuf walk ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["one_file", "file_per_tensor", "attribute", "subgraph"])
def test_walk_finds_the_locations_onnx_finds(tmp_path: Path, kind: str) -> None:
    model = _model(bias_as_constant=kind == "attribute")
    if kind == "subgraph":
        # The whole affine graph inside both branches of an If: initializers of subgraphs.
        inner = _model().graph
        then_g, else_g = onnx.GraphProto(), onnx.GraphProto()
        then_g.CopyFrom(inner)
        else_g.CopyFrom(inner)
        for g, name in ((then_g, "then"), (else_g, "else")):
            g.name = name
            del g.input[:]
            for init in g.initializer:
                init.name = f"{name}_{init.name}"
            for node in g.node:
                node.input[:] = [f"{name}_{i}" if i in ("W", "B") else i for i in node.input]
        cond = helper.make_node("Constant", [], ["c"], value=helper.make_tensor(
            "c_value", TensorProto.BOOL, [], [True]))
        graph = helper.make_graph(
            [cond, helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)],
            "branchy", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
    save: dict[str, Any] = {"location": "weights.bin", "convert_attribute": True}
    if kind == "file_per_tensor":
        save = {"all_tensors_to_one_file": False}
    path = _save(model, tmp_path / kind, **save)
    found = repository.external_locations(path.read_bytes())
    assert found and sorted(found) == sorted(_onnx_locations(path))
    if kind == "subgraph":
        assert len(found) >= 4  # W and B of both branches (plus the condition constant)


def test_walk_of_models_without_external_data_is_empty() -> None:
    for path in sorted((ROOT / "models").glob("*/*/model.onnx")):
        assert repository.external_locations(path.read_bytes()) == []
    assert repository.external_locations(_model().SerializeToString()) == []


@pytest.mark.parametrize("cut", [1, 7, 50, -3])
def test_walk_of_a_truncated_model_is_a_manifest_error(cut: int) -> None:
    data = _model().SerializeToString()
    with pytest.raises(ManifestError, match="malformed ONNX protobuf"):
        repository.external_locations(data[:cut])


def test_workers_never_import_onnx() -> None:
    code = ("import sys, workers.repository, workers.serving.runtime; "
            "assert not any(m == 'onnx' or m.startswith('onnx.') for m in sys.modules), "
            "[m for m in sys.modules if m.startswith('onnx')]")
    out = subprocess.run([PY, "-c", code], env=python_env(), capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr


# --- loading --------------------------------------------------------------------------------


def test_declared_external_data_loads_and_runs(tmp_path: Path) -> None:
    manifest = _repo(tmp_path)
    assert manifest.versions[1].external_data == {
        "weights.bin": _sha(manifest.versions[1].path.parent / "weights.bin")}
    loaded = runtime.load(manifest, 1, "cpu", 1)
    out = loaded.run({"x": X})["y"]
    np.testing.assert_allclose(out, EXPECTED, rtol=1e-5, atol=1e-5)


def test_external_data_in_a_subfolder_and_in_an_attribute(tmp_path: Path) -> None:
    manifest = _repo(tmp_path, location="data/weights.bin", model=_model(bias_as_constant=True),
                     convert_attribute=True)
    loaded = runtime.load(manifest, 1, "cpu", 1)
    np.testing.assert_allclose(loaded.run({"x": X})["y"], EXPECTED, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hostile", ["../../etc/passwd", "/etc/passwd", "../1/weights.bin",
                                     "data/../../x.bin"])
def test_a_location_escaping_the_folder_is_refused_before_onnx_runtime(
    tmp_path: Path, hostile: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = _repo(tmp_path, rewrite_location=hostile)
    monkeypatch.setattr(runtime, "create_session", _never)
    with pytest.raises(ManifestError, match=r"absolute|leaves the version folder"):
        runtime.load(manifest, 1, "cpu", 1)


def test_a_location_hidden_in_a_node_attribute_is_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "models" / "ext"
    path = _save(_model(bias_as_constant=True), folder / "1", location="weights.bin",
                 convert_attribute=True)
    proto = onnx.load(str(path), load_external_data=False)
    constant = proto.graph.node[0].attribute[0].t
    assert uses_external_data(constant)
    for entry in constant.external_data:
        if entry.key == "location":
            entry.value = "../../../../etc/passwd"
    onnx.save_model(proto, str(path))
    _write_manifest(folder, {1: {"sha256": _sha(path), "external_data": {
        "weights.bin": _sha(folder / "1" / "weights.bin")}}})
    monkeypatch.setattr(runtime, "create_session", _never)
    with pytest.raises(ManifestError, match="leaves the version folder"):
        runtime.load(repository.load_manifest(folder), 1, "cpu", 1)


def test_an_undeclared_location_is_refused(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    manifest = _repo(tmp_path, rewrite_location="other.bin")
    (manifest.versions[1].path.parent / "other.bin").write_bytes(b"\0" * 4096)
    monkeypatch.setattr(runtime, "create_session", _never)
    with pytest.raises(ManifestError, match=r"'other\.bin', which the manifest does not declare"):
        runtime.load(manifest, 1, "cpu", 1)


def test_external_data_without_a_declaration_is_refused(tmp_path: Path) -> None:
    manifest = _repo(tmp_path, declare={})
    with pytest.raises(ManifestError, match=r"does not declare \(declared: none\)"):
        runtime.load(manifest, 1, "cpu", 1)


def test_a_changed_external_file_is_refused(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    manifest = _repo(tmp_path)
    weights = manifest.versions[1].path.parent / "weights.bin"
    data = bytearray(weights.read_bytes())
    data[100] ^= 0x01
    weights.write_bytes(bytes(data))
    monkeypatch.setattr(runtime, "create_session", _never)
    with pytest.raises(ManifestError, match=r"'weights\.bin' has sha256 .* the manifest says"):
        runtime.load(manifest, 1, "cpu", 1)


# --- manifest declarations ------------------------------------------------------------------


@pytest.mark.parametrize(("name", "error"), [
    ("/etc/passwd", "is absolute"),
    ("../weights.bin", "leaves the version folder"),
    ("a/../../weights.bin", "leaves the version folder"),
    ("C:/weights.bin", "is absolute"),
    ("a\\b.bin", "malformed"),
    ("missing.bin", "missing or unreadable"),
])
def test_bad_declarations_are_refused(tmp_path: Path, name: str, error: str) -> None:
    manifest = _repo(tmp_path)
    folder = manifest.versions[1].path.parent.parent
    _write_manifest(folder, {1: {"sha256": manifest.versions[1].sha256,
                                 "external_data": {name: "0" * 64}}})
    with pytest.raises(ManifestError, match=error):
        repository.load_manifest(folder)


def test_a_symlink_out_of_the_folder_is_refused(tmp_path: Path) -> None:
    manifest = _repo(tmp_path)
    version = manifest.versions[1].path.parent
    outside = tmp_path / "outside.bin"
    (version / "weights.bin").rename(outside)
    os.symlink(outside, version / "weights.bin")
    with pytest.raises(ManifestError, match="outside the version folder"):
        repository.load_manifest(version.parent)


def test_a_symlink_inside_the_folder_is_followed(tmp_path: Path) -> None:
    manifest = _repo(tmp_path)
    version = manifest.versions[1].path.parent
    (version / "weights.bin").rename(version / "real.bin")
    os.symlink("real.bin", version / "weights.bin")
    loaded = runtime.load(repository.load_manifest(version.parent), 1, "cpu", 1)
    np.testing.assert_allclose(loaded.run({"x": X})["y"], EXPECTED, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("value", ['"not a table"', '{"weights.bin" = "abc"}',
                                   '{"weights.bin" = 12}'])
def test_malformed_external_data_tables_are_refused(tmp_path: Path, value: str) -> None:
    manifest = _repo(tmp_path)
    folder = manifest.versions[1].path.parent.parent
    (folder / "model.toml").write_text(
        (folder / "model.toml").read_text().split("external_data")[0]
        + f"external_data = {value}\n")
    with pytest.raises(ManifestError, match="external_data"):
        repository.load_manifest(folder)


def _never(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("ONNX Runtime must not see a model whose external data was refused")
