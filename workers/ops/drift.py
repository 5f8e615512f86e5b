"""Drift: a model version's reference profile, live histograms binned by it, and PSI.

A :class:`Profile` holds, per tensor of a version, what its reference data looked like:

- each input feature (a row flattened; at most :data:`MAX_FEATURES` per tensor, an evenly
  spaced subset of a wider one) and each float output value gets :data:`BINS` bins whose
  edges are the reference's deciles (the outer bins open-ended), and the reference's
  fraction in each bin;
- an integer output with one value per row (a predicted label) is categorical: its
  reference classes (the :data:`MAX_CLASSES` most common, plus one bin for any other
  value) and their fractions.

Live rows are binned by the same edges (:meth:`TensorProfile.counts`, vectorised) and
compared with the reference by the population stability index,
``PSI = sum((a - e) * ln(a / e))`` over bins (:func:`psi`): under 0.1 stable, 0.1-0.2
worth watching, 0.2 and more drifted.

Where it lives in Redis (the broker):

- ``inferq:drift-ref:<model>:<version>``: the profile every worker bins by (JSON). A
  worker publishes the version's ``profile.json`` there when it has one, else the first
  worker to see :data:`~workers.settings.Settings.drift_reference_rows` rows sets one
  built from them (SET NX: every worker adopts the first). Deleting it starts a new
  reference from the next rows.
- ``inferq:drift:<model>:<version>:<profile id>:<epoch minute>``: a hash, one field per
  worker instance, holding that instance's counts for that minute (int32, every tensor's
  bins in profile order, then each tensor's rows). A flush overwrites its own field, so
  a retried write never counts twice; readers add the fields up. Expires after
  :data:`COUNTS_TTL_S`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from producer.wire import TensorSpec

#: Bins per feature: deciles of the reference.
BINS = 10
#: Features profiled per tensor; a wider tensor is profiled on an evenly spaced subset.
MAX_FEATURES = 256
#: Classes of a categorical output kept by name; any other value shares one bin.
MAX_CLASSES = 50
#: Floor of a bin fraction in PSI (an empty bin would make ln(a/e) infinite).
EPSILON = 1e-4
#: PSI at or above which a feature has drifted, and above which it is worth watching.
DRIFT_PSI = 0.2
WATCH_PSI = 0.1
#: Fewer live rows than this in the window: PSI is shown but not judged (nor exported).
MIN_ROWS = 100
#: The file beside a version's model.onnx that ``inferq models profile`` writes.
PROFILE_FILE = "profile.json"
REF_PREFIX = "inferq:drift-ref:"
COUNTS_PREFIX = "inferq:drift:"
#: Seconds a minute of counts stays in Redis: the longest window that can be read.
COUNTS_TTL_S = 2 * 3600
FORMAT = 1

Array = np.ndarray[Any, Any]


def ref_key(model: str, version: int) -> str:
    return f"{REF_PREFIX}{model}:{version}"


def counts_key(model: str, version: int, profile_id: str, minute: int) -> str:
    return f"{COUNTS_PREFIX}{model}:{version}:{profile_id}:{minute}"


def profile_path(model_dir: Path, model: str, version: int) -> Path:
    return model_dir / model / str(version) / PROFILE_FILE


def select_features(width: int) -> Array:
    """The flat indices profiled of a tensor with ``width`` values a row."""
    if width <= MAX_FEATURES:
        return np.arange(width)
    return np.unique(np.linspace(0, width - 1, MAX_FEATURES).round().astype(np.int64))


def is_categorical(spec: TensorSpec) -> bool:
    """An integer (or boolean) output with one value a row: its values are classes."""
    return np.dtype(spec.dtype).kind in "iub" and all(d == 1 for d in spec.shape[1:])


def rows_of(array: Array, features: Array | None) -> Array:
    """``array`` as (rows, values), keeping only ``features`` (None: a categorical column)."""
    flat = array.reshape(len(array), -1)
    return flat[:, 0] if features is None else flat[:, features]


@dataclass(frozen=True)
class TensorProfile:
    """The reference of one tensor: binned features, or a categorical output."""

    name: str
    #: "input" or "output".
    role: str
    #: Flat feature indices (binned), or None (categorical).
    features: Array | None
    #: (features, BINS - 1) bin edges (binned), or (classes,) reference classes.
    edges: Array
    #: (features, bins) reference fractions; a categorical tensor has one row.
    expected: Array

    @property
    def categorical(self) -> bool:
        return self.features is None

    @property
    def feature_names(self) -> list[str]:
        return ["class"] if self.features is None else [str(int(i)) for i in self.features]

    @property
    def size(self) -> int:
        """Counters this tensor takes: features x bins."""
        return int(self.expected.size)

    def bin_names(self) -> list[str]:
        if self.features is None:
            return [str(int(c)) for c in self.edges] + ["other"]
        return [str(b) for b in range(BINS)]

    def counts(self, values: Array) -> Array:
        """(features, bins) counts of ``values``, as :func:`rows_of` returns them."""
        shape = self.expected.shape
        if len(values) == 0:
            return np.zeros(shape, np.int64)
        if self.features is None:
            classes, values = self.edges, values.astype(np.int64, copy=False)
            pos = np.minimum(np.searchsorted(classes, values), len(classes) - 1)
            bins = np.where(classes[pos] == values, pos, len(classes))
            found: Array = np.bincount(bins, minlength=shape[1]).reshape(shape)
            return found.astype(np.int64)
        # A value's bin is the number of edges at or below it (outer bins open-ended),
        # compared in the values' own float type: about 1 us per sampled row of 256 values.
        kind = values.dtype if values.dtype.kind == "f" else np.dtype(np.float64)
        edges = self._edges_by_row_f32 if kind == np.float32 else self.edges.T
        bins = (values[:, None, :] >= edges[None, :, :]).sum(axis=1, dtype=np.int8)
        flat = bins + self._offsets
        counted: Array = np.bincount(flat.ravel(), minlength=self.size).reshape(shape)
        return counted.astype(np.int64)

    @functools.cached_property
    def _offsets(self) -> Array:
        return np.arange(len(self.expected), dtype=np.int64) * BINS

    @functools.cached_property
    def _edges_by_row_f32(self) -> Array:
        return np.ascontiguousarray(self.edges.T.astype(np.float32))

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "role": self.role,
                "kind": "categorical" if self.features is None else "binned",
                "features": None if self.features is None else self.features.tolist(),
                "edges": self.edges.tolist(),
                "expected": np.round(self.expected, 6).tolist()}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> TensorProfile:
        features = None if raw["features"] is None else np.asarray(raw["features"], np.int64)
        edges = np.asarray(raw["edges"], np.int64 if features is None else np.float64)
        expected = np.asarray(raw["expected"], np.float64)
        if features is not None and edges.shape != (len(features), BINS - 1):
            raise ValueError(f"tensor {raw['name']!r}: edges do not match its features")
        if expected.shape != ((1, len(edges) + 1) if features is None
                              else (len(features), BINS)):
            raise ValueError(f"tensor {raw['name']!r}: fractions do not match its bins")
        return cls(str(raw["name"]), str(raw["role"]), features, edges, expected)


def profile_table(name: str, role: str, table: Array, features: Array | None
                  ) -> TensorProfile:
    """The reference of one tensor from :func:`rows_of` its reference rows (at least one):
    binned by ``features``, or categorical when ``features`` is None."""
    if len(table) == 0:
        raise ValueError(f"tensor {name!r}: no reference rows")
    if features is None:
        column = table.astype(np.int64)
        classes, counts = np.unique(column, return_counts=True)
        keep = np.sort(classes[np.argsort(-counts, kind="stable")[:MAX_CLASSES]])
        tensor = TensorProfile(name, role, None, keep, np.zeros((1, len(keep) + 1)))
        found = tensor.counts(column)
    else:
        edges = np.quantile(table.astype(np.float64), np.linspace(0, 1, BINS + 1)[1:-1],
                            axis=0).T
        tensor = TensorProfile(name, role, features, np.ascontiguousarray(edges),
                               np.zeros((len(features), BINS)))
        found = tensor.counts(table)
    expected = found / found.sum(axis=1, keepdims=True)
    return TensorProfile(name, role, tensor.features, tensor.edges, expected)


def tracked(inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]
            ) -> list[tuple[str, str, Array | None]]:
    """(name, role, features or None for categorical) of every tensor a profile covers."""
    out: list[tuple[str, str, Array | None]] = []
    for role, specs in (("input", inputs), ("output", outputs)):
        for s in specs:
            if role == "output" and is_categorical(s):
                out.append((s.name, role, None))
            else:
                width = math.prod(d for d in s.shape[1:]) if all(
                    d > 0 for d in s.shape[1:]) else -1
                if width > 0:  # a tensor of varying width has no fixed features
                    out.append((s.name, role, select_features(width)))
    return out


@dataclass(frozen=True)
class Profile:
    """A model version's reference: one :class:`TensorProfile` per input and output."""

    model: str
    version: int
    #: Where the reference came from: a file name, or "first N rows served".
    source: str
    rows: int
    tensors: tuple[TensorProfile, ...]
    created: float = 0.0

    @property
    def id(self) -> str:
        """A short hash of the bins: counts made with other bins never mix with these."""
        body = json.dumps([t.to_json() for t in self.tensors], sort_keys=True)
        return hashlib.sha256(body.encode()).hexdigest()[:12]

    @property
    def size(self) -> int:
        """Length of a packed count vector: every tensor's bins, then each one's rows."""
        return sum(t.size for t in self.tensors) + len(self.tensors)

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "model": self.model, "version": self.version,
                "id": self.id, "source": self.source, "rows": self.rows,
                "created": self.created, "tensors": [t.to_json() for t in self.tensors]}

    def dumps(self) -> str:
        return json.dumps(self.to_json(), separators=(",", ":"))

    @classmethod
    def loads(cls, raw: str | bytes) -> Profile:
        """Parse a profile; a document this version cannot read raises ValueError."""
        try:
            doc = json.loads(raw)
            if doc.get("format") != FORMAT:
                raise ValueError(f"profile format {doc.get('format')!r}, expected {FORMAT}")
            return cls(str(doc["model"]), int(doc["version"]), str(doc["source"]),
                       int(doc["rows"]),
                       tuple(TensorProfile.from_json(t) for t in doc["tensors"]),
                       float(doc.get("created", 0.0)))
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"not a drift profile: {exc}") from None

    def pack(self, counts: Sequence[Array], rows: Sequence[int]) -> bytes:
        """Counts (one array per tensor) and rows as the bytes a flush stores."""
        flat = np.concatenate([*(c.ravel() for c in counts), np.asarray(rows, np.int64)])
        return flat.astype("<i4").tobytes()

    def unpack(self, blob: bytes) -> tuple[list[Array], list[int]] | None:
        """The counts and rows of :meth:`pack`; None for bytes of another shape."""
        if len(blob) != 4 * self.size:
            return None
        flat = np.frombuffer(blob, "<i4").astype(np.int64)
        out, at = [], 0
        for t in self.tensors:
            out.append(flat[at:at + t.size].reshape(t.expected.shape))
            at += t.size
        return out, [int(r) for r in flat[at:]]


def build_profile(model: str, version: int, inputs: Sequence[TensorSpec],
                  outputs: Sequence[TensorSpec], arrays: Mapping[str, Array], source: str
                  ) -> Profile:
    """The profile of reference ``arrays`` (inputs, and the outputs the version gave for
    them; a tensor missing from ``arrays`` is left out)."""
    tables = [(name, role, features, rows_of(arrays[name], features))
              for name, role, features in tracked(inputs, outputs) if name in arrays]
    return profile_from_tables(model, version, source, tables)


def profile_from_tables(model: str, version: int, source: str,
                        tables: Sequence[tuple[str, str, Array | None, Array]]) -> Profile:
    """The profile of reference rows already reduced by :func:`rows_of`."""
    if not tables:
        raise ValueError("no reference rows for any input or output")
    tensors = tuple(profile_table(name, role, table, features)
                    for name, role, features, table in tables)
    return Profile(model, version, source, len(tables[0][3]), tensors,
                   round(time.time(), 3))


def psi(counts: Array, expected: Array) -> Array:
    """PSI of each row of ``counts`` (features x bins) against the reference fractions;
    NaN for a feature with no rows."""
    totals = counts.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        actual = np.maximum(counts / totals, EPSILON)
    exp = np.maximum(expected, EPSILON)
    out: Array = ((actual - exp) * np.log(actual / exp)).sum(axis=1)
    return np.where(totals[:, 0] > 0, out, np.nan)


def verdict(value: float, rows: int) -> str:
    if rows < MIN_ROWS:
        return "few rows"
    if value >= DRIFT_PSI:
        return "drift"
    return "watch" if value >= WATCH_PSI else "ok"


@dataclass(frozen=True)
class FeatureDrift:
    """PSI of one feature (or categorical output) over a window."""

    tensor: str
    role: str
    feature: str
    psi: float
    rows: int

    @property
    def verdict(self) -> str:
        return verdict(self.psi, self.rows)


@dataclass
class Window:
    """A version's reference and the live counts summed over a window of minutes."""

    profile: Profile
    counts: list[Array]
    rows: list[int]
    minutes: int

    def features(self) -> list[FeatureDrift]:
        """Every profiled feature with its PSI, most drifted first (no rows: left out)."""
        out = []
        for tensor, counts, rows in zip(self.profile.tensors, self.counts, self.rows,
                                        strict=True):
            if rows == 0:
                continue
            values = psi(counts, tensor.expected)
            out += [FeatureDrift(tensor.name, tensor.role, name, float(v), rows)
                    for name, v in zip(tensor.feature_names, values, strict=True)]
        return sorted(out, key=lambda f: -f.psi)


def _text(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def versions_profiled(client: Any, model: str) -> list[int]:
    """Versions of ``model`` with a reference in Redis."""
    found = []
    for key in client.scan_iter(match=f"{REF_PREFIX}{model}:*", count=1000):
        tail = _text(key).rsplit(":", 1)[-1]
        if tail.isdigit():
            found.append(int(tail))
    return sorted(set(found))


def all_profiled(client: Any) -> list[tuple[str, int]]:
    """(model, version) of every reference in Redis."""
    out = set()
    for key in client.scan_iter(match=f"{REF_PREFIX}*", count=1000):
        model, _, version = _text(key)[len(REF_PREFIX):].rpartition(":")
        if model and version.isdigit():
            out.add((model, int(version)))
    return sorted(out)


def read_window(client: Any, model: str, version: int, minutes: int,
                now: float | None = None) -> Window | None:
    """The reference and the last ``minutes`` minutes of counts of ``model`` v``version``
    (None when the version has no reference yet)."""
    raw = client.get(ref_key(model, version))
    if raw is None:
        return None
    return window_for(client, Profile.loads(raw), minutes, now)


def window_for(client: Any, profile: Profile, minutes: int, now: float | None = None
               ) -> Window:
    last = int((time.time() if now is None else now) // 60)
    pipe = client.pipeline(transaction=False)
    for minute in range(last - minutes + 1, last + 1):
        pipe.hgetall(counts_key(profile.model, profile.version, profile.id, minute))
    counts = [np.zeros(t.expected.shape, np.int64) for t in profile.tensors]
    rows = [0] * len(profile.tensors)
    for fields in pipe.execute():
        for blob in fields.values():
            unpacked = profile.unpack(blob)
            if unpacked is None:
                continue
            for i, (c, r) in enumerate(zip(*unpacked, strict=True)):
                counts[i] += c
                rows[i] += r
    return Window(profile, counts, rows, minutes)


def top_per_tensor(features: Iterable[FeatureDrift], k: int) -> list[FeatureDrift]:
    """The ``k`` most drifted features of each tensor (``features`` most drifted first)."""
    seen: dict[str, int] = {}
    out = []
    for f in features:
        if seen.get(f.tensor, 0) < k:
            seen[f.tensor] = seen.get(f.tensor, 0) + 1
            out.append(f)
    return out
