"""Reference models for the benchmark, generated from seeded weights (nothing downloaded).

``mlp``: float32 [N,256] -> Gemm 1024 -> Relu -> Gemm 1024 -> Relu -> Gemm 10.
``cnn``: float32 [N,3,64,64] -> 3 x (Conv 3x3 + Relu + MaxPool 2) -> global average pool ->
Gemm 10, sized to about 2 ms per row on one CPU core.
Both use opset 17 and IR version 8, with a dynamic batch axis.
"""

from __future__ import annotations

import hashlib
import itertools
import shutil
from pathlib import Path
from typing import Any

import numpy as np

OPSET = 17
IR_VERSION = 8
CNN_CHANNELS = (3, 96, 192, 256)


def _onnx() -> Any:
    try:
        import onnx
    except ImportError:
        raise SystemExit("building the reference models needs onnx: pip install onnx") from None
    return onnx


def _finish(graph: Any) -> bytes:
    onnx = _onnx()
    model = onnx.helper.make_model(
        graph, opset_imports=[onnx.helper.make_opsetid("", OPSET)], producer_name="inferq-bench"
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def build_mlp(seed: int = 0) -> bytes:
    """The MLP reference model as ONNX bytes."""
    onnx = _onnx()
    h, rng = onnx.helper, np.random.default_rng(seed)
    sizes = [256, 1024, 1024, 10]
    nodes, inits, prev = [], [], "x"
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        w = (rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in)).astype(np.float32)
        b = np.zeros(fan_out, dtype=np.float32)
        inits += [onnx.numpy_helper.from_array(w, f"w{i}"),
                  onnx.numpy_helper.from_array(b, f"b{i}")]
        out = "logits" if i == len(sizes) - 2 else f"g{i}"
        nodes.append(h.make_node("Gemm", [prev, f"w{i}", f"b{i}"], [out]))
        if out != "logits":
            nodes.append(h.make_node("Relu", [out], [f"r{i}"]))
            out = f"r{i}"
        prev = out
    graph = h.make_graph(
        nodes, "mlp",
        [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 256])],
        [h.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    return _finish(graph)


def build_cnn(seed: int = 0) -> bytes:
    """The CNN reference model as ONNX bytes."""
    onnx = _onnx()
    h, rng = onnx.helper, np.random.default_rng(seed)
    nodes, inits, prev = [], [], "image"
    for i, (cin, cout) in enumerate(itertools.pairwise(CNN_CHANNELS)):
        w = (rng.standard_normal((cout, cin, 3, 3)) / np.sqrt(cin * 9)).astype(np.float32)
        inits += [onnx.numpy_helper.from_array(w, f"cw{i}"),
                  onnx.numpy_helper.from_array(np.zeros(cout, np.float32), f"cb{i}")]
        nodes += [
            h.make_node("Conv", [prev, f"cw{i}", f"cb{i}"], [f"c{i}"], pads=[1, 1, 1, 1]),
            h.make_node("Relu", [f"c{i}"], [f"r{i}"]),
            h.make_node("MaxPool", [f"r{i}"], [f"p{i}"], kernel_shape=[2, 2], strides=[2, 2]),
        ]
        prev = f"p{i}"
    last = CNN_CHANNELS[-1]
    w = (rng.standard_normal((last, 10)) / np.sqrt(last)).astype(np.float32)
    inits += [onnx.numpy_helper.from_array(w, "fw"),
              onnx.numpy_helper.from_array(np.zeros(10, np.float32), "fb")]
    nodes += [
        h.make_node("GlobalAveragePool", [prev], ["gap"]),
        h.make_node("Flatten", ["gap"], ["flat"], axis=1),
        h.make_node("Gemm", ["flat", "fw", "fb"], ["logits"]),
    ]
    graph = h.make_graph(
        nodes, "cnn",
        [h.make_tensor_value_info("image", onnx.TensorProto.FLOAT, ["N", 3, 64, 64])],
        [h.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    return _finish(graph)


_MANIFEST = """description = "{description}"
max_batch_rows = {max_rows}
max_wait_ms = {max_wait}
{extra}
[[inputs]]
name = "{input}"
dtype = "float32"
shape = {shape}

[[outputs]]
name = "{output}"
dtype = "float32"
shape = {output_shape}

[versions.1]
sha256 = "{sha}"
"""


def write_model(root: Path, name: str, data: bytes, *, description: str, max_rows: int,
                input_name: str, input_shape: list[int], output_name: str = "logits",
                output_shape: list[int] | None = None, max_wait_ms: float = 2.0,
                instances: int | None = None) -> None:
    """Write one float32-in, float32-out model as ``root/name`` with its manifest."""
    (root / name / "1").mkdir(parents=True, exist_ok=True)
    (root / name / "1" / "model.onnx").write_bytes(data)
    (root / name / "model.toml").write_text(_MANIFEST.format(
        description=description, max_rows=max_rows, max_wait=max_wait_ms, input=input_name,
        shape=input_shape, output=output_name, output_shape=output_shape or [-1, 10],
        sha=hashlib.sha256(data).hexdigest(),
        extra="" if instances is None else f"instances = {instances}\n"))

SPECS: dict[str, dict[str, Any]] = {
    "mlp": {"build": build_mlp, "input": "x", "shape": [-1, 256], "max_rows": 256,
            "max_wait": 2.0, "description": "benchmark MLP 256-1024-1024-10, seeded weights"},
    # Two single-threaded instances: on the CPU a 2 ms-per-row model computes more rows per
    # CPU second that way than one session's threads synchronising inside every operator.
    "cnn": {"build": build_cnn, "input": "image", "shape": [-1, 3, 64, 64], "max_rows": 16,
            "max_wait": 2.0, "description": "benchmark CNN 3x(conv+relu+pool), seeded weights",
            "instances": 2},
}


def write_repository(root: Path, digits_from: Path | None = None) -> Path:
    """Write ``mlp`` and ``cnn`` (and a copy of ``digits``) as a model repository at ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    for name, spec in SPECS.items():
        write_model(root, name, spec["build"](), description=spec["description"],
                    max_rows=spec["max_rows"], max_wait_ms=spec["max_wait"],
                    input_name=spec["input"], input_shape=spec["shape"],
                    instances=spec.get("instances"))
    if digits_from is not None and (digits_from / "model.toml").is_file():
        shutil.copytree(digits_from, root / "digits", dirs_exist_ok=True)
    return root
