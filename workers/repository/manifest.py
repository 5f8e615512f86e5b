"""The model repository: ``models/<name>/model.toml`` + ``models/<name>/<version>/model.onnx``.

A manifest names a model's signature, batching limits and versions, each with the sha256 of
its file; :mod:`workers.repository.integrity` checks the files against it.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from producer.wire import DTYPES, TensorSpec
from workers.errors import ManifestError
from workers.repository.integrity import external_data_table, external_file

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")

#: Batching of a manifest that names none, when every input and output has a -1 leading
#: axis: a batch of up to 64 rows waits at most 2 ms to fill. Without one: single rows.
DEFAULT_MAX_BATCH_ROWS = 64
DEFAULT_MAX_WAIT_MS = 2.0


def check_model_name(name: str) -> None:
    """Raise :class:`ManifestError` unless ``name`` can name a model (and its queue)."""
    if not _NAME.match(name):
        raise ManifestError(f"model name {name!r} must match {_NAME.pattern}")


def batching_defaults(specs: Sequence[TensorSpec]) -> tuple[int, float]:
    """``(max_batch_rows, max_wait_ms)`` for a manifest that leaves them out."""
    if specs and all(s.shape[:1] == (-1,) for s in specs):
        return DEFAULT_MAX_BATCH_ROWS, DEFAULT_MAX_WAIT_MS
    return 1, 0.0


@dataclass(frozen=True)
class ModelVersion:
    """One version of a model: its file and the checksum recorded for it."""

    number: int
    path: Path
    sha256: str
    #: External data files: path relative to the version folder -> sha256.
    external_data: dict[str, str] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class Manifest:
    """A model's ``model.toml``: signature, batching limits and versions."""

    name: str
    description: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_rows: int
    max_wait_ms: float
    versions: dict[int, ModelVersion]
    #: Most messages allowed to wait in the model's queue; producers are refused beyond.
    max_queue: int = 100_000
    #: Model instances per worker process (None: the worker's INFERQ_INSTANCES). Each is a
    #: thread running whole batches; on the CPU they split the process's threads between them.
    instances: int | None = None

    @property
    def batched(self) -> bool:
        """True when every input and output has a free leading batch axis."""
        return all(s.shape[:1] == (-1,) for s in (*self.inputs, *self.outputs))

    @property
    def latest(self) -> int:
        return max(self.versions)

    def signature(self) -> dict[str, Any]:
        """The JSON document workers advertise under ``inferq:models``."""
        return {
            "description": self.description,
            "versions": sorted(self.versions),
            "inputs": [s.to_json() for s in self.inputs],
            "outputs": [s.to_json() for s in self.outputs],
            "max_batch_rows": self.max_batch_rows,
            "max_queue": self.max_queue,
        }


def _specs(raw: Any, where: str) -> tuple[TensorSpec, ...]:
    if not isinstance(raw, list) or not raw:
        raise ManifestError(f"{where}: needs at least one entry")
    specs = []
    for item in raw:
        try:
            spec = TensorSpec.from_json(item)
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(
                f"{where}: each entry needs name, dtype and shape ({exc})"
            ) from None
        if spec.dtype not in DTYPES:
            raise ManifestError(f"{where} '{spec.name}': dtype {spec.dtype!r} not supported")
        if any(d < -1 or d == 0 for d in spec.shape):
            raise ManifestError(f"{where} '{spec.name}': dims must be positive or -1")
        specs.append(spec)
    if len({s.name for s in specs}) != len(specs):
        raise ManifestError(f"{where}: duplicate names")
    return tuple(specs)


def load_manifest(folder: Path) -> Manifest:
    """Read and check ``folder/model.toml`` and the version folders beside it."""
    name = folder.name
    check_model_name(name)
    path = folder / "model.toml"
    try:
        doc = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ManifestError(f"{path}: {exc}") from None
    versions: dict[int, ModelVersion] = {}
    for key, entry in (doc.get("versions") or {}).items():
        if not str(key).isdigit() or not isinstance(entry, dict) or "sha256" not in entry:
            raise ManifestError(f"{path}: [versions.{key}] needs an integer key and a sha256")
        number = int(key)
        onnx = folder / str(number) / "model.onnx"
        if not onnx.is_file():
            raise ManifestError(f"{path}: version {number} has no {onnx}")
        external = external_data_table(entry.get("external_data", {}), f"{path} [versions.{key}]")
        versions[number] = ModelVersion(number, onnx, str(entry["sha256"]).lower(), external)
        for name in external:
            external_file(versions[number], name)  # present, and inside the version folder
    if not versions:
        raise ManifestError(f"{path}: no [versions.N] entries")
    inputs = _specs(doc.get("inputs"), f"{path} inputs")
    outputs = _specs(doc.get("outputs"), f"{path} outputs")
    rows_default, wait_default = batching_defaults((*inputs, *outputs))
    max_rows = doc.get("max_batch_rows", rows_default)
    max_wait = doc.get("max_wait_ms", wait_default)
    max_queue = doc.get("max_queue", 100_000)
    if not isinstance(max_queue, int) or isinstance(max_queue, bool) or max_queue < 0:
        raise ManifestError(f"{path}: max_queue must be an integer >= 0 (0: no bound)")
    if not isinstance(max_rows, int) or isinstance(max_rows, bool) or max_rows < 1:
        raise ManifestError(f"{path}: max_batch_rows must be an integer >= 1")
    if not isinstance(max_wait, (int, float)) or isinstance(max_wait, bool) or max_wait < 0:
        raise ManifestError(f"{path}: max_wait_ms must be >= 0")
    instances = doc.get("instances")
    if instances is not None and (not isinstance(instances, int) or isinstance(instances, bool)
                                  or not 1 <= instances <= 64):
        raise ManifestError(f"{path}: instances must be an integer from 1 to 64")
    manifest = Manifest(
        name=name,
        description=str(doc.get("description", "")),
        inputs=inputs,
        outputs=outputs,
        max_batch_rows=max_rows,
        max_wait_ms=float(max_wait),
        versions=versions,
        max_queue=max_queue,
        instances=instances,
    )
    if not manifest.batched and max_rows != 1:
        raise ManifestError(f"{path}: max_batch_rows must be 1 without a -1 batch axis")
    return manifest


def scan(root: Path, only: Sequence[str] = ()) -> dict[str, Manifest]:
    """Every model under ``root`` (or just those named in ``only``), by name."""
    if not root.is_dir():
        raise ManifestError(f"model repository {root} does not exist")
    found = {
        d.name: load_manifest(d)
        for d in sorted(root.iterdir())
        if (d / "model.toml").is_file() and (not only or d.name in only)
    }
    missing = sorted(set(only) - found.keys())
    if missing:
        raise ManifestError(f"models {missing} not found in {root}")
    return found


def scan_all(root: Path, only: Sequence[str] = ()
             ) -> tuple[dict[str, Manifest], dict[str, str]]:
    """Like :func:`scan`, but a bad model does not stop the others.

    Returns the manifests that load, by name, and the reason for each model that does not
    (a model named in ``only`` but absent is one). Raises :class:`ManifestError` only when
    ``root`` is not a directory: then there is no model to isolate.
    """
    if not root.is_dir():
        raise ManifestError(f"model repository {root} does not exist")
    found: dict[str, Manifest] = {}
    failed: dict[str, str] = {}
    for folder in sorted(root.iterdir()):
        if not (folder / "model.toml").is_file() or (only and folder.name not in only):
            continue
        try:
            found[folder.name] = load_manifest(folder)
        except ManifestError as exc:
            failed[folder.name] = str(exc)
    for name in sorted(set(only) - found.keys() - failed.keys()):
        failed[name] = f"not found in {root} (no {root / name / 'model.toml'})"
    return found, failed


#: ONNX Runtime's type names (``NodeArg.type``) of the tensors inferq carries, to dtypes.
ORT_DTYPES = {f"tensor({t})": t for t in DTYPES if t not in ("bool", "float32", "float64")}
ORT_DTYPES.update({"tensor(bool)": "bool", "tensor(float)": "float32",
                   "tensor(double)": "float64"})


def check_graph(
    manifest: Manifest,
    version: int,
    graph_inputs: Sequence[tuple[str, str, Sequence[Any]]],
    graph_outputs: Sequence[tuple[str, str, Sequence[Any]]],
) -> None:
    """Check the manifest against the graph's (name, ORT type, shape) inputs and outputs."""
    for kind, specs, graph in (
        ("input", manifest.inputs, graph_inputs),
        ("output", manifest.outputs, graph_outputs),
    ):
        from workers.repository.graph import refusal  # graph.py imports this module

        for name, ort_type, _ in graph:
            # Even an output the manifest leaves out: serving a ZipMap classifier without
            # its probabilities, silently, is not what anyone exported it for.
            why = refusal(manifest.name, kind, name, ort_type)
            if why is not None:
                raise ManifestError(f"{why} (version {version})")
        by_name = {n: (ORT_DTYPES.get(t, t), s) for n, t, s in graph}
        want = {s.name for s in specs}
        if kind == "input" and want != set(by_name):
            raise ManifestError(
                f"model {manifest.name} v{version}: manifest inputs {sorted(want)} but the graph "
                f"has {sorted(by_name)}"
            )
        for spec in specs:
            if spec.name not in by_name:
                raise ManifestError(
                    f"model {manifest.name} v{version}: {kind} '{spec.name}' is not in the graph "
                    f"(graph has {sorted(by_name)})"
                )
            dtype, shape = by_name[spec.name]
            if dtype != spec.dtype or len(shape) != len(spec.shape):
                raise ManifestError(
                    f"model {manifest.name} v{version}: {kind} '{spec.name}' is {dtype} rank "
                    f"{len(shape)} in the graph, {spec.dtype} rank {len(spec.shape)} in the "
                    "manifest"
                )
            for axis, (fixed, got) in enumerate(zip(spec.shape, shape, strict=True)):
                # The graph names free axes ("N") or leaves them None; fixed ones are ints.
                if not isinstance(got, int) or got == fixed:
                    continue
                if fixed != -1:
                    raise ManifestError(
                        f"model {manifest.name} v{version}: {kind} '{spec.name}' dimension "
                        f"{axis} is {got} in the graph, {fixed} in the manifest"
                    )
                _check_free_axis(manifest, version, f"{kind} '{spec.name}'", axis, got)


def _check_free_axis(manifest: Manifest, version: int, what: str, axis: int, got: int) -> None:
    # A -1 in the manifest where the graph fixes the dimension: only a batch axis fixed to
    # 1 works, with batches of one row (the serving loop cuts larger jobs into rows).
    where = f"model {manifest.name} v{version}: the graph's {what}"
    if axis > 0:
        raise ManifestError(f"{where} has dimension {axis} fixed to {got}, the manifest says -1 "
                            f"(any size); write {got} in the manifest")
    if got == 1 and manifest.max_batch_rows > 1:
        raise ManifestError(f"{where} has a fixed batch dimension 1; set max_batch_rows = 1 "
                            "(or re-export with a dynamic batch axis)")
    if got != 1:
        raise ManifestError(f"{where} has a fixed batch dimension {got}, the manifest says -1 "
                            "(any number of rows); re-export with a dynamic batch axis")
