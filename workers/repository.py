"""The model repository: ``models/<name>/model.toml`` + ``models/<name>/<version>/model.onnx``.

A version may keep tensors in external data files beside its ``model.onnx``; each one is
declared with its sha256 in the manifest (``[versions.N] external_data = {"weights.bin" =
"<sha256>"}``) and checked, like the model, before ONNX Runtime sees it.
"""

from __future__ import annotations

import hashlib
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from producer.contract import DTYPES, TensorSpec

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class ManifestError(ValueError):
    """A model folder, manifest or ONNX file is malformed or disagrees with the manifest."""


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
    if not _NAME.match(name):
        raise ManifestError(f"model name {name!r} must match {_NAME.pattern}")
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
        external = _external_data(entry.get("external_data", {}), f"{path} [versions.{key}]")
        versions[number] = ModelVersion(number, onnx, str(entry["sha256"]).lower(), external)
        for name in external:
            _external_file(versions[number], name)  # present, and inside the version folder
    if not versions:
        raise ManifestError(f"{path}: no [versions.N] entries")
    max_rows, max_wait = doc.get("max_batch_rows", 1), doc.get("max_wait_ms", 0.0)
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
        inputs=_specs(doc.get("inputs"), f"{path} inputs"),
        outputs=_specs(doc.get("outputs"), f"{path} outputs"),
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


def verify_file(version: ModelVersion) -> bytes:
    """Read a model file and check its sha256 against the manifest; return its bytes."""
    data = version.path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != version.sha256:
        raise ManifestError(
            f"{version.path}: sha256 {digest} does not match the manifest's {version.sha256}"
        )
    return data


# --- external data --------------------------------------------------------------------------


def _clean_location(location: str, where: str) -> str:
    """A relative path inside the version folder, normalised ("./a" -> "a"); else refused."""
    if not location or "\x00" in location or "\\" in location:
        raise ManifestError(f"{where}: external data path {location!r} is empty or malformed")
    pure = PurePosixPath(location)
    if pure.is_absolute() or re.match(r"^[A-Za-z]:", location):
        raise ManifestError(f"{where}: external data path {location!r} is absolute")
    if ".." in pure.parts:
        raise ManifestError(f"{where}: external data path {location!r} leaves the version "
                            "folder ('..')")
    return str(pure)


def _external_data(raw: Any, where: str) -> dict[str, str]:
    if not isinstance(raw, dict):
        raise ManifestError(f'{where}: external_data must be a table {{"file" = "<sha256>"}}')
    files: dict[str, str] = {}
    for name, digest in raw.items():
        clean = _clean_location(str(name), where)
        if not isinstance(digest, str) or not _SHA256.match(digest.lower()):
            raise ManifestError(f"{where}: external_data {name!r} needs a sha256 (64 hex digits)")
        if clean in files:
            raise ManifestError(f"{where}: external_data {name!r} is declared twice")
        files[clean] = digest.lower()
    return files


def _external_file(version: ModelVersion, name: str) -> Path:
    """The regular file ``name`` names, checked to resolve inside the version folder."""
    folder = version.path.parent.resolve()
    try:
        target = (folder / name).resolve(strict=True)
    except (OSError, RuntimeError):
        raise ManifestError(f"{version.path.parent}: external data file {name!r} is missing "
                            "or unreadable") from None
    if not target.is_relative_to(folder):
        raise ManifestError(f"{version.path.parent}: external data file {name!r} resolves to "
                            f"{target}, outside the version folder (symlink?)")
    if not target.is_file():
        raise ManifestError(f"{version.path.parent}: external data {name!r} is not a file")
    return target


# Protobuf field numbers (onnx.proto) of the messages that can hold a TensorProto.
_MODEL, _GRAPH, _NODE, _ATTRIBUTE, _TENSOR, _SPARSE, _FUNCTION, _TRAINING, _ENTRY = range(9)
_CHILDREN: dict[int, dict[int, int]] = {
    _MODEL: {7: _GRAPH, 20: _TRAINING, 25: _FUNCTION},
    _TRAINING: {1: _GRAPH, 2: _GRAPH},
    _FUNCTION: {7: _NODE, 11: _ATTRIBUTE},
    _GRAPH: {1: _NODE, 5: _TENSOR, 15: _SPARSE},
    _NODE: {5: _ATTRIBUTE},
    _ATTRIBUTE: {5: _TENSOR, 6: _GRAPH, 10: _TENSOR, 11: _GRAPH, 22: _SPARSE, 23: _SPARSE},
    _SPARSE: {1: _TENSOR, 2: _TENSOR},
    _TENSOR: {13: _ENTRY},
}
_MAX_DEPTH = 64
_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL


def _varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise ManifestError("malformed ONNX protobuf (varint)")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def _fields(buf: bytes, pos: int, end: int) -> Iterator[tuple[int, int, int | tuple[int, int]]]:
    """(field number, wire type, varint value or (start, end) of a length-delimited field)."""
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        value: int | tuple[int, int]
        if wire == 0:
            value, pos = _varint(buf, pos, end)
        elif wire == 2:
            size, pos = _varint(buf, pos, end)
            value, pos = (pos, pos + size), pos + size
        elif wire in (1, 5):
            value, pos = 0, pos + (8 if wire == 1 else 4)
        else:
            raise ManifestError(f"malformed ONNX protobuf (wire type {wire})")
        if pos > end:
            raise ManifestError("malformed ONNX protobuf (truncated field)")
        yield number, wire, value


def _walk(buf: bytes, start: int, end: int, kind: int, depth: int, out: list[str]) -> None:
    if depth > _MAX_DEPTH:
        raise ManifestError("ONNX model nests graphs too deeply")
    location: str | None = None
    external = False
    for number, wire, value in _fields(buf, start, end):
        if kind == _TENSOR and number == 14 and wire == 0:
            external = value == _EXTERNAL
        elif wire == 2 and isinstance(value, tuple):
            child = _CHILDREN.get(kind, {}).get(number)
            if child == _ENTRY:
                entry = {n: buf[v[0]:v[1]] for n, w, v in _fields(buf, *value)
                         if w == 2 and isinstance(v, tuple)}
                if entry.get(1) == b"location":
                    location = entry.get(2, b"").decode("utf-8", "replace")
            elif child is not None:
                _walk(buf, value[0], value[1], child, depth + 1, out)
    if kind == _TENSOR and (external or location is not None):
        out.append(location or "")


def external_locations(model: bytes) -> list[str]:
    """Every external data ``location`` an ONNX model's tensors name, in file order.

    A minimal protobuf walk (no ``onnx`` package): initializers, sparse initializers and
    tensors in node attributes, in the main graph, subgraphs, functions and training info.
    """
    out: list[str] = []
    _walk(model, 0, len(model), _MODEL, 0, out)
    return out


def verify_external_data(version: ModelVersion, model: bytes) -> bool:
    """Check the external data of a verified model; True when the manifest declares some
    (then the session must be created from the model's path, so that ONNX Runtime finds
    the files).

    Every location the model names must be declared in the manifest (which keeps it inside
    the version folder); every declared file must resolve inside the folder and match its
    sha256.
    """
    where = str(version.path)
    for location in external_locations(model):
        clean = _clean_location(location, where)
        if clean not in version.external_data:
            declared = sorted(version.external_data) or "none"
            raise ManifestError(f"{where}: the model reads external data {location!r}, which the "
                                f"manifest does not declare (declared: {declared})")
    for name, want in version.external_data.items():
        digest = hashlib.sha256()
        with _external_file(version, name).open("rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
        if digest.hexdigest() != want:
            raise ManifestError(f"{where}: external data {name!r} has sha256 "
                                f"{digest.hexdigest()}, the manifest says {want}")
    return bool(version.external_data)


_ORT_TYPES = {f"tensor({t})": t for t in DTYPES if t not in ("bool", "float32", "float64")}
_ORT_TYPES.update({"tensor(bool)": "bool", "tensor(float)": "float32",
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
        by_name = {n: (_ORT_TYPES.get(t, t), s) for n, t, s in graph}
        want = {s.name for s in specs}
        if kind == "input" and want != set(by_name):
            raise ManifestError(
                f"{manifest.name} v{version}: manifest inputs {sorted(want)} but the graph has "
                f"{sorted(by_name)}"
            )
        for spec in specs:
            if spec.name not in by_name:
                raise ManifestError(
                    f"{manifest.name} v{version}: {kind} '{spec.name}' is not in the graph "
                    f"(graph has {sorted(by_name)})"
                )
            dtype, shape = by_name[spec.name]
            if dtype != spec.dtype or len(shape) != len(spec.shape):
                raise ManifestError(
                    f"{manifest.name} v{version}: {kind} '{spec.name}' is {dtype} rank "
                    f"{len(shape)} in the graph, {spec.dtype} rank {len(spec.shape)} in the "
                    "manifest"
                )
            for axis, (fixed, got) in enumerate(zip(spec.shape, shape, strict=True)):
                # The graph names free axes ("N") or leaves them None; fixed ones are ints.
                if fixed != -1 and isinstance(got, int) and got != fixed:
                    raise ManifestError(
                        f"{manifest.name} v{version}: {kind} '{spec.name}' dimension {axis} is "
                        f"{got} in the graph, {fixed} in the manifest"
                    )
