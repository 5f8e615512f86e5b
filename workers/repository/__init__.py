"""The model repository: manifests, file integrity, and the ONNX graph checks."""

from workers.errors import ManifestError
from workers.repository.integrity import verify_external_data, verify_file
from workers.repository.manifest import (
    Manifest,
    ModelVersion,
    check_graph,
    load_manifest,
    scan,
    scan_all,
)
from workers.repository.onnxproto import external_locations

__all__ = [
    "Manifest",
    "ManifestError",
    "ModelVersion",
    "check_graph",
    "external_locations",
    "load_manifest",
    "scan",
    "scan_all",
    "verify_external_data",
    "verify_file",
]
