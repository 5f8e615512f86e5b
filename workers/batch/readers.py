"""Reading an input file as a stream of fixed-size chunks of model inputs.

Parquet (``ParquetFile.iter_batches``) and CSV (``pyarrow.csv.open_csv``) are read in
record batches, ``.npy`` through a memory map and ``.npz`` members as a stream, so memory
stays bounded whatever the file's size. Chunk ``i`` always holds rows ``i * chunk_rows``
up to the next chunk's first row, whatever the file's own blocks: a resumed run cuts the
file exactly as the first one did.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import pyarrow as pa

from producer.wire import TensorSpec
from workers.batch import columns as cols
from workers.batch.errors import BatchError

#: Input suffixes read, by kind.
TABULAR = (".parquet", ".pq", ".csv")
ARRAYS = (".npy", ".npz")
#: Bytes of one CSV block (pyarrow's unit of streaming and type conversion).
CSV_BLOCK_BYTES = 4 << 20


@dataclass
class Block:
    """Consecutive rows as a source reads them: inputs, ids, and bad rows (row -> why)."""

    first_row: int
    inputs: dict[str, np.ndarray[Any, Any]]
    ids: pa.Array | None = None
    bad: dict[int, str] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return int(next(iter(self.inputs.values())).shape[0])


@dataclass
class Chunk(Block):
    """The rows of one job: ``index`` is its place in the file, in chunks."""

    index: int = 0


class Source:
    """An input file opened for reading, in blocks of about ``block_rows`` rows."""

    #: Rows in the file, when known before reading it all (not for CSV).
    total_rows: int | None = None
    #: The carried-through id column, when one was asked for.
    id_field: pa.Field | None = None

    def blocks(self) -> Iterator[Block]:  # pragma: no cover - interface
        raise NotImplementedError


class TableSource(Source):
    """Parquet or CSV, read in record batches and mapped to inputs by :mod:`.columns`."""

    def __init__(self, path: Path, specs: Sequence[TensorSpec], mapping: dict[str, list[str]],
                 id_column: str | None, block_rows: int) -> None:
        self.path, self.block_rows, self.id_column = path, block_rows, id_column
        self.csv = path.suffix.lower() == ".csv"
        schema = self._open_schema()
        self.inputs = cols.plan(specs, schema, mapping)
        if id_column is not None:
            if schema.get_field_index(id_column) < 0:
                raise BatchError(f"--id-column {id_column!r}: no such column in {path.name}")
            self.id_field = schema.field(id_column)
        wanted = [c for item in self.inputs for c in item.columns]
        self.names = list(dict.fromkeys(wanted + ([id_column] if id_column else [])))

    def _open_schema(self) -> pa.Schema:
        try:
            if self.csv:
                from pyarrow import csv

                reader = csv.open_csv(self.path, read_options=csv.ReadOptions(
                    block_size=CSV_BLOCK_BYTES))
                schema = reader.schema
                reader.close()
                return schema
            import pyarrow.parquet as pq

            meta = pq.ParquetFile(self.path)
            self.total_rows = meta.metadata.num_rows
            return meta.schema_arrow
        except pa.ArrowInvalid as exc:
            if "Empty CSV file" in str(exc):
                raise BatchError(f"{self.path}: empty file, without even a header") from None
            raise BatchError(f"{self.path}: cannot read it: {exc}") from None

    def _batches(self) -> Iterator[pa.RecordBatch]:
        if not self.csv:
            import pyarrow.parquet as pq

            # pre_buffer keeps every row group read in its cache until the file is closed:
            # memory would grow with the file (a 1 GB file: 1 GB).
            yield from pq.ParquetFile(self.path, pre_buffer=False).iter_batches(
                batch_size=self.block_rows, columns=self.names)
            return
        from pyarrow import csv

        numeric = {c: pa.float64() for item in self.inputs if not item.listed
                   for c in item.columns}
        reader = csv.open_csv(
            self.path, read_options=csv.ReadOptions(block_size=CSV_BLOCK_BYTES),
            convert_options=csv.ConvertOptions(include_columns=self.names,
                                               column_types=numeric))
        yield from reader

    def blocks(self) -> Iterator[Block]:
        row = 0
        try:
            for batch in self._batches():
                if not batch.num_rows:
                    continue
                inputs, bad = cols.arrays(batch, self.inputs, row)
                ids = batch.column(self.id_column) if self.id_column else None
                yield Block(row, inputs, ids, bad)
                row += batch.num_rows
        except pa.ArrowInvalid as exc:
            raise BatchError(f"{self.path}: unreadable after row {row}: {exc}") from None


class ArraySource(Source):
    """``.npy`` (the model's only input, memory-mapped) or ``.npz`` (one member per input,
    named after it or mapped with ``--columns INPUT=MEMBER``, read as a stream)."""

    def __init__(self, path: Path, specs: Sequence[TensorSpec], mapping: dict[str, list[str]],
                 block_rows: int) -> None:
        self.path, self.block_rows, self.specs = path, block_rows, list(specs)
        self.npz = path.suffix.lower() == ".npz"
        if not self.npz and len(specs) != 1:
            raise BatchError(f"model takes {', '.join(s.name for s in specs)}: a .npy file "
                             "feeds one input; write a .npz with one array per input")
        self.members = self._members(mapping)
        rows = set()
        for spec in self.specs:
            reader = self._open(spec.name)
            reader.close()
            _check(spec, reader)
            rows.add(reader.shape[0])
        if len(rows) > 1:
            raise BatchError(f"{path.name}: its arrays have different row counts {sorted(rows)}")
        self.total_rows = rows.pop()

    def _members(self, mapping: dict[str, list[str]]) -> dict[str, str]:
        if not self.npz:
            return {self.specs[0].name: self.path.name}
        with zipfile.ZipFile(self.path) as z:
            names = [n[:-4] for n in z.namelist() if n.endswith(".npy")]
        out = {}
        for spec in self.specs:
            member = mapping.get(spec.name, [spec.name])
            if len(member) != 1:
                raise BatchError(f"--columns {spec.name}=...: name one array of {self.path.name}")
            if member[0] not in names and len(names) == len(self.specs) == 1 \
                    and spec.name not in mapping:
                member = names  # one array for one input: whatever its name
            if member[0] not in names:
                raise BatchError(f"input {spec.name!r}: {self.path.name} has no array "
                                 f"{member[0]!r} (it has {', '.join(names)}); map one with "
                                 f"--columns {spec.name}=ARRAY")
            out[spec.name] = member[0]
        return out

    def _open(self, name: str) -> _NpyReader:
        return _NpyReader(self.path, self.members[name] if self.npz else None)

    def blocks(self) -> Iterator[Block]:
        readers = {s.name: self._open(s.name) for s in self.specs}
        total = self.total_rows or 0
        try:
            for first in range(0, total, self.block_rows):
                n = min(self.block_rows, total - first)
                yield Block(first, {s.name: readers[s.name].read(n).astype(s.dtype, copy=False)
                                    for s in self.specs})
        finally:
            for reader in readers.values():
                reader.close()


def _check(spec: TensorSpec, reader: _NpyReader) -> None:
    shape, dtype, what = reader.shape, reader.dtype, reader.name
    fixed = spec.shape[1:]
    if len(shape) != len(spec.shape) or any(d not in (-1, s) for d, s in
                                            zip(fixed, shape[1:], strict=True)):
        raise BatchError(f"{what}: shape {list(shape)}, input {spec.name!r} takes "
                         f"{list(spec.shape)} (rows first)")
    want = np.dtype(spec.dtype)
    if (dtype.kind == "f" and want.kind in "iub") or dtype.kind not in "biuf":
        raise BatchError(f"{what} is {dtype}, input {spec.name!r} takes {want}: convert it, "
                         f"e.g. np.save(path, x.astype('{want}'))")


class _NpyReader:
    """Rows of one ``.npy`` array, plain (memory-mapped) or a ``.npz`` member (streamed)."""

    def __init__(self, path: Path, member: str | None) -> None:
        self.name = path.name if member is None else f"{path.name}:{member}"
        self._zip: zipfile.ZipFile | None = None
        self._file: IO[bytes] | None = None
        self._offset = 0
        if member is None:
            try:
                self._mapped = np.load(path, mmap_mode="r", allow_pickle=False)
            except ValueError as exc:
                raise BatchError(f"{path}: not a numeric .npy array ({exc})") from None
            self.shape, self.dtype = tuple(self._mapped.shape), self._mapped.dtype
            return
        self._zip = zipfile.ZipFile(path)
        self._file = f = self._zip.open(member + ".npy")
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise BatchError(f"{self.name}: .npy format {version} is not read; save it again")
        if (fortran and len(shape) > 1) or dtype.hasobject:
            raise BatchError(f"{self.name}: save it as a numeric array in C order "
                             "(np.ascontiguousarray) to stream it")
        self.shape, self.dtype = tuple(shape), dtype
        self._row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize

    def read(self, n: int) -> np.ndarray[Any, Any]:
        """The next ``n`` rows, as an array of their own."""
        if self._file is None:
            out = np.array(self._mapped[self._offset:self._offset + n])
        else:
            data = self._file.read(n * self._row_bytes)
            out = np.frombuffer(data, self.dtype).reshape((n, *self.shape[1:])).copy()
        self._offset += n
        return out

    def close(self) -> None:
        for handle in (self._file, self._zip):
            if handle is not None:
                handle.close()


def open_source(path: Path, specs: Sequence[TensorSpec], mapping: dict[str, list[str]],
                id_column: str | None, block_rows: int) -> Source:
    """The reader of ``path``, chosen by its suffix; refuses what it cannot feed the model."""
    if not path.is_file():
        raise BatchError(f"--input {path}: no such file")
    suffix = path.suffix.lower()
    if suffix in TABULAR:
        return TableSource(path, specs, mapping, id_column, block_rows)
    if suffix in ARRAYS:
        if id_column is not None:
            raise BatchError(f"--id-column: a {suffix} file has no columns; its rows are "
                             "numbered (the output keeps their order)")
        return ArraySource(path, specs, mapping, block_rows)
    raise BatchError(f"--input {path.name}: read are .parquet, .csv, .npy and .npz files")


def chunks(source: Source, chunk_rows: int) -> Iterator[Chunk]:
    """The file's rows in chunks of exactly ``chunk_rows`` (the last may be shorter), each
    owning its arrays (no view into a block keeps the block alive)."""
    pending: list[Block] = []
    have, index, first = 0, 0, 0
    for block in source.blocks():
        offset = 0
        while offset < block.rows:
            take = min(chunk_rows - have, block.rows - offset)
            pending.append(_slice(block, offset, take))
            have, offset = have + take, offset + take
            if have == chunk_rows:
                yield _merge(index, first, pending)
                index, first, have, pending = index + 1, first + have, 0, []
    if have:
        yield _merge(index, first, pending)


def _slice(block: Block, offset: int, rows: int) -> Block:
    start = block.first_row + offset
    return Block(start, {k: v[offset:offset + rows] for k, v in block.inputs.items()},
                 None if block.ids is None else block.ids.slice(offset, rows),
                 {r: w for r, w in block.bad.items() if start <= r < start + rows})


def _merge(index: int, first: int, parts: list[Block]) -> Chunk:
    inputs = {k: np.concatenate([p.inputs[k] for p in parts]) if len(parts) > 1
              else np.array(parts[0].inputs[k]) for k in parts[0].inputs}
    ids = None
    if parts[0].ids is not None:
        ids = pa.concat_arrays([p.ids for p in parts if p.ids is not None])
    bad = {r: w for p in parts for r, w in p.bad.items()}
    return Chunk(first, inputs, ids, bad, index=index)
