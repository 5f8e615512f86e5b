"""The tensor encoding both sides use, and the signatures tensors are checked against.

``{"dtype": "float32", "shape": [1, 64], "data": <raw little-endian bytes>}``; under JSON,
``data`` is base64 text. Only an allow-list of numeric dtypes is ever decoded, with
``numpy.frombuffer`` after a length check: nothing is unpickled.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from producer.errors import InvalidInput
from producer.wire.names import BLOB_KEY_PREFIX

#: Numeric dtypes a tensor may carry; anything else (object, structured, strings) is refused.
DTYPES = frozenset(
    ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
     "float16", "float32", "float64"]
)
MAX_RANK = 8
# numpy's dtype.name is computed in Python on every access; a dict lookup is not.
_NAMES = {np.dtype(n): n for n in DTYPES} | {np.dtype(n).newbyteorder(">"): n for n in DTYPES}


def dtype_name(dtype: np.dtype[Any]) -> str | None:
    """The contract name of a numpy dtype, or None when the contract does not carry it."""
    return _NAMES.get(dtype)


#: Largest single dimension accepted; anything bigger cannot be a real tensor.
MAX_DIM = 2**31

Tensor = dict[str, Any]


def tensor_ref(array: np.ndarray[Any, Any], key: str) -> Tensor:
    """A tensor sent by reference: dtype and shape inline, the raw bytes under ``key``."""
    return {"dtype": dtype_name(array.dtype), "shape": list(array.shape), "ref": key}


def tensor_buffer(array: np.ndarray[Any, Any]) -> bytes | memoryview:
    """The contract's raw bytes of ``array``, without a copy when it is already laid out so."""
    if array.dtype.byteorder != ">" and array.flags.c_contiguous:
        return array.data.cast("B")
    return tensor_bytes(array)


def tensor_bytes(array: np.ndarray[Any, Any]) -> bytes:
    """The raw little-endian bytes the contract carries for ``array``."""
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return array.tobytes()  # C order, whatever the array's layout



def dereference(tensor: Mapping[str, Any], name: str, blobs: Mapping[str, bytes | None]
                ) -> Tensor:
    """The inline form of a tensor sent by reference, its bytes looked up in ``blobs``."""
    ref = tensor.get("ref")
    if not isinstance(ref, str) or not ref.startswith(BLOB_KEY_PREFIX):
        # Only blob keys: a reference must never read (and later delete) another key.
        raise InvalidInput(f"{name}: ref must be a key under {BLOB_KEY_PREFIX!r}")
    data = blobs.get(ref)
    if data is None:
        raise InvalidInput(f"{name}: no data under {ref!r} (expired or never sent)")
    return {"dtype": tensor.get("dtype"), "shape": tensor.get("shape"), "data": data}

# --- tensors -------------------------------------------------------------------------


def encode_tensor(array: np.ndarray[Any, Any], *, text: bool = False) -> Tensor:
    """Encode an array as ``{"dtype", "shape", "data"}``; ``text`` base64-encodes ``data``."""
    name = dtype_name(array.dtype)
    if name is None:
        raise InvalidInput(f"dtype {array.dtype} is not supported; use one of {sorted(DTYPES)}")
    data = tensor_bytes(array)
    return {
        "dtype": name,
        "shape": list(array.shape),
        "data": base64.b64encode(data).decode("ascii") if text else data,
    }


def _tensor_bytes(data: Any) -> bytes:
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    if isinstance(data, str):
        return base64.b64decode(data, validate=True)
    # kombu's JSON encoder writes bytes as {"__type__": "bytes", "__value__": <utf-8 text>}
    # when they decode as UTF-8, else as {"__type__": "base64", ...}.
    if isinstance(data, Mapping) and isinstance(data.get("__value__"), str):
        if data.get("__type__") == "bytes":
            return str(data["__value__"]).encode("utf-8")
        if data.get("__type__") == "base64":
            return base64.b64decode(data["__value__"], validate=True)
    raise InvalidInput("data must be bytes or a base64 string")


def decode_tensor(obj: Any, name: str = "tensor") -> np.ndarray[Any, Any]:
    """Decode ``{"dtype", "shape", "data"}`` into a read-only array, checking every field."""
    if not isinstance(obj, Mapping):
        raise InvalidInput(f"{name}: expected a mapping with dtype, shape and data")
    dtype, shape = obj.get("dtype"), obj.get("shape")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise InvalidInput(f"{name}: dtype {dtype!r} is not one of {sorted(DTYPES)}")
    if (
        not isinstance(shape, (list, tuple))
        or len(shape) > MAX_RANK
        or not all(
            isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_DIM for d in shape
        )
    ):
        raise InvalidInput(
            f"{name}: shape must be a list of at most {MAX_RANK} ints in [0, {MAX_DIM}]"
        )
    try:
        data = _tensor_bytes(obj.get("data"))
    except ValueError as exc:
        raise InvalidInput(f"{name}: data is not valid base64") from exc
    except InvalidInput as exc:
        raise InvalidInput(f"{name}: {exc.message}") from None
    np_dtype = np.dtype(dtype).newbyteorder("<")
    expected = math.prod(shape) * np_dtype.itemsize
    if len(data) != expected:
        raise InvalidInput(
            f"{name}: shape {list(shape)} of {dtype} needs {expected} bytes, got {len(data)}"
        )
    try:
        return np.frombuffer(data, dtype=np_dtype).reshape(shape)
    except ValueError as exc:
        raise InvalidInput(f"{name}: shape {list(shape)} is not usable: {exc}") from None


# --- signatures ------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype and shape of a model input or output; -1 marks a free dimension."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> TensorSpec:
        shape = obj["shape"]
        if not isinstance(shape, (list, tuple)) or not all(
            isinstance(d, int) and not isinstance(d, bool) for d in shape
        ):
            raise ValueError(f"shape must be a list of integers, got {shape!r}")
        return cls(str(obj["name"]), str(obj["dtype"]), tuple(shape))


def check_inputs(
    specs: Sequence[TensorSpec], inputs: Mapping[str, np.ndarray[Any, Any]]
) -> int:
    """Check ``inputs`` against ``specs``; return the job's row count (batch axis length)."""
    names = {s.name for s in specs}
    missing = sorted(names - inputs.keys())
    extra = sorted(inputs.keys() - names)
    if missing or extra:
        raise InvalidInput(
            f"inputs {sorted(inputs)} do not match the model's {sorted(names)}"
            + (f"; missing {missing}" if missing else "")
            + (f"; unknown {extra}" if extra else "")
        )
    rows: int | None = None
    for spec in specs:
        arr = inputs[spec.name]
        if dtype_name(arr.dtype) != spec.dtype:
            raise InvalidInput(f"input '{spec.name}': expected {spec.dtype}, got {arr.dtype}")
        if arr.ndim != len(spec.shape):
            raise InvalidInput(
                f"input '{spec.name}': expected rank {len(spec.shape)} {list(spec.shape)}, "
                f"got shape {list(arr.shape)}"
            )
        for axis, (want, got) in enumerate(zip(spec.shape, arr.shape, strict=True)):
            if want != -1 and want != got:
                raise InvalidInput(
                    f"input '{spec.name}': dimension {axis} must be {want}, got {got} "
                    f"(shape {list(arr.shape)}, expected {list(spec.shape)})"
                )
            if want == -1 and got == 0 and axis > 0:
                # A model would answer an empty sequence with something (a mean of 0.0):
                # refuse it instead of returning a made-up answer.
                raise InvalidInput(
                    f"input '{spec.name}': dimension {axis} is empty (shape {list(arr.shape)}); "
                    "a free dimension needs at least one element")
        if spec.shape and spec.shape[0] == -1:
            if arr.shape[0] == 0:
                raise InvalidInput(f"input '{spec.name}': empty batch (0 rows)")
            if rows is not None and arr.shape[0] != rows:
                raise InvalidInput("inputs disagree on the number of rows (batch axis)")
            rows = arr.shape[0]
    return rows or 1
