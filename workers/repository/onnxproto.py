"""A minimal protobuf walk of an ONNX model (no ``onnx`` package): the external data
locations its tensors name, so they can be checked before ONNX Runtime reads anything.
"""

from __future__ import annotations

from collections.abc import Iterator

from workers.errors import ManifestError

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


