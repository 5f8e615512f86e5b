"""The model repository (manifests, checksums, graph checks) and ONNX Runtime sessions."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from producer import wire
from workers import repository
from workers.repository import ManifestError
from workers.serving import runtime

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "models" / "digits"
MODEL_BYTES = b"not really onnx, but checksummed"

PIXELS = {"name": "pixels", "dtype": "float32", "shape": [-1, 64]}
LABEL = {"name": "label", "dtype": "int64", "shape": [-1]}
PROBS = {"name": "probabilities", "dtype": "float32", "shape": [-1, 10]}


def _toml(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(value)  # ints, floats, bools and basic strings agree with TOML


def write_model(
    root: Path,
    name: str = "digits",
    *,
    files: dict[int, bytes] | None = None,
    versions: dict[str, dict[str, Any]] | None = None,
    **top: Any,
) -> Path:
    """Write ``root/name/model.toml`` (+ version files) and return the model folder.

    ``top`` overrides top-level keys; a value of ``None`` leaves the key out.
    """
    folder = root / name
    folder.mkdir(parents=True)
    files = {1: MODEL_BYTES} if files is None else files
    for number, data in files.items():
        (folder / str(number)).mkdir()
        (folder / str(number) / "model.onnx").write_bytes(data)
    if versions is None:
        versions = {str(n): {"sha256": hashlib.sha256(d).hexdigest()} for n, d in files.items()}
    doc: dict[str, Any] = {
        "description": "test model",
        "max_batch_rows": 16,
        "max_wait_ms": 1.5,
        "inputs": [PIXELS],
        "outputs": [LABEL, PROBS],
    }
    doc.update(top)
    lines = [f"{k} = {_toml(v)}" for k, v in doc.items() if v is not None]
    for key, entry in versions.items():
        lines.append(f"[versions.{key}]")
        lines += [f"{k} = {_toml(v)}" for k, v in entry.items()]
    (folder / "model.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def test_valid_manifest_loads(tmp_path: Path) -> None:
    one, two = b"version one", b"version two"
    folder = write_model(
        tmp_path,
        files={1: one, 2: two},
        versions={
            "1": {"sha256": hashlib.sha256(one).hexdigest().upper(), "source": "extra keys ok"},
            "2": {"sha256": hashlib.sha256(two).hexdigest()},
        },
    )
    manifest = repository.load_manifest(folder)
    assert manifest.name == "digits"
    assert manifest.description == "test model"
    assert [s.name for s in manifest.inputs] == ["pixels"]
    assert manifest.inputs[0].shape == (-1, 64)
    assert [s.name for s in manifest.outputs] == ["label", "probabilities"]
    assert manifest.max_batch_rows == 16
    assert manifest.max_wait_ms == 1.5
    assert manifest.batched
    assert manifest.latest == 2
    assert sorted(manifest.versions) == [1, 2]
    assert manifest.versions[1].path == folder / "1" / "model.onnx"
    assert repository.verify_file(manifest.versions[1]) == one  # upper-case sha256 is fine
    assert manifest.signature() == {
        "description": "test model",
        "versions": [1, 2],
        "inputs": [PIXELS],
        "outputs": [LABEL, PROBS],
        "max_batch_rows": 16,
        "max_queue": 100_000,
    }


def test_defaults_and_unbatched_model(tmp_path: Path) -> None:
    folder = write_model(
        tmp_path,
        max_batch_rows=None,
        max_wait_ms=None,
        description=None,
        inputs=[{"name": "image", "dtype": "uint8", "shape": [8, 8]}],
        outputs=[{"name": "score", "dtype": "float64", "shape": [1]}],
    )
    manifest = repository.load_manifest(folder)
    assert (manifest.max_batch_rows, manifest.max_wait_ms, manifest.description) == (1, 0.0, "")
    assert not manifest.batched
    assert manifest.instances is None  # the worker's INFERQ_INSTANCES decides


def test_instances_per_model(tmp_path: Path) -> None:
    assert repository.load_manifest(write_model(tmp_path, instances=2)).instances == 2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "bad name!"}, "model name 'bad name!' must match"),
        ({"name": "-leading-dash"}, "must match"),
        ({"name": "x" * 65}, "must match"),
        ({"versions": {"1": {"source": "no checksum"}}}, r"\[versions.1\] needs .* sha256"),
        ({"versions": {"one": {"sha256": "00"}}}, r"\[versions.one\] needs an integer key"),
        ({"files": {}, "versions": {"1": {"sha256": "00"}}}, "version 1 has no"),
        ({"files": {}, "versions": {}}, r"no \[versions.N\] entries"),
        ({"inputs": [{**PIXELS, "dtype": "complex64"}]}, "dtype 'complex64' not supported"),
        ({"inputs": [{**PIXELS, "dtype": "object"}]}, "dtype 'object' not supported"),
        ({"outputs": [LABEL, {**PROBS, "shape": [-1, 0]}]}, "dims must be positive or -1"),
        ({"inputs": [{**PIXELS, "shape": [-2, 64]}]}, "dims must be positive or -1"),
        ({"inputs": [PIXELS, PIXELS]}, "inputs: duplicate names"),
        ({"outputs": [LABEL, {**PROBS, "name": "label"}]}, "outputs: duplicate names"),
        ({"inputs": []}, "inputs: needs at least one entry"),
        ({"outputs": None}, "outputs: needs at least one entry"),
        ({"inputs": [{"name": "pixels", "shape": [-1, 64]}]}, "needs name, dtype and shape"),
        ({"inputs": [{**PIXELS, "shape": ["a", 64]}]}, "needs name, dtype and shape"),
        ({"max_batch_rows": 0}, "max_batch_rows must be an integer >= 1"),
        ({"max_queue": -1}, "max_queue must be an integer >= 0"),
        ({"max_batch_rows": -4}, "max_batch_rows must be an integer >= 1"),
        ({"max_batch_rows": 2.5}, "max_batch_rows must be an integer >= 1"),
        ({"max_batch_rows": "8"}, "max_batch_rows must be an integer >= 1"),
        ({"max_wait_ms": -1}, "max_wait_ms must be >= 0"),
        ({"max_wait_ms": "soon"}, "max_wait_ms must be >= 0"),
        ({"instances": 0}, "instances must be an integer from 1 to 64"),
        ({"instances": 65}, "instances must be an integer from 1 to 64"),
        ({"instances": True}, "instances must be an integer from 1 to 64"),
        ({"instances": "2"}, "instances must be an integer from 1 to 64"),
        (
            {"inputs": [{**PIXELS, "shape": [64]}], "max_batch_rows": 4},
            "max_batch_rows must be 1 without a -1 batch axis",
        ),
        (
            {"outputs": [{**LABEL, "shape": [1]}], "max_batch_rows": 4},
            "max_batch_rows must be 1 without a -1 batch axis",
        ),
    ],
)
def test_malformed_manifest(tmp_path: Path, kwargs: dict[str, Any], match: str) -> None:
    folder = write_model(tmp_path, **kwargs)
    with pytest.raises(ManifestError, match=match):
        repository.load_manifest(folder)


def test_unreadable_or_missing_manifest(tmp_path: Path) -> None:
    folder = write_model(tmp_path)
    (folder / "model.toml").write_text("max_batch_rows = [unclosed\n")
    with pytest.raises(ManifestError, match=r"model\.toml"):
        repository.load_manifest(folder)
    (folder / "model.toml").unlink()
    with pytest.raises(ManifestError, match=r"model\.toml"):
        repository.load_manifest(folder)


def test_manifest_error_is_a_value_error() -> None:
    assert issubclass(ManifestError, ValueError)


def test_verify_file_detects_a_changed_byte(tmp_path: Path) -> None:
    manifest = repository.load_manifest(write_model(tmp_path))
    version = manifest.versions[1]
    assert repository.verify_file(version) == MODEL_BYTES
    data = bytearray(MODEL_BYTES)
    data[7] ^= 0x01
    version.path.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="does not match the manifest's"):
        repository.verify_file(version)


# --- check_graph ---------------------------------------------------------------------------

GRAPH_IN = [("pixels", "tensor(float)", [None, 64])]
GRAPH_OUT = [("label", "tensor(int64)", ["N"]), ("probabilities", "tensor(float)", [None, 10])]


@pytest.fixture
def manifest(tmp_path: Path) -> repository.Manifest:
    return repository.load_manifest(write_model(tmp_path))


def test_check_graph_accepts_a_matching_graph(manifest: repository.Manifest) -> None:
    repository.check_graph(manifest, 1, GRAPH_IN, GRAPH_OUT)
    # ONNX Runtime's dynamic dims come as None, strings or ints: only the rank is compared.
    repository.check_graph(manifest, 1, [("pixels", "tensor(float)", ["batch", 64])], GRAPH_OUT)


@pytest.mark.parametrize(
    ("graph_in", "graph_out", "match"),
    [
        ([("image", "tensor(float)", [None, 64])], GRAPH_OUT,
         r"manifest inputs \['pixels'\] but the graph has \['image'\]"),
        ([*GRAPH_IN, ("extra", "tensor(float)", [None])], GRAPH_OUT, "but the graph has"),
        ([("pixels", "tensor(double)", [None, 64])], GRAPH_OUT,
         "input 'pixels' is float64 rank 2 in the graph, float32 rank 2"),
        ([("pixels", "tensor(float16)", [None, 64])], GRAPH_OUT, "is float16 rank 2"),
        ([("pixels", "tensor(float)", [None, 8, 8])], GRAPH_OUT,
         "input 'pixels' is float32 rank 3 in the graph, float32 rank 2"),
        (GRAPH_IN, GRAPH_OUT[:1], "output 'probabilities' is not in the graph"),
        (GRAPH_IN, [("label", "tensor(int32)", [None]), GRAPH_OUT[1]],
         "output 'label' is int32 rank 1"),
        (GRAPH_IN, [("label", "tensor(int64)", [None, 1]), GRAPH_OUT[1]],
         "output 'label' is int64 rank 2"),
    ],
)
def test_check_graph_rejects(
    manifest: repository.Manifest,
    graph_in: list[tuple[str, str, list[Any]]],
    graph_out: list[tuple[str, str, list[Any]]],
    match: str,
) -> None:
    with pytest.raises(ManifestError, match=match):
        repository.check_graph(manifest, 1, graph_in, graph_out)


def test_check_graph_maps_every_ort_type(tmp_path: Path) -> None:
    ort_name = {"bool": "bool", "float32": "float", "float64": "double"}
    for dtype in sorted(wire.DTYPES):
        folder = write_model(
            tmp_path / dtype,
            inputs=[{"name": "x", "dtype": dtype, "shape": [-1]}],
            outputs=[{"name": "y", "dtype": dtype, "shape": [-1]}],
        )
        manifest = repository.load_manifest(folder)
        graph = [("x", f"tensor({ort_name.get(dtype, dtype)})", [None])]
        repository.check_graph(manifest, 1, graph, [("y", graph[0][1], [None])])


# --- scan ------------------------------------------------------------------------------------


def test_scan(tmp_path: Path) -> None:
    write_model(tmp_path, "alpha")
    write_model(tmp_path, "beta")
    (tmp_path / "notes").mkdir()  # folders without model.toml are not models
    assert sorted(repository.scan(tmp_path)) == ["alpha", "beta"]
    assert sorted(repository.scan(tmp_path, only=["beta"])) == ["beta"]
    with pytest.raises(ManifestError, match=r"models \['gamma'\] not found"):
        repository.scan(tmp_path, only=["beta", "gamma"])
    with pytest.raises(ManifestError, match="does not exist"):
        repository.scan(tmp_path / "nowhere")


def test_scan_checks_only_the_models_asked_for(tmp_path: Path) -> None:
    write_model(tmp_path, "good")
    write_model(tmp_path, "broken", max_batch_rows=0)
    assert sorted(repository.scan(tmp_path, only=["good"])) == ["good"]
    with pytest.raises(ManifestError, match="max_batch_rows"):
        repository.scan(tmp_path)


# --- the shipped model and ONNX Runtime ---------------------------------------------------


@pytest.fixture(scope="module")
def digits() -> repository.Manifest:
    return repository.load_manifest(DIGITS)


def test_shipped_digits_manifest(digits: repository.Manifest) -> None:
    assert digits.name == "digits"
    assert digits.batched
    assert sorted(digits.versions) == [1, 2]
    assert [(s.name, s.dtype, s.shape) for s in digits.inputs] == [("pixels", "float32", (-1, 64))]
    for number in digits.versions:
        repository.verify_file(digits.versions[number])


@pytest.mark.parametrize("version", [1, 2])
def test_runtime_loads_the_shipped_digits_model(
    digits: repository.Manifest, version: int
) -> None:
    model = runtime.load(digits, version, "cpu", 1)
    assert model.provider == "CPUExecutionProvider"
    assert model.version == version
    assert model.output_names == ["label", "probabilities"]
    rng = np.random.default_rng(version)
    batch = rng.integers(0, 17, size=(3, 64)).astype(np.float32)
    out = model.run({"pixels": batch})
    assert list(out) == ["label", "probabilities"]
    assert out["label"].shape == (3,) and out["label"].dtype == np.int64
    assert out["probabilities"].shape == (3, 10) and out["probabilities"].dtype == np.float32
    np.testing.assert_allclose(out["probabilities"].sum(axis=1), 1.0, rtol=1e-4)
    assert set(out["label"].tolist()) <= set(range(10))
    np.testing.assert_array_equal(out["label"], out["probabilities"].argmax(axis=1))


def test_runtime_refuses_a_tampered_model_file(tmp_path: Path) -> None:
    shutil.copytree(DIGITS, tmp_path / "digits")
    path = tmp_path / "digits" / "1" / "model.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    manifest = repository.load_manifest(tmp_path / "digits")
    with pytest.raises(ManifestError, match="sha256"):
        runtime.load(manifest, 1, "cpu", 1)


def test_runtime_checks_the_graph_against_the_manifest(tmp_path: Path) -> None:
    shutil.copytree(DIGITS, tmp_path / "digits")
    toml = tmp_path / "digits" / "model.toml"
    toml.write_text(toml.read_text().replace('name = "pixels"', 'name = "image"'))
    manifest = repository.load_manifest(tmp_path / "digits")
    with pytest.raises(ManifestError, match="manifest inputs"):
        runtime.load(manifest, 2, "cpu", 1)


def test_providers_for() -> None:
    assert runtime.providers_for("cpu") == ["CPUExecutionProvider"]
    cuda = runtime.providers_for("cuda")
    assert cuda[0][0] == "CUDAExecutionProvider" and cuda[0][1]["device_id"] == 0
    assert cuda[-1] == "CPUExecutionProvider"


def test_cuda_session_never_falls_back_to_cpu(digits: repository.Manifest) -> None:
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has a CUDA provider; the test needs a CPU-only build")
    data = repository.verify_file(digits.versions[digits.latest])
    with pytest.raises(runtime.DeviceUnavailable, match="onnxruntime-gpu"):
        runtime.create_session(data, "cuda", 1)


def test_cuda_session_that_lands_on_the_cpu_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """onnxruntime-gpu without working CUDA/cuDNN falls back to the CPU silently: refuse it."""
    made: list[Any] = []

    class FakeSession:
        def __init__(self, model: bytes, options: Any, providers: list[Any]) -> None:
            made.append(providers)

        def get_providers(self) -> list[str]:
            return ["CPUExecutionProvider"]

    class FakeOptions:
        def add_session_config_entry(self, key: str, value: str) -> None:
            pass

    fake_ort = SimpleNamespace(
        SessionOptions=FakeOptions,
        InferenceSession=FakeSession,
        get_available_providers=lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"],
    )
    monkeypatch.setattr(runtime, "_ort", lambda: fake_ort)
    with pytest.raises(runtime.DeviceUnavailable, match="running on CPUExecutionProvider"):
        runtime.create_session(b"model", "cuda", 1)
    assert made and made[0][0][0] == "CUDAExecutionProvider"
    # The same fake on "cpu" is fine.
    runtime.create_session(b"model", "cpu", 1)
