"""Checking a model version's files before ONNX Runtime reads them: the model's sha256,
and every external data file it names, declared in the manifest and confined to the
version folder.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from workers.errors import ManifestError
from workers.repository.onnxproto import external_locations

if TYPE_CHECKING:
    from workers.repository.manifest import ModelVersion

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


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


def external_data_table(raw: Any, where: str) -> dict[str, str]:
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


def external_file(version: ModelVersion, name: str) -> Path:
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
        with external_file(version, name).open("rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
        if digest.hexdigest() != want:
            raise ManifestError(f"{where}: external data {name!r} has sha256 "
                                f"{digest.hexdigest()}, the manifest says {want}")
    return bool(version.external_data)

