"""ONNX Runtime sessions: providers, the GPU check, warm-up.

Sessions are created in the process that runs them: CUDA does not survive a fork.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from producer.wire import dtype_name
from workers.errors import DeviceUnavailable, ManifestError, WorkerError
from workers.repository import Manifest, check_graph, verify_external_data, verify_file


def _ort() -> Any:
    import onnxruntime

    return onnxruntime


def providers_for(device: str) -> list[Any]:
    """The provider list for ``device``; device 0 is the GPU ``CUDA_VISIBLE_DEVICES`` left."""
    if device == "cuda":
        cuda_options = {
            "device_id": 0,
            # Re-benchmarking conv algorithms on every new batch size costs more than it saves.
            "cudnn_conv_algo_search": "HEURISTIC",
            "arena_extend_strategy": "kSameAsRequested",
        }
        return [("CUDAExecutionProvider", cuda_options), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def create_session(model: bytes | Path, device: str, intra_op_threads: int) -> Any:
    """Create a session for ``model`` on ``device``; refuse a silent CPU fallback.

    ``model`` is the verified bytes, or the path of a verified model with external data:
    ONNX Runtime resolves external data locations relative to the model's folder, and only
    for a model loaded from a path.
    """
    ort = _ort()
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    # Spinning threads burn a core between batches and slow co-located producers and Redis.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if device == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        raise DeviceUnavailable(
            "a GPU worker needs onnxruntime-gpu (pip install 'inferq[gpu]'); the installed "
            f"onnxruntime offers only {ort.get_available_providers()}"
        )
    source = str(model) if isinstance(model, Path) else model
    session = ort.InferenceSession(source, options, providers=providers_for(device))
    active = session.get_providers()[0]
    if device == "cuda" and active != "CUDAExecutionProvider":
        # onnxruntime-gpu falls back to the CPU without raising when CUDA/cuDNN are missing.
        raise DeviceUnavailable(
            f"CUDA was requested but ONNX Runtime is running on {active}: check the NVIDIA "
            "driver, CUDA 13 and cuDNN 9 libraries, and CUDA_VISIBLE_DEVICES"
        )
    return session


@dataclass
class LoadedModel:
    """One verified, warmed model version ready to run batches."""

    manifest: Manifest
    version: int
    session: Any
    provider: str

    @property
    def output_names(self) -> list[str]:
        return [s.name for s in self.manifest.outputs]

    def run(self, feeds: dict[str, np.ndarray[Any, Any]]) -> dict[str, np.ndarray[Any, Any]]:
        """Run one batch; outputs by name, in manifest order."""
        names = self.output_names
        return dict(zip(names, self.session.run(names, feeds), strict=True))

    def warm_up(self) -> None:
        """Run a batch of 1 and of the largest batch so allocations happen before traffic,
        and check that the outputs fit the manifest as the serving loop will split them."""
        m = self.manifest
        batch_axis = any(s.shape[:1] == (-1,) for s in m.inputs)
        for rows in sorted({1, m.max_batch_rows}):
            feeds = {
                # The batch axis gets the rows; other free axes the smallest real length, so a
                # [-1, 3, -1, -1] image model does not warm up on gigabytes of zeros.
                s.name: np.zeros([(rows if axis == 0 else 1) if d == -1 else d
                                  for axis, d in enumerate(s.shape)], dtype=s.dtype)
                for s in m.inputs
            }
            try:
                outputs = self.run(feeds)
            except Exception as exc:  # ONNX Runtime raises its own classes, not RuntimeError
                shapes = ", ".join(f"{n} {list(a.shape)}" for n, a in feeds.items())
                raise ManifestError(
                    f"model {m.name} v{self.version}: warm-up failed on a batch of {rows} "
                    f"row(s) ({shapes}): {_first_line(exc)}; make the manifest's shapes and "
                    "max_batch_rows match the graph (inferq models check shows each model)"
                ) from None
            self._check_outputs(outputs, rows if batch_axis else 1)

    def _check_outputs(self, outputs: dict[str, np.ndarray[Any, Any]], rows: int) -> None:
        where = f"model {self.manifest.name} v{self.version}"
        for spec in self.manifest.outputs:
            arr = outputs[spec.name]
            if dtype_name(arr.dtype) != spec.dtype or arr.ndim != len(spec.shape):
                raise ManifestError(
                    f"{where}: output '{spec.name}' came back {arr.dtype} {list(arr.shape)}, the "
                    f"manifest says {spec.dtype} {list(spec.shape)}")
            if arr.ndim == 0 or arr.shape[0] != rows:
                # The serving loop hands each job its rows of every output (axis 0).
                raise ManifestError(
                    f"{where}: output '{spec.name}' has shape {list(arr.shape)} for a batch of "
                    f"{rows} row(s); inferq needs one output row per input row (axis 0)")
            if any(d not in (-1, got) for d, got in zip(spec.shape, arr.shape, strict=True)):
                raise ManifestError(
                    f"{where}: output '{spec.name}' has shape {list(arr.shape)}, the manifest "
                    f"says {list(spec.shape)}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def load(manifest: Manifest, version: int, device: str, intra_op_threads: int) -> LoadedModel:
    """Verify, load, check against the manifest and warm up one model version.

    External data is checked first: every location the model names must be declared in the
    manifest and stay inside the version folder, and every declared file must match its
    sha256. Then a model with external data is loaded from its path (the files beside it).
    A model that ONNX Runtime cannot load or run raises :class:`ManifestError` naming the
    model and version.
    """
    entry = manifest.versions[version]
    try:
        data = verify_file(entry)
        external = verify_external_data(entry, data)
    except ManifestError as exc:
        raise ManifestError(f"model {manifest.name} v{version}: {exc}") from None
    try:
        session = create_session(entry.path if external else data, device, intra_op_threads)
    except WorkerError:
        raise
    except Exception as exc:  # ONNX Runtime's errors derive from Exception only
        raise ManifestError(
            f"model {manifest.name} v{version}: ONNX Runtime cannot load {entry.path}: "
            f"{_first_line(exc)}") from None

    def describe(args: Any) -> list[tuple[str, str, list[Any]]]:
        return [(a.name, a.type, list(a.shape)) for a in args]

    check_graph(manifest, version, describe(session.get_inputs()), describe(session.get_outputs()))
    model = LoadedModel(manifest, version, session, session.get_providers()[0])
    model.warm_up()
    return model
