"""Bringing a model into the repository: ``inferq models add`` and ``inferq models remove``.

A graph is read (:mod:`workers.repository.graph`), its signature checked against the
model's other versions, its file and external data copied into ``<root>/<name>/<N>/`` and
the manifest written (:mod:`workers.repository.manifest_toml`); then the caller's check
(the worker's own load path) runs, and anything written is undone if it fails.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from producer.wire import TensorSpec
from workers.errors import ManifestError
from workers.repository import manifest_toml
from workers.repository.graph import Batching, Graph, plan_batching, read_graph
from workers.repository.manifest import (
    DEFAULT_MAX_BATCH_ROWS,
    DEFAULT_MAX_WAIT_MS,
    Manifest,
    check_model_name,
    load_manifest,
)
from workers.repository.onnxproto import external_locations

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

_DEFAULT_COMMENT = [
    "# Defaults for a graph with a dynamic batch axis; `inferq models add --tune` measures "
    "this model."]


@dataclass(frozen=True)
class Tuned:
    """Batching values measured for a model, with the comment that records how."""

    max_batch_rows: int
    max_wait_ms: float
    comment: tuple[str, ...]


#: Measures a graph (its path and batching plan) and returns the values to write.
Tuner = Callable[[Path, Graph, Batching], Tuned]


@dataclass(frozen=True)
class Added:
    """What :func:`add_model` wrote."""

    manifest: Manifest
    version: int
    #: Lines for the user: how the batching values were chosen.
    notes: tuple[str, ...]


def _spec_text(spec: TensorSpec) -> str:
    return f"{spec.dtype}{list(spec.shape)}"


def signature_difference(manifest: Manifest, batching: Batching) -> list[str]:
    """How a graph's signature differs from the one every version of ``manifest`` shares;
    empty when the graph can be another version of it."""
    lines: list[str] = []
    for kind, old, new in (("input", manifest.inputs, batching.inputs),
                           ("output", manifest.outputs, batching.outputs)):
        was, now = {s.name: s for s in old}, {s.name: s for s in new}
        for name in sorted(was.keys() - now.keys()):
            lines.append(f"{kind} '{name}': {_spec_text(was[name])} in the manifest, not in "
                         "the graph")
        for name in sorted(now.keys() - was.keys()):
            lines.append(f"{kind} '{name}': {_spec_text(now[name])} in the graph, not in the "
                         "manifest")
        for name in sorted(was.keys() & now.keys()):
            a, b = was[name], now[name]
            # A dimension the manifest fixes and the graph leaves free is still compatible.
            same = len(a.shape) == len(b.shape) and a.dtype == b.dtype and all(
                x == y or (y == -1 and i > 0)
                for i, (x, y) in enumerate(zip(a.shape, b.shape, strict=True)))
            if not same:
                lines.append(f"{kind} '{name}': {_spec_text(a)} in the manifest, "
                             f"{_spec_text(b)} in the graph")
    if batching.mode == "single" and manifest.max_batch_rows > 1:
        lines.append(f"{batching.reason}; the model batches up to {manifest.max_batch_rows} rows")
    return lines


def _read_doc(path: Path) -> tuple[dict[str, Any], str]:
    try:
        text = path.read_text(encoding="utf-8")
        return tomllib.loads(text), text
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ManifestError(f"{path}: {exc}") from None


def _write_doc(path: Path, doc: dict[str, Any], comments: dict[str, list[str]]) -> None:
    text = manifest_toml.dumps(doc, comments)
    if tomllib.loads(text) != doc:  # the writer's contract, checked on every write
        raise ManifestError(f"{path}: the manifest would not read back as written")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)  # a worker reading the folder sees the old or the new, never half


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _external_files(model: bytes, source: Path, name: str) -> list[str]:
    # The external data files the model reads, each relative to its folder (deduplicated:
    # many tensors can share one file).
    files: list[str] = []
    for location in external_locations(model):
        pure = PurePosixPath(location)
        if (not location or "\\" in location or pure.is_absolute() or ".." in pure.parts):
            raise ManifestError(
                f"model '{name}': {source} reads external data from {location!r}, which is not "
                "a file beside it; save it with a relative location, e.g. "
                "onnx.save_model(model, path, save_as_external_data=True, location='weights.bin')")
        if not (source.parent / pure).is_file():
            raise ManifestError(f"model '{name}': {source} reads external data {location!r}, "
                                f"but {source.parent / pure} is missing")
        if str(pure) not in files:
            files.append(str(pure))
    return files


def _copy_version(source: Path, data: bytes, files: list[str], target: Path,
                  in_place: bool) -> dict[str, Any]:
    # Copy the model and its external data into the version folder; its [versions.N] entry.
    entry: dict[str, Any] = {"sha256": hashlib.sha256(data).hexdigest()}
    target.mkdir(parents=True, exist_ok=True)
    if not in_place:
        (target / "model.onnx").write_bytes(data)
    external = {}
    for file in files:
        copy = target / file
        if not in_place:
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source.parent / file, copy)
        external[file] = _sha256(copy)
    if external:
        entry["external_data"] = external
    entry["source"] = source.name
    return entry


def _batching_values(batching: Batching, existing: Manifest | None, rows: int | None,
                     wait: float | None, tuned: Tuned | None
                     ) -> tuple[int | None, float | None, list[str], list[str]]:
    # (max_batch_rows, max_wait_ms, comment, notes); None keeps the manifest's value.
    if batching.mode != "dynamic":
        if rows not in (None, 1):
            raise ManifestError(f"max_batch_rows must be 1: {batching.reason}")
        return 1, 0.0 if wait is None else wait, batching.comment(), [batching.reason]
    if tuned is not None:
        rows = tuned.max_batch_rows if rows is None else rows
        wait = tuned.max_wait_ms if wait is None else wait
        comment = list(tuned.comment)
        return rows, wait, comment, [c.lstrip("# ") for c in comment]
    if rows is not None or wait is not None or existing is not None:
        return rows, wait, [], []
    note = "the defaults for a dynamic batch axis (--tune measures this model)"
    return DEFAULT_MAX_BATCH_ROWS, DEFAULT_MAX_WAIT_MS, list(_DEFAULT_COMMENT), [note]


def add_model(source: Path, root: Path, name: str, *, version: int | None = None,
              max_batch_rows: int | None = None, max_wait_ms: float | None = None,
              description: str | None = None, tuner: Tuner | None = None,
              verify: Callable[[Manifest, int], object] | None = None) -> Added:
    """Add the ONNX file ``source`` as version ``version`` (default: the next) of model
    ``name`` in the repository at ``root``, creating or extending its ``model.toml``.

    ``max_batch_rows``/``max_wait_ms`` override the manifest's values; otherwise ``tuner``
    measures them, or a new model with a dynamic batch axis gets 64 rows and 2 ms.
    ``verify(manifest, version)`` runs once the files are written (the worker's load path);
    if it raises, the repository is left as it was. Raises :class:`ManifestError`.
    """
    check_model_name(name)
    if not source.is_file():
        raise ManifestError(f"{source} is not a file")
    graph = read_graph(source, name)
    batching = plan_batching(graph)
    folder, toml = root / name, root / name / "model.toml"
    existing: Manifest | None = None
    doc: dict[str, Any] = {}
    comments: dict[str, list[str]] = {}
    old_text: str | None = None
    if toml.is_file():
        try:
            existing = load_manifest(folder)
        except ManifestError as exc:
            raise ManifestError(f"model '{name}' is already in {root} but its manifest does not "
                                f"load; fix or remove it first: {exc}") from None
        doc, old_text = _read_doc(toml)
        comments = manifest_toml.top_comments(old_text)
        diff = signature_difference(existing, batching)
        if diff:
            raise ManifestError(
                f"model '{name}': {source.name} does not have the signature of the model's "
                "other versions (all versions of a model share one signature):\n  "
                + "\n  ".join(diff)
                + f"\nadd it as a new model instead, e.g. --name {name}-2")
    number = version if version is not None else (existing.latest + 1 if existing else 1)
    if number < 1:
        raise ManifestError(f"version must be >= 1, got {number}")
    if existing and number in existing.versions:
        raise ManifestError(f"model '{name}' already has version {number}; remove it first "
                            f"(inferq models remove {name} --version {number}) or pick another")
    target = folder / str(number)
    in_place = source.resolve() == (target / "model.onnx").resolve()
    if target.exists() and not in_place and (not target.is_dir() or any(target.iterdir())):
        raise ManifestError(f"{target} exists but is not in the manifest; move it away first")
    if tuner is not None and batching.mode != "dynamic":
        raise ManifestError(f"model '{name}': nothing to tune: {batching.reason}")
    tuned = tuner(source, graph, batching) if tuner is not None else None
    rows, wait, comment, notes = _batching_values(batching, existing, max_batch_rows,
                                                  max_wait_ms, tuned)
    if not doc:
        doc = {"description": description if description is not None
               else graph.description or f"{name} (from {source.name})",
               "inputs": [s.to_json() for s in batching.inputs],
               "outputs": [s.to_json() for s in batching.outputs]}
    elif description is not None:
        doc["description"] = description
    for key, val in (("max_batch_rows", rows), ("max_wait_ms", wait)):
        if val is not None:
            doc[key] = val
            comments[key] = []
    if comment:
        comments["max_batch_rows"] = comment

    data = source.read_bytes()
    files = _external_files(data, source, name)
    created, target_existed = not folder.exists(), target.exists()
    try:
        doc.setdefault("versions", {})[str(number)] = _copy_version(
            source, data, files, target, in_place)
        _write_doc(toml, doc, comments)
        manifest = load_manifest(folder)
        if verify is not None:
            verify(manifest, number)
    except BaseException:
        if created:
            shutil.rmtree(folder, ignore_errors=True)
        else:
            if not in_place:  # it held nothing before (checked above)
                shutil.rmtree(target, ignore_errors=True)
                if target_existed:
                    target.mkdir()
            if old_text is not None:
                toml.write_text(old_text, encoding="utf-8")
            else:
                toml.unlink(missing_ok=True)
        raise
    return Added(manifest, number, tuple(notes))


def _model_doc(root: Path, name: str) -> tuple[Path, dict[str, Any], str]:
    check_model_name(name)
    toml = root / name / "model.toml"
    if not toml.is_file():
        raise ManifestError(f"no model '{name}' in {root} (no {toml})")
    doc, text = _read_doc(toml)
    if not isinstance(doc.get("versions", {}), dict):
        raise ManifestError(f"{toml}: versions must be a table of [versions.N]")
    return toml, doc, text


def versions(root: Path, name: str) -> list[int]:
    """The version numbers model ``name``'s manifest lists (read even if it does not load)."""
    _, doc, _ = _model_doc(root, name)
    return sorted(int(v) for v in doc.get("versions", {}) if str(v).isdigit())


def remove_version(root: Path, name: str, version: int, *, remove_model: bool = False) -> bool:
    """Remove version ``version`` of model ``name``: its folder and its manifest entry.

    Removing the last version removes the whole model folder, and only with
    ``remove_model``; returns True when the model folder was removed.
    """
    toml, doc, text = _model_doc(root, name)
    folder = toml.parent
    entries: dict[str, Any] = doc.get("versions", {})
    if str(version) not in entries:
        have = sorted(int(v) for v in entries if str(v).isdigit())
        raise ManifestError(f"model '{name}' has no version {version} (versions: {have})")
    if len(entries) == 1:
        if not remove_model:
            raise ManifestError(f"v{version} is the last version of '{name}': removing it "
                                f"removes the model ({folder})")
        shutil.rmtree(folder)
        return True
    del entries[str(version)]
    _write_doc(toml, doc, manifest_toml.top_comments(text))
    shutil.rmtree(folder / str(version), ignore_errors=True)
    return False

