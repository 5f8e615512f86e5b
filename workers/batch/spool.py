"""The run directory beside the output: one small Arrow file per finished chunk.

A chunk's file is written under a temporary name and renamed, so it exists whole or not
at all: after a crash, the chunks with a file are done and every other one is missing.
A failed chunk has a file too (its ids, null outputs) and a ``.err.json`` beside it, written
first. The output is assembled from these files, in chunk order, once every chunk has one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa

from workers.batch.errors import BatchError

#: The run's identity and parameters, for ``--resume`` without a run ID.
RUN_FILE = "run.json"
_SUFFIX = ".arrow"
_ERROR_SUFFIX = ".err.json"


def spool_dir(output: Path) -> Path:
    """Where a run writing ``output`` keeps its chunks: ``<output>.inferq-batch/``."""
    return output.with_name(output.name + ".inferq-batch")


def errors_path(output: Path) -> Path:
    """The errors file of a run writing ``output``: ``<output stem>.errors.jsonl``."""
    return output.with_name(output.stem + ".errors.jsonl")


def _replace(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class Spool:
    """The chunk files of one run."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def exists(self) -> bool:
        return (self.directory / RUN_FILE).is_file()

    def create(self, run: dict[str, Any]) -> None:
        """Start a new run's directory with its description."""
        self.directory.mkdir(parents=True, exist_ok=True)
        _replace(self.directory / RUN_FILE, json.dumps(run, indent=2).encode())

    def run(self) -> dict[str, Any]:
        """The description the run was started with."""
        try:
            doc: dict[str, Any] = json.loads((self.directory / RUN_FILE).read_text())
        except (OSError, ValueError) as exc:
            raise BatchError(f"{self.directory}: not a batch run directory ({exc})") from None
        return doc

    def _path(self, index: int, suffix: str = _SUFFIX) -> Path:
        return self.directory / f"{index:09d}{suffix}"

    def finished(self) -> dict[int, bool]:
        """Chunks with a file: index -> whether the chunk failed."""
        out: dict[int, bool] = {}
        failed: set[int] = set()
        for entry in os.scandir(self.directory):
            stem, _, suffix = entry.name.partition(".")
            if not stem.isdigit():
                continue
            if "." + suffix == _SUFFIX:
                out[int(stem)] = False
            elif "." + suffix == _ERROR_SUFFIX:
                failed.add(int(stem))
        for index in failed & out.keys():
            out[index] = True
        return out

    def write(self, index: int, table: pa.Table, error: dict[str, Any] | None = None) -> None:
        """Record chunk ``index`` as finished with ``table`` (and ``error`` if it failed)."""
        if error is not None:
            _replace(self._path(index, _ERROR_SUFFIX), json.dumps(error).encode())
        sink = pa.BufferOutputStream()
        with pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        _replace(self._path(index), sink.getvalue().to_pybytes())

    def read(self, index: int) -> pa.Table:
        """Chunk ``index``'s rows (memory-mapped)."""
        with pa.memory_map(str(self._path(index))) as source:
            return pa.ipc.open_file(source).read_all()

    def rows(self, index: int) -> int:
        """Rows of chunk ``index``, without reading its values."""
        with pa.memory_map(str(self._path(index))) as source:
            reader = pa.ipc.open_file(source)
            return sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))

    def error(self, index: int) -> dict[str, Any] | None:
        """Why chunk ``index`` failed, if it did."""
        path = self._path(index, _ERROR_SUFFIX)
        if not path.is_file():
            return None
        doc: dict[str, Any] = json.loads(path.read_text())
        return doc

    def forget_failures(self) -> int:
        """Remove the failed chunks' files, so that they are sent again; how many."""
        failed = [i for i, bad in self.finished().items() if bad]
        for index in failed:
            self._path(index).unlink(missing_ok=True)
            self._path(index, _ERROR_SUFFIX).unlink(missing_ok=True)
        return len(failed)

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
