"""Model outputs as Arrow columns, and the output file assembled from a run's chunks.

Parquet: the id column (when carried through), then one column per model output named
after it; an output ``[-1]`` is a plain column, ``[-1, 10]`` a fixed-size list column, and
more dimensions nest fixed-size lists (``[-1, 3, 4]``: 3 lists of 4). The rows of a failed
chunk are null. ``.npy``: a single-output model's output as one array (failed rows hold NaN,
or 0 for integers: the errors file says which). Either way in input order, written through
a temporary file that is renamed once complete.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from producer.wire import TensorSpec
from workers.batch.errors import BatchError
from workers.batch.spool import Spool, errors_path

#: Rows per Parquet row group: large enough to read well, small enough to hold in memory.
ROW_GROUP_ROWS = 65_536
OUTPUT_SUFFIXES = (".parquet", ".pq", ".npy")
#: Schema metadata keys of a chunk file.
VERSION_KEY, WORKER_KEY = b"inferq.version", b"inferq.worker"


def arrow_type(spec: TensorSpec) -> pa.DataType:
    """The column type of an output: its dtype, in one list level per non-batch axis
    (fixed-size where the axis is)."""
    kind = pa.from_numpy_dtype(np.dtype(spec.dtype))
    for size in reversed(spec.shape[1:]):
        kind = pa.list_(kind, size) if size > 0 else pa.list_(kind)
    return kind


def output_schema(specs: Sequence[TensorSpec], id_field: pa.Field | None) -> pa.Schema:
    """The output file's columns: the id column first, then each output by name."""
    fields = [] if id_field is None else [id_field]
    return pa.schema(fields + [pa.field(s.name, arrow_type(s)) for s in specs])


def to_arrow(values: np.ndarray[Any, Any], kind: pa.DataType) -> pa.Array:
    """An output array [rows, ...] as a column of ``kind`` (see :func:`arrow_type`)."""
    levels, inner = [], kind
    while pa.types.is_list(inner) or pa.types.is_fixed_size_list(inner):
        levels.append(inner)
        inner = inner.value_type
    column = pa.array(np.ascontiguousarray(values).reshape(-1), type=inner)
    shape = values.shape
    for depth in range(len(levels), 0, -1):
        level, count = levels[depth - 1], int(np.prod(shape[:depth]))
        size = shape[depth]
        if pa.types.is_fixed_size_list(level):
            column = pa.FixedSizeListArray.from_arrays(column, size)
        else:
            offsets = pa.array(np.arange(0, (count + 1) * size, size, dtype=np.int32))
            column = pa.ListArray.from_arrays(offsets, column)
    return column


def chunk_table(schema: pa.Schema, specs: Sequence[TensorSpec], rows: int,
                outputs: dict[str, np.ndarray[Any, Any]] | None, ids: pa.Array | None,
                meta: dict[bytes, bytes] | None = None) -> pa.Table:
    """One chunk's rows as a table of ``schema``: its outputs, or nulls (``outputs`` None)."""
    columns = [] if ids is None else [ids]
    for spec in specs:
        kind = schema.field(spec.name).type
        if outputs is None:
            columns.append(pa.nulls(rows, kind))
            continue
        values = outputs[spec.name]
        if values.shape[0] != rows:
            raise BatchError(f"output {spec.name!r} has {values.shape[0]} rows for a chunk of "
                             f"{rows}")
        columns.append(to_arrow(values, kind))
    return pa.Table.from_arrays(columns, schema=schema.with_metadata(meta or {}))


@dataclass
class Assembled:
    """What the output holds: rows, rows by model version, failed rows by code."""

    rows: int = 0
    versions: Counter[int] = field(default_factory=Counter)
    failed: Counter[str] = field(default_factory=Counter)


def assemble(spool: Spool, chunks: int, output: Path, schema: pa.Schema,
             specs: Sequence[TensorSpec]) -> Assembled:
    """Write ``output`` (and the errors file, when chunks failed) from chunks ``0 ..
    chunks - 1`` of ``spool``, in order, holding about one row group in memory."""
    stats = Assembled()
    errors = errors_path(output)
    tmp_errors = errors.with_name(errors.name + ".tmp")
    tmp = output.with_name(output.name + ".tmp")
    with open(tmp_errors, "w") as bad:
        writer = _writer(output, tmp, schema, specs, spool, chunks)
        try:
            for index in range(chunks):
                table = spool.read(index)
                error = spool.error(index)
                if error is None:
                    version = (table.schema.metadata or {}).get(VERSION_KEY)
                    if version is not None:
                        stats.versions[int(version)] += table.num_rows
                else:
                    stats.failed[str(error.get("code"))] += table.num_rows
                    bad.write(json.dumps(error) + "\n")
                writer.add(table, error is not None)
                stats.rows += table.num_rows
        finally:
            writer.close()
    os.replace(tmp, output)
    if stats.failed:
        os.replace(tmp_errors, errors)
    else:
        tmp_errors.unlink()
        errors.unlink(missing_ok=True)
    return stats


class _Parquet:
    def __init__(self, path: Path, schema: pa.Schema) -> None:
        import pyarrow.parquet as pq

        self.writer = pq.ParquetWriter(path, schema)
        self.schema, self.tables, self.rows = schema, list[pa.Table](), 0

    def add(self, table: pa.Table, failed: bool) -> None:
        self.tables.append(table.replace_schema_metadata(None))
        self.rows += table.num_rows
        if self.rows >= ROW_GROUP_ROWS:
            self.flush()

    def flush(self) -> None:
        if self.tables:
            self.writer.write_table(pa.concat_tables(self.tables),
                                    row_group_size=ROW_GROUP_ROWS)
            self.tables, self.rows = [], 0

    def close(self) -> None:
        self.flush()
        self.writer.close()


class _Npy:
    def __init__(self, path: Path, spec: TensorSpec, rows: int) -> None:
        self.spec, self.row = spec, 0
        shape = (rows, *(max(d, 0) for d in spec.shape[1:]))
        self.array = np.lib.format.open_memmap(path, mode="w+", dtype=spec.dtype, shape=shape)

    def add(self, table: pa.Table, failed: bool) -> None:
        n = table.num_rows
        if failed:
            self.array[self.row:self.row + n] = np.nan if self.array.dtype.kind == "f" else 0
        elif n:
            column = table.column(self.spec.name).combine_chunks()
            while pa.types.is_fixed_size_list(column.type) or pa.types.is_list(column.type):
                column = column.flatten()
            values = column.to_numpy(zero_copy_only=False)
            self.array[self.row:self.row + n] = values.reshape(self.array[:n].shape)
        self.row += n

    def close(self) -> None:
        self.array.flush()
        del self.array


def _writer(output: Path, tmp: Path, schema: pa.Schema, specs: Sequence[TensorSpec],
            spool: Spool, chunks: int) -> _Parquet | _Npy:
    if output.suffix.lower() != ".npy":
        return _Parquet(tmp, schema)
    total = sum(spool.rows(i) for i in range(chunks))
    return _Npy(tmp, specs[0], total)


def check_output(output: Path, specs: Sequence[TensorSpec]) -> None:
    """Refuse an output this model's outputs cannot be written to, before any work."""
    suffix = output.suffix.lower()
    if suffix not in OUTPUT_SUFFIXES:
        raise BatchError(f"--output {output.name}: written are .parquet and .npy files")
    if suffix == ".npy" and (len(specs) != 1 or any(d < 0 for d in specs[0].shape[1:])):
        names = ", ".join(s.name for s in specs)
        raise BatchError(f"--output {output.name}: a .npy file holds one fixed-shape output; "
                         f"the model gives {names}: write .parquet")
    if not output.parent.is_dir():
        raise BatchError(f"--output {output}: no such directory {output.parent}")
