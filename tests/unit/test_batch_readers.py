"""inferq batch's input side: --columns, and every format cut into exact chunks in order."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from producer.wire import TensorSpec
from workers.batch import columns
from workers.batch.errors import BatchError
from workers.batch.readers import chunks, open_source

PIXELS = [TensorSpec("pixels", "float32", (-1, 64))]


def _rows(n: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((n, 64)) * 16).astype(np.float32)


def _read_all(path: Path, chunk_rows: int, mapping: dict[str, list[str]] | None = None,
              id_column: str | None = None, block_rows: int = 50,
              specs: list[TensorSpec] = PIXELS) -> list:
    source = open_source(path, specs, mapping or {}, id_column, block_rows)
    return list(chunks(source, chunk_rows))


def test_column_ranges_lists_and_padding() -> None:
    assert columns.expand("p0:p3") == ["p0", "p1", "p2", "p3"]
    assert columns.expand("a,p08:p10,b") == ["a", "p08", "p09", "p10", "b"]
    assert columns.parse(["pixels=img", "mask=m1:m2"]) == {"pixels": ["img"],
                                                            "mask": ["m1", "m2"]}
    for bad in (["pixels"], ["=a"], ["x=a:b"], ["x=p3:p1"], ["x=a,,b"], ["x=a", "x=b"]):
        with pytest.raises(BatchError):
            columns.parse(bad)


def test_plan_refusals_say_what_to_write() -> None:
    schema = pa.schema([("p0", pa.float64()), ("name", pa.string()),
                        ("img", pa.list_(pa.float32(), 63))])
    with pytest.raises(BatchError, match=r"--columns pixels=p0:p63 \(numeric"):
        columns.plan(PIXELS, schema, {})
    numbered = pa.schema([(f"px{j + 1}", pa.float64()) for j in range(64)])
    with pytest.raises(BatchError, match=r"--columns pixels=px1:px64 "):
        columns.plan(PIXELS, numbered, {})
    with pytest.raises(BatchError, match="does not take"):
        columns.plan(PIXELS, schema, {"image": ["p0"]})
    with pytest.raises(BatchError, match=r"takes 64 values a row.*gives 1"):
        columns.plan(PIXELS, schema, {"pixels": ["p0"]})
    with pytest.raises(BatchError, match="not numbers"):
        columns.plan(PIXELS, schema, {"pixels": ["name"] * 64})
    with pytest.raises(BatchError, match="holds 63"):
        columns.plan(PIXELS, schema, {"pixels": ["img"]})


@pytest.mark.parametrize("rows", [0, 1, 63, 64, 130])
def test_parquet_columns_in_any_order_chunked_exactly(tmp_path: Path, rows: int) -> None:
    x = _rows(rows)
    order = np.random.default_rng(1).permutation(64)  # stored out of order
    table = pa.table({"key": [f"r{i}" for i in range(rows)],
                      **{f"p{j}": x[:, j].astype(np.float64) for j in order}})
    pq.write_table(table, tmp_path / "in.parquet", row_group_size=37)
    got = _read_all(tmp_path / "in.parquet", 64, {"pixels": columns.expand("p0:p63")}, "key")
    assert [c.index for c in got] == list(range(len(got)))
    assert [c.rows for c in got] == [min(64, rows - i) for i in range(0, rows, 64)]
    assert [c.first_row for c in got] == list(range(0, rows, 64))
    if rows:
        assert np.array_equal(np.concatenate([c.inputs["pixels"] for c in got]), x)
        assert [i for c in got for i in c.ids.to_pylist()] == [f"r{i}" for i in range(rows)]
        assert got[0].inputs["pixels"].dtype == np.float32
        assert got[0].inputs["pixels"].flags.owndata  # no chunk keeps a whole block alive


def test_csv_with_header_and_mixed_column_order(tmp_path: Path) -> None:
    x = _rows(130)
    names = [f"p{j}" for j in range(64)]
    shuffled = list(np.random.default_rng(2).permutation(names))
    shuffled.insert(17, "id")
    table = pa.table({n: (np.arange(130) if n == "id" else x[:, int(n[1:])].astype(np.float64))
                      for n in shuffled})
    pacsv.write_csv(table, tmp_path / "in.csv")
    got = _read_all(tmp_path / "in.csv", 64, {"pixels": names}, "id")
    assert [c.rows for c in got] == [64, 64, 2]
    assert np.allclose(np.concatenate([c.inputs["pixels"] for c in got]), x)
    assert [i for c in got for i in c.ids.to_pylist()] == list(range(130))


def test_csv_with_only_a_header_has_no_chunk(tmp_path: Path) -> None:
    (tmp_path / "in.csv").write_text("id," + ",".join(f"p{j}" for j in range(64)) + "\n")
    assert _read_all(tmp_path / "in.csv", 64, {"pixels": columns.expand("p0:p63")}, "id") == []


def test_empty_values_are_bad_rows_named_one_by_one(tmp_path: Path) -> None:
    lines = ["a,b"] + [f"{i},{i}" for i in range(10)]
    lines[4] = "3,"  # row 3: b empty
    lines[8] = ",7"  # row 7: a empty
    (tmp_path / "in.csv").write_text("\n".join(lines) + "\n")
    spec = [TensorSpec("x", "float32", (-1, 2))]
    got = _read_all(tmp_path / "in.csv", 4, {"x": ["a", "b"]}, specs=spec)
    assert [c.bad for c in got] == [{3: "row 3: column 'b' is empty"},
                                    {7: "row 7: column 'a' is empty"}, {}]


def test_list_columns_fixed_and_variable(tmp_path: Path) -> None:
    x = _rows(70)
    fixed = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 64)
    variable = pa.array([list(r) for r in x[:69]] + [list(x[69, :63])])  # last row short
    pq.write_table(pa.table({"pixels": fixed, "img": variable}), tmp_path / "in.parquet")
    got = _read_all(tmp_path / "in.parquet", 32)
    assert np.array_equal(np.concatenate([c.inputs["pixels"] for c in got]), x)
    got = _read_all(tmp_path / "in.parquet", 32, {"pixels": ["img"]})
    assert np.allclose(np.concatenate([c.inputs["pixels"] for c in got])[:69], x[:69])
    assert got[-1].bad == {69: "row 69: column 'img' holds 63 values, input 'pixels' takes 64"}


@pytest.mark.parametrize("rows", [0, 1, 130])
def test_npy_and_npz(tmp_path: Path, rows: int) -> None:
    x = _rows(rows)
    np.save(tmp_path / "in.npy", x.astype(np.float64))  # cast to the model's float32
    np.savez_compressed(tmp_path / "in.npz", images=x)
    for path, mapping in ((tmp_path / "in.npy", {}), (tmp_path / "in.npz", {}),
                          (tmp_path / "in.npz", {"pixels": ["images"]})):
        got = _read_all(path, 64, mapping)
        assert [c.rows for c in got] == [min(64, rows - i) for i in range(0, rows, 64)]
        if rows:
            assert np.array_equal(np.concatenate([c.inputs["pixels"] for c in got]), x)
            assert got[0].inputs["pixels"].dtype == np.float32


def test_array_files_refused_with_the_fix(tmp_path: Path) -> None:
    np.save(tmp_path / "wrong.npy", np.zeros((3, 63), np.float32))
    with pytest.raises(BatchError, match=r"shape \[3, 63\]"):
        _read_all(tmp_path / "wrong.npy", 8)
    np.save(tmp_path / "ok.npy", np.zeros((3, 64), np.float32))
    with pytest.raises(BatchError, match="--id-column"):
        _read_all(tmp_path / "ok.npy", 8, id_column="id")
    np.savez(tmp_path / "two.npz", a=np.zeros((3, 64)), b=np.zeros((3, 64)))
    with pytest.raises(BatchError, match="has no array 'pixels'"):
        _read_all(tmp_path / "two.npz", 8)
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(BatchError, match=r"parquet, \.csv, \.npy and \.npz"):
        _read_all(tmp_path / "x.json", 8)
