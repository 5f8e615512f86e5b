"""The shipped ``digits`` model files match their manifest and the accuracy it records."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

ort = pytest.importorskip("onnxruntime")

MODEL_DIR = Path(__file__).resolve().parents[2] / "models" / "digits"
MANIFEST: dict[str, Any] = tomllib.loads((MODEL_DIR / "model.toml").read_text(encoding="utf-8"))
VERSIONS = sorted(MANIFEST["versions"], key=int)
ORT_TYPES = {"float32": "tensor(float)", "int64": "tensor(int64)"}


def model_path(version: str) -> Path:
    return MODEL_DIR / version / "model.onnx"


@pytest.fixture(scope="module")
def build() -> ModuleType:
    """``models/digits/build.py`` imported from its path (for the exact same test split)."""
    for name in ("sklearn", "skl2onnx", "onnx"):
        pytest.importorskip(name)
    spec = importlib.util.spec_from_file_location("digits_build", MODEL_DIR / "build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def session(version: str) -> Any:
    return ort.InferenceSession(str(model_path(version)), providers=["CPUExecutionProvider"])


def test_manifest_lists_versions() -> None:
    assert VERSIONS == ["1", "2"]


@pytest.mark.parametrize("version", VERSIONS)
def test_sha256_matches_manifest(version: str) -> None:
    data = model_path(version).read_bytes()
    assert len(data) < 100_000
    assert hashlib.sha256(data).hexdigest() == MANIFEST["versions"][version]["sha256"]


@pytest.mark.parametrize("version", VERSIONS)
def test_signature_matches_manifest(version: str) -> None:
    sess = session(version)
    for actual, declared in (
        (sess.get_inputs(), MANIFEST["inputs"]),
        (sess.get_outputs(), MANIFEST["outputs"]),
    ):
        assert [a.name for a in actual] == [d["name"] for d in declared]
        for arg, spec in zip(actual, declared, strict=True):
            assert arg.type == ORT_TYPES[spec["dtype"]], arg.name
            assert len(arg.shape) == len(spec["shape"]), arg.name
            for dim, want in zip(arg.shape, spec["shape"], strict=True):
                if want != -1:
                    assert dim == want, arg.name


@pytest.mark.parametrize("version", VERSIONS)
def test_ir_version_supported(version: str) -> None:
    onnx = pytest.importorskip("onnx")
    model = onnx.load(str(model_path(version)))
    assert model.ir_version <= 10
    onnx.checker.check_model(model)


@pytest.mark.parametrize("version", VERSIONS)
def test_accuracy_matches_manifest(version: str, build: ModuleType) -> None:
    _, x_test, _, y_test = build.split()
    label, proba = session(version).run(
        ["label", "probabilities"], {"pixels": x_test.astype(np.float32)}
    )
    recorded = MANIFEST["versions"][version]
    assert len(y_test) == recorded["test_rows"]
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-4)
    accuracy = float(np.mean(label == y_test))
    assert accuracy >= 0.95
    assert round(accuracy, 4) == pytest.approx(recorded["test_accuracy"], abs=1e-9)
