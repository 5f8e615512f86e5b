"""inferq batch's output side: Arrow columns, the run directory, assembly, progress."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from producer.wire import TensorSpec
from workers.batch import writers
from workers.batch.errors import BatchError
from workers.batch.progress import Progress, Summary
from workers.batch.spool import Spool, errors_path, spool_dir
from workers.batch.state import fingerprint

OUTPUTS = [TensorSpec("label", "int64", (-1,)), TensorSpec("probabilities", "float32", (-1, 10))]


def test_output_types_one_list_level_per_axis() -> None:
    assert writers.arrow_type(OUTPUTS[0]) == pa.int64()
    assert writers.arrow_type(OUTPUTS[1]) == pa.list_(pa.float32(), 10)
    cube = TensorSpec("cube", "float16", (-1, 2, 3))
    assert writers.arrow_type(cube) == pa.list_(pa.list_(pa.float16(), 3), 2)
    free = TensorSpec("seq", "int32", (-1, -1))
    assert writers.arrow_type(free) == pa.list_(pa.int32())
    values = np.arange(24, dtype=np.float16).reshape(4, 2, 3)
    assert writers.to_arrow(values, writers.arrow_type(cube)).to_pylist() == values.tolist()
    seq = np.arange(6, dtype=np.int32).reshape(2, 3)
    assert writers.to_arrow(seq, pa.list_(pa.int32())).to_pylist() == seq.tolist()


def _chunk(schema: pa.Schema, first: int, rows: int, failed: bool = False) -> pa.Table:
    ids = pa.array([f"id{i}" for i in range(first, first + rows)])
    if failed:
        return writers.chunk_table(schema, OUTPUTS, rows, None, ids)
    outputs = {"label": np.arange(first, first + rows, dtype=np.int64),
               "probabilities": np.full((rows, 10), first, np.float32)}
    return writers.chunk_table(schema, OUTPUTS, rows, outputs, ids,
                               {writers.VERSION_KEY: b"2"})


def _spool(tmp_path: Path, sizes: list[int], failed: set[int]) -> tuple[Spool, pa.Schema]:
    schema = writers.output_schema(OUTPUTS, pa.field("key", pa.string()))
    spool = Spool(spool_dir(tmp_path / "out.parquet"))
    spool.create({"run_id": "r"})
    first = 0
    for index, rows in reversed(list(enumerate(sizes))):  # finished out of order
        first = sum(sizes[:index])
        error = {"chunk": index, "code": "INVALID_ARGUMENT"} if index in failed else None
        spool.write(index, _chunk(schema, first, rows, index in failed), error)
    return spool, schema


def test_assembled_parquet_is_in_input_order_with_failed_rows_null(tmp_path: Path) -> None:
    spool, schema = _spool(tmp_path, [64, 64, 2], failed={1})
    assert spool.finished() == {0: False, 1: True, 2: False}
    assert [spool.rows(i) for i in range(3)] == [64, 64, 2]
    out = tmp_path / "out.parquet"
    stats = writers.assemble(spool, 3, out, schema, OUTPUTS)
    assert (stats.rows, dict(stats.versions), dict(stats.failed)) == (
        130, {2: 66}, {"INVALID_ARGUMENT": 64})
    table = pq.read_table(out)
    assert table.schema.names == ["key", "label", "probabilities"]
    assert table.column("key").to_pylist() == [f"id{i}" for i in range(130)]
    labels = table.column("label").to_pylist()
    assert labels[:64] == list(range(64)) and labels[64:128] == [None] * 64
    assert labels[128:] == [128, 129]
    assert table.column("probabilities").to_pylist()[129] == [128.0] * 10
    errors = [json.loads(line) for line in errors_path(out).read_text().splitlines()]
    assert errors == [{"chunk": 1, "code": "INVALID_ARGUMENT"}]


def test_assembled_npy_and_an_empty_output(tmp_path: Path) -> None:
    spool, schema = _spool(tmp_path, [3, 2], failed={0})
    out = tmp_path / "out.npy"
    probabilities = [OUTPUTS[1]]
    writers.assemble(spool, 2, out, schema, probabilities)
    array = np.load(out)
    assert array.shape == (5, 10) and np.isnan(array[:3]).all() and (array[3:] == 3).all()
    empty = Spool(tmp_path / "empty")
    empty.create({"run_id": "e"})
    writers.assemble(empty, 0, tmp_path / "none.parquet", schema, OUTPUTS)
    assert pq.read_table(tmp_path / "none.parquet").num_rows == 0
    assert not errors_path(tmp_path / "none.parquet").exists()


def test_outputs_refused_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(BatchError, match="one fixed-shape output"):
        writers.check_output(tmp_path / "x.npy", OUTPUTS)
    with pytest.raises(BatchError, match="written are"):
        writers.check_output(tmp_path / "x.csv", OUTPUTS)
    with pytest.raises(BatchError, match="no such directory"):
        writers.check_output(tmp_path / "missing" / "x.parquet", OUTPUTS)
    with pytest.raises(BatchError, match="has 3 rows for a chunk of 4"):
        schema = writers.output_schema(OUTPUTS, None)
        writers.chunk_table(schema, OUTPUTS, 4, {"label": np.zeros(3, np.int64),
                                                 "probabilities": np.zeros((4, 10))}, None)


def test_a_failed_chunk_can_be_sent_again(tmp_path: Path) -> None:
    spool, _ = _spool(tmp_path, [4, 4], failed={1})
    assert spool.forget_failures() == 1
    assert spool.finished() == {0: False}


def test_fingerprint_changes_with_the_content(tmp_path: Path) -> None:
    path = tmp_path / "data.bin"
    path.write_bytes(b"a" * 3_000_000)
    before = fingerprint(path)
    assert fingerprint(path) == before
    with open(path, "r+b") as f:
        f.seek(2_999_999)
        f.write(b"b")
    assert fingerprint(path)["edges_sha256"] != before["edges_sha256"]


def test_progress_logs_json_lines_off_a_terminal() -> None:
    stream = io.StringIO()
    progress = Progress("run1", 100, done=10, stream=stream, interval_s=0.0, title="t")
    progress.advance(30)
    progress.advance(5, failed=True)
    progress.close()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert lines[0]["event"] == "batch_started" and lines[0]["rows_done"] == 10
    assert lines[-1]["event"] == "batch_progress"
    assert (lines[-1]["rows_done"], lines[-1]["rows_failed"], lines[-1]["rows_total"]) == (
        40, 5, 100)
    summary = Summary("run1", "digits", "out.parquet", rows=100, rows_failed=5, seconds=2.0,
                      rows_this_run=90, failed_by_code={"INVALID_ARGUMENT": 5},
                      rows_by_version={1: 10, 2: 85}, errors_file="out.errors.jsonl")
    text = "\n".join(summary.lines())
    assert "45 rows/s" in text and "INVALID_ARGUMENT 5" in text and "more than one" in text
    assert summary.as_json()["rows_per_s"] == 45.0
