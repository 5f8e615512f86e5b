"""Which columns of a table feed which model input, and the arrays they make.

``--columns INPUT=SPEC`` (repeatable), SPEC a comma list of column names and ranges:

- ``pixels=p0:p63``: the 64 numeric columns ``p0`` .. ``p63``, in that order (a range is
  two names with the same prefix and a number; ``p00:p63`` keeps the zero padding);
- ``pixels=a,b,c,d0:d60``: names and ranges, concatenated in the order given;
- ``pixels=img``: one column, a list column (fixed-size or not) holding each row's values,
  or a numeric column for an input with one value per row (``[-1]`` or ``[-1, 1]``).

An input without ``--columns`` reads the column named after it. N numeric columns fill an
input ``[-1, d1, d2 ...]`` with ``d1 * d2 * ... == N``, in C order. A row with an empty
(null) value is a bad row: its chunk is not sent, and the errors file names the row.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from producer.wire import TensorSpec
from workers.batch.errors import BatchError

_NUMBERED = re.compile(r"^(.*?)(\d+)$")


def expand(spec: str) -> list[str]:
    """Column names of one SPEC (names and ``first:last`` ranges), in order."""
    names: list[str] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            raise BatchError(f"--columns: empty column name in {spec!r}")
        if ":" not in part:
            names.append(part)
            continue
        first, last = part.split(":", 1)
        a, b = _NUMBERED.match(first), _NUMBERED.match(last)
        if a is None or b is None or a.group(1) != b.group(1) or int(a.group(2)) > int(
                b.group(2)):
            raise BatchError(f"--columns: {part!r} is not a range like p0:p63 (one prefix, "
                             "a first and a last number)")
        width = len(a.group(2)) if a.group(2).startswith("0") and len(a.group(2)) > 1 else 0
        names += [f"{a.group(1)}{i:0{width}d}" for i in range(int(a.group(2)),
                                                               int(b.group(2)) + 1)]
    return names


def parse(options: Sequence[str]) -> dict[str, list[str]]:
    """``--columns`` options as input name -> column names."""
    out: dict[str, list[str]] = {}
    for option in options:
        name, sep, spec = option.partition("=")
        if not sep or not name.strip():
            raise BatchError(f"--columns {option!r}: write INPUT=COLUMNS, e.g. pixels=p0:p63")
        if name.strip() in out:
            raise BatchError(f"--columns: input {name.strip()!r} is given twice")
        out[name.strip()] = expand(spec)
    return out


@dataclass(frozen=True)
class InputColumns:
    """The columns of one model input: several numeric ones, or one list column."""

    spec: TensorSpec
    columns: tuple[str, ...]
    listed: bool  # one list column holding the row's values

    @property
    def dims(self) -> tuple[int, ...]:
        return tuple(self.spec.shape[1:])


def plan(specs: Sequence[TensorSpec], schema: pa.Schema,
         mapping: dict[str, list[str]]) -> list[InputColumns]:
    """Resolve ``mapping`` (from :func:`parse`) against the model's inputs and the file's
    columns; refuse what cannot fill an input, saying what to write instead."""
    names = {s.name for s in specs}
    unknown = sorted(set(mapping) - names)
    if unknown:
        raise BatchError(f"--columns names {', '.join(unknown)}, which the model does not "
                         f"take; its inputs: {', '.join(sorted(names))}")
    out = []
    for spec in specs:
        dims = tuple(spec.shape[1:])
        if spec.shape[:1] != (-1,) or any(d < 0 for d in dims):
            raise BatchError(f"input {spec.name!r} {list(spec.shape)}: only inputs with a batch "
                             "axis and fixed other dimensions can be read from a table")
        columns = mapping.get(spec.name) or [spec.name]
        missing = [c for c in columns if schema.get_field_index(c) < 0]
        if missing:
            hint = "" if spec.name in mapping else (
                f"; map it with --columns {spec.name}={_guess(schema.names, math.prod(dims))} "
                f"(numeric columns, in order) or {spec.name}=LIST_COLUMN")
            raise BatchError(f"input {spec.name!r}: no column {', '.join(map(repr, missing))} "
                             f"in the file (columns: {_shown(schema.names)}){hint}")
        types = [schema.field(c).type for c in columns]
        listed = len(columns) == 1 and _is_list(types[0])
        if listed and pa.types.is_fixed_size_list(types[0]) \
                and types[0].list_size != math.prod(dims):
            raise BatchError(f"input {spec.name!r} takes {math.prod(dims)} values a row "
                             f"({list(spec.shape)}); column {columns[0]!r} holds "
                             f"{types[0].list_size}")
        if not listed:
            bad = [c for c, t in zip(columns, types, strict=True) if not _is_number(t)]
            if bad:
                raise BatchError(f"input {spec.name!r}: column {bad[0]!r} is "
                                 f"{schema.field(bad[0]).type}, not numbers")
            if len(columns) != math.prod(dims):
                raise BatchError(f"input {spec.name!r} takes {math.prod(dims)} values a row "
                                 f"({list(spec.shape)}); --columns gives {len(columns)}")
        out.append(InputColumns(spec, tuple(columns), listed))
    return out


def _guess(names: Sequence[str], count: int) -> str:
    """A range of ``count`` numbered columns of the file (``p0:p63``), else a pattern."""
    numbered: dict[str, list[int]] = {}
    for name in names:
        match = _NUMBERED.match(name)
        if match:
            numbered.setdefault(match.group(1), []).append(int(match.group(2)))
    for prefix, numbers in numbered.items():
        if len(numbers) == count and max(numbers) - min(numbers) == count - 1:
            return f"{prefix}{min(numbers)}:{prefix}{max(numbers)}"
    return f"p0:p{max(0, count - 1)}"


def _shown(names: Sequence[str]) -> str:
    return ", ".join(names[:8]) + (f" ... ({len(names)} in all)" if len(names) > 8 else "")


def _is_list(t: pa.DataType) -> bool:
    return bool(pa.types.is_list(t) or pa.types.is_large_list(t)
                or pa.types.is_fixed_size_list(t))


def _is_number(t: pa.DataType) -> bool:
    return bool(pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)
                or pa.types.is_null(t))  # a CSV column with no value at all


def arrays(batch: pa.RecordBatch, inputs: Sequence[InputColumns], first_row: int
           ) -> tuple[dict[str, np.ndarray[Any, Any]], dict[int, str]]:
    """The model inputs of a record batch, and its bad rows (absolute row -> why)."""
    bad: dict[int, str] = {}
    out = {}
    for item in inputs:
        want = np.dtype(item.spec.dtype)
        if item.listed:
            values, problems = _from_list(batch.column(item.columns[0]), item)
        else:
            values = np.empty((batch.num_rows, len(item.columns)), dtype=want)
            problems = {}
            for j, name in enumerate(item.columns):
                column = batch.column(name)
                if column.null_count:
                    empty = column.is_null().to_numpy(zero_copy_only=False)
                    for i in np.flatnonzero(empty).tolist():
                        problems.setdefault(i, f"column {name!r} is empty")
                values[:, j] = column.fill_null(0).to_numpy(zero_copy_only=False)
        for r, why in problems.items():
            bad.setdefault(first_row + r, f"row {first_row + r}: {why}")
        out[item.spec.name] = values.astype(want, copy=False).reshape(
            (batch.num_rows, *item.dims))
    return out, bad


def _from_list(column: pa.Array, item: InputColumns) -> tuple[np.ndarray[Any, Any],
                                                                dict[int, str]]:
    """Rows of a list column as [rows, n] values; rows of another length, or with empty
    values, are bad (filled with zeros, never sent)."""
    n, name = math.prod(item.dims), item.columns[0]
    rows = len(column)
    lengths = pc.list_value_length(column).fill_null(-1).to_numpy(zero_copy_only=False)
    flat = column.flatten()
    if (lengths == n).all() and not flat.null_count:
        return flat.to_numpy(zero_copy_only=False).reshape(rows, n), {}
    # Only a batch holding a bad row takes this slower path, to name each bad row.
    problems: dict[int, str] = {}
    values = np.zeros((rows, n), dtype=np.dtype(item.spec.dtype))
    for r, row in enumerate(column.to_pylist()):
        if row is None:
            problems[r] = f"column {name!r} is empty"
        elif len(row) != n:
            problems[r] = f"column {name!r} holds {len(row)} values, input " \
                          f"{item.spec.name!r} takes {n}"
        elif any(v is None for v in row):
            problems[r] = f"column {name!r} holds an empty value"
        else:
            values[r] = row
    return values, problems
