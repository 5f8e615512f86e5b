"""Drift end to end: profile a version, serve shifted rows through a real worker, and read
the drifted features from ``inferq drift`` and the exporter's ``/metrics``."""

from __future__ import annotations

import json
import shutil
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from producer import InferenceClient
from tests.conftest import MODELS, WorkerProcess, _need_redis
from workers.launch.cli import main
from workers.launch.redisproc import RedisServer, free_port
from workers.ops import drift
from workers.ops.exporter import run_exporter

pytestmark = pytest.mark.integration

SHIFTED = [5, 20, 50]


def _rows(n: int, seed: int, shift: bool = False) -> np.ndarray[Any, Any]:
    rows = np.random.default_rng(seed).normal(8, 3, (n, 64))
    if shift:
        rows[:, SHIFTED] += 3  # one standard deviation
    return rows.clip(0, 16).astype(np.float32)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RedisServer, Path]]:
    """A private Redis, a copy of digits with v2 profiled, and a worker binning every row."""
    _need_redis()
    tmp = tmp_path_factory.mktemp("drift")
    root = tmp / "models"
    shutil.copytree(MODELS / "digits", root / "digits")
    np.save(tmp / "ref.npy", _rows(2000, 0))
    out = CliRunner().invoke(main, ["models", "profile", "digits", "--data",
                                    str(tmp / "ref.npy"), "--version", "2",
                                    "--model-dir", str(root)])
    assert out.exit_code == 0, out.output
    assert "2000 rows" in out.output and "output label: " in out.output
    with RedisServer() as server:
        worker = WorkerProcess(server.url, tmp, model_dir=root, INFERQ_MODELS="digits",
                               INFERQ_DRIFT_SAMPLE="1", INFERQ_DRIFT_FLUSH="0.2",
                               INFERQ_DRIFT_REFERENCE_ROWS="200").start()
        try:
            yield server, root
        finally:
            worker.stop()


def _serve(url: str, version: int, rows: np.ndarray[Any, Any]) -> None:
    with InferenceClient(url) as client:
        jobs = client.submit_many("digits", [{"pixels": rows[i:i + 10]}
                                             for i in range(0, len(rows), 10)],
                                  version=version)
        client.results([j.id for j in jobs], timeout=30)


def _wait_rows(client: Any, version: int, rows: int) -> drift.Window:
    deadline = time.monotonic() + 15
    while True:
        window = drift.read_window(client, "digits", version, 5)
        if window is not None and window.rows[0] >= rows:
            return window
        assert time.monotonic() < deadline, f"v{version}: counts did not reach {rows} rows"
        time.sleep(0.1)


def test_profiled_version_names_the_shifted_features(served: tuple[RedisServer, Path],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    server, root = served
    ref = json.loads(drift.profile_path(root, "digits", 2).read_text())
    _serve(server.url, 2, _rows(50, 1))  # the worker finds the profile on the first batch
    _serve(server.url, 2, _rows(800, 2, shift=True))
    client = server.client()
    window = _wait_rows(client, 2, 800)
    assert window.profile.id == ref["id"]  # the worker published profile.json to Redis

    monkeypatch.setenv("INFERQ_BROKER_URL", server.url)
    out = CliRunner().invoke(main, ["drift", "digits", "--version", "2", "--top", "100",
                                    "--json"])
    assert out.exit_code == 0, out.output
    (report,) = json.loads(out.output)["versions"]
    assert report["reference"]["source"] == "ref.npy (2000 rows)"
    pixels = {int(f["feature"]): f for f in report["features"] if f["tensor"] == "pixels"}
    assert len(pixels) == 64
    drifted = {i for i, f in pixels.items() if f["psi"] > drift.DRIFT_PSI}
    assert drifted == set(SHIFTED), {i: pixels[i]["psi"] for i in sorted(drifted)}
    assert all(pixels[i]["verdict"] == "drift" for i in SHIFTED)
    table = CliRunner().invoke(main, ["drift", "digits", "--version", "2", "--top", "3"])
    assert table.exit_code == 0, table.output
    assert "3 drifted" in table.output
    assert sorted(line.split()[1] for line in table.output.splitlines()[2:5]) == \
        sorted(str(i) for i in SHIFTED)

    # The exporter's /metrics: the shifted features, and the input's max PSI.
    port, stop = free_port(), threading.Event()
    thread = threading.Thread(target=run_exporter, args=(server.url, port, 0.2),
                              kwargs={"stop": stop, "addr": "127.0.0.1"}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                              timeout=5).read().decode()
                if "inferq_drift_psi{" in text:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the exporter did not serve drift"
            time.sleep(0.1)
    finally:
        stop.set()
        thread.join(timeout=10)
    for i in SHIFTED:
        assert (f'inferq_drift_psi{{feature="{i}",model="digits",tensor="pixels",'
                f'version="2"}}') in text
    assert 'inferq_drift_psi_max{model="digits",role="input",tensor="pixels",version="2"}' \
        in text


def test_unprofiled_version_takes_its_first_rows_as_reference(
        served: tuple[RedisServer, Path]) -> None:
    server, _ = served
    _serve(server.url, 1, _rows(50, 3))  # looks for a reference: none
    _serve(server.url, 1, _rows(200, 4))  # the reference
    client = server.client()
    deadline = time.monotonic() + 15
    while client.get(drift.ref_key("digits", 1)) is None:
        assert time.monotonic() < deadline, "no reference built from the first rows"
        time.sleep(0.1)
    _serve(server.url, 1, _rows(300, 5))
    window = _wait_rows(client, 1, 300)
    assert window.profile.source == "first 200 rows served"
    stable = [f for f in window.features() if f.tensor == "pixels"]
    assert max(f.psi for f in stable) < drift.DRIFT_PSI
