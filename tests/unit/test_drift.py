"""Drift: profiles, PSI, the drift observer and the exporter's gauges (fakeredis)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import fakeredis
import numpy as np
import pytest

from producer.errors import InvalidInput
from producer.wire import TensorSpec
from workers.ops import drift
from workers.ops.exporter import QueueExporter
from workers.repository.manifest import Manifest
from workers.serving.drift import DriftObserver
from workers.serving.observers import Batch

PIXELS = TensorSpec("pixels", "float32", (-1, 64))
LABEL = TensorSpec("label", "int64", (-1,))
PROBS = TensorSpec("probabilities", "float32", (-1, 10))
SHIFTED = [3, 17, 42]


def _reference(rows: int, seed: int) -> np.ndarray[Any, Any]:
    return np.random.default_rng(seed).normal(size=(rows, 64)).astype(np.float32)


def _psi(profile: drift.Profile, index: int, values: np.ndarray[Any, Any]
         ) -> np.ndarray[Any, Any]:
    tensor = profile.tensors[index]
    return drift.psi(tensor.counts(drift.rows_of(values, tensor.features)), tensor.expected)


@pytest.fixture(scope="module")
def profile() -> drift.Profile:
    labels = np.random.default_rng(1).choice(10, 5000, p=[0.1] * 10)
    return drift.build_profile("digits", 1, [PIXELS], [LABEL],
                               {"pixels": _reference(5000, 0), "label": labels}, "test")


def test_shifted_features_and_only_those_drift(profile: drift.Profile) -> None:
    live = _reference(2000, 7)
    live[:, SHIFTED] += 1.0  # one standard deviation
    values = _psi(profile, 0, live)
    assert sorted(np.flatnonzero(values > drift.DRIFT_PSI).tolist()) == SHIFTED
    assert values[[i for i in range(64) if i not in SHIFTED]].max() < drift.WATCH_PSI


def test_a_fresh_sample_of_the_reference_is_stable(profile: drift.Profile) -> None:
    for seed in (11, 12, 13):
        assert _psi(profile, 0, _reference(2000, seed)).max() < drift.WATCH_PSI


def test_categorical_output(profile: drift.Profile) -> None:
    label = profile.tensors[1]
    assert label.categorical and label.feature_names == ["class"]
    assert label.bin_names() == [str(c) for c in range(10)] + ["other"]
    rng = np.random.default_rng(5)
    same = rng.choice(10, 2000, p=[0.1] * 10)
    skewed = rng.choice(10, 2000, p=[0.3] + [0.7 / 9] * 9)
    assert _psi(profile, 1, same)[0] < drift.WATCH_PSI
    assert _psi(profile, 1, skewed)[0] > drift.DRIFT_PSI
    # A class the reference never saw counts in "other".
    counts = label.counts(np.array([0, 3, 99, 123]))
    assert counts.tolist() == [[1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 2]]


def test_float_outputs_are_binned_per_value() -> None:
    probs = np.random.default_rng(2).dirichlet(np.ones(10), 1000).astype(np.float32)
    p = drift.build_profile("m", 1, [], [PROBS], {"probabilities": probs}, "t")
    assert not p.tensors[0].categorical and p.tensors[0].expected.shape == (10, drift.BINS)
    assert drift.is_categorical(LABEL) and not drift.is_categorical(PROBS)


def test_wide_tensors_are_profiled_on_evenly_spaced_features() -> None:
    spec = TensorSpec("image", "float32", (-1, 3, 64, 64))
    images = np.random.default_rng(3).random((200, 3, 64, 64), dtype=np.float32)
    p = drift.build_profile("cnn", 1, [spec], [], {"image": images}, "t")
    features = p.tensors[0].features
    assert features is not None and len(features) == drift.MAX_FEATURES
    assert features[0] == 0 and features[-1] == 3 * 64 * 64 - 1
    assert np.diff(features).min() >= 47  # evenly spread, not the first 256


def test_profile_round_trip(profile: drift.Profile) -> None:
    back = drift.Profile.loads(profile.dumps())
    assert back.id == profile.id and back.dumps() == profile.dumps()
    live = _reference(300, 9)
    assert (_psi(back, 0, live) == _psi(profile, 0, live)).all()
    counts = [t.counts(np.zeros((0,))) + i for i, t in enumerate(profile.tensors)]
    unpacked = profile.unpack(profile.pack(counts, [5, 6]))
    assert unpacked is not None and unpacked[1] == [5, 6]
    assert [c.tolist() for c in unpacked[0]] == [c.tolist() for c in counts]
    assert profile.unpack(b"\0" * 8) is None
    with pytest.raises(ValueError, match="format"):
        drift.Profile.loads(json.dumps({**profile.to_json(), "format": 99}))


def test_psi_of_a_feature_with_no_rows_is_nan() -> None:
    assert np.isnan(drift.psi(np.zeros((1, 10)), np.full((1, 10), 0.1))[0])
    assert drift.verdict(0.5, 10) == "few rows" and drift.verdict(0.5, 500) == "drift"
    assert drift.verdict(0.15, 500) == "watch" and drift.verdict(0.01, 500) == "ok"


# --- the observer ---------------------------------------------------------------------------

MANIFEST = Manifest("digits", "", (PIXELS,), (LABEL, PROBS), 64, 2.0, {})


def _batch(version: int, pixels: np.ndarray[Any, Any], fail: int | None = None
           ) -> tuple[Batch, list[Any]]:
    """One-row jobs; the model's outputs stand in as the row's argmax and a softmax."""
    jobs: list[Any] = []
    outcomes: list[Any] = []
    for i, row in enumerate(pixels):
        jobs.append(SimpleNamespace(inputs={"pixels": row[None]}, rows=1))
        probs = np.exp(row[:10]) / np.exp(row[:10]).sum()
        outcomes.append(InvalidInput("bad") if i == fail else
                        {"label": np.array([int(np.argmax(row[:10]))]),
                         "probabilities": probs[None].astype(np.float32)})
    return Batch("digits", version, "cpu", jobs, len(jobs), time.time(),
                 finished=time.time()), outcomes


def _drive(observer: DriftObserver, version: int, pixels: np.ndarray[Any, Any],
           per_batch: int = 8) -> None:
    for start in range(0, len(pixels), per_batch):
        observer.batch_done(*_batch(version, pixels[start:start + per_batch]))
        work = observer.handoff()
        if work is not None:
            work()


def _observer(client: Any, tmp_path: Path, **kw: Any) -> DriftObserver:
    options = {"sample": 1.0, "reference_rows": 500, "flush_s": 1e-9, "idle_flush": False} | kw
    return DriftObserver(MANIFEST, client, tmp_path, **options)


def test_observer_builds_the_reference_from_the_first_rows(tmp_path: Path) -> None:
    client = fakeredis.FakeRedis()
    first = _observer(client, tmp_path)
    _drive(first, 1, _reference(600, 0))
    raw = client.get(drift.ref_key("digits", 1))
    assert raw is not None
    ref = drift.Profile.loads(raw)
    assert ref.rows == 500 and ref.source == "first 500 rows served"
    assert [t.name for t in ref.tensors] == ["pixels", "label", "probabilities"]
    # A second worker adopts the first one's reference (SET NX), whatever it saw.
    second = _observer(client, tmp_path)
    _drive(second, 1, _reference(600, 1) + 5)
    assert client.get(drift.ref_key("digits", 1)) == raw
    # Live rows after the reference, shifted on three features: they drift, others don't.
    shifted = _reference(1000, 2)
    shifted[:, SHIFTED] += 1.0
    _drive(first, 1, shifted)
    window = drift.read_window(client, "digits", 1, 5)
    assert window is not None and window.rows[0] >= 1000
    drifted = {f.feature for f in window.features()
               if f.tensor == "pixels" and f.verdict == "drift"}
    assert drifted >= {str(i) for i in SHIFTED}
    keys = client.keys(drift.COUNTS_PREFIX + "*")
    assert keys and all(0 < client.ttl(k) <= drift.COUNTS_TTL_S for k in keys)


def test_observer_samples_every_kth_row_and_skips_failed_jobs(tmp_path: Path) -> None:
    client = fakeredis.FakeRedis()
    observer = _observer(client, tmp_path, sample=0.25, reference_rows=40)
    _drive(observer, 1, _reference(40, 0), per_batch=40)  # looks for a reference: none
    _drive(observer, 1, _reference(40, 0), per_batch=40)  # the reference: every row
    _drive(observer, 1, _reference(400, 1), per_batch=20)  # every 4th row: 5 a batch
    _drive(observer, 1, _reference(320, 1), per_batch=64)  # at most 8 a batch: every 8th
    observer.batch_done(*_batch(1, _reference(8, 2), fail=0))
    observer.handoff()()  # type: ignore[misc]
    window = drift.read_window(client, "digits", 1, 5)
    assert window is not None
    # 400 / 4, 320 / 8, then rows 0 and 4 of 8 less the failed one
    assert window.rows == [100 + 40 + 1] * 3


def test_observer_publishes_a_profile_file(tmp_path: Path) -> None:
    client = fakeredis.FakeRedis()
    labels = np.random.default_rng(1).integers(0, 10, 300)
    probs = np.full((300, 10), 0.1, np.float32)
    profile = drift.build_profile("digits", 2, [PIXELS], [LABEL, PROBS],
                                  {"pixels": _reference(300, 0), "label": labels,
                                   "probabilities": probs}, "ref.npy (300 rows)")
    path = drift.profile_path(tmp_path, "digits", 2)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(profile.to_json(), indent=1))
    client.set(drift.ref_key("digits", 2), b"an older reference")
    observer = _observer(client, tmp_path)
    _drive(observer, 2, _reference(104, 3))
    assert drift.Profile.loads(client.get(drift.ref_key("digits", 2)) or b"").id == profile.id
    window = drift.read_window(client, "digits", 2, 5)
    assert window is not None and window.rows[0] == 96  # the first batch found the file


def test_observer_reads_profile_file_format_errors_as_a_warning(tmp_path: Path) -> None:
    path = drift.profile_path(tmp_path, "digits", 1)
    path.parent.mkdir(parents=True)
    path.write_text("{}")
    client = fakeredis.FakeRedis()
    observer = _observer(client, tmp_path)
    _drive(observer, 1, _reference(100, 0))
    assert observer.versions[1].status == "new"  # retried later, nothing counted
    assert not client.keys(drift.COUNTS_PREFIX + "*")


def test_exporter_exports_top_features_and_tensor_max(tmp_path: Path) -> None:
    client = fakeredis.FakeRedis()
    observer = _observer(client, tmp_path)
    _drive(observer, 1, _reference(500, 0))
    shifted = _reference(1000, 2)
    shifted[:, SHIFTED] += 1.0
    _drive(observer, 1, shifted)
    exporter = QueueExporter(client)
    exporter.sample()
    families = {f.name: f for f in exporter.collect()}
    psi = families["inferq_drift_psi"].samples
    assert {s.labels["tensor"] for s in psi} == {"pixels", "label", "probabilities"}
    pixels = [s for s in psi if s.labels["tensor"] == "pixels"]
    assert len(pixels) == 10  # the top ten of 64
    assert {s.labels["feature"] for s in pixels[:3]} == {str(i) for i in SHIFTED}
    top = {s.labels["tensor"]: s for s in families["inferq_drift_psi_max"].samples}
    assert top["pixels"].value > drift.DRIFT_PSI and top["pixels"].labels["role"] == "input"
    assert top["label"].labels == {"model": "digits", "version": "1", "tensor": "label",
                                   "role": "output"}


def test_a_profile_that_does_not_fit_turns_drift_off_for_that_version_only(
        tmp_path: Path) -> None:
    client = fakeredis.FakeRedis()
    wrong = drift.build_profile("digits", 1, [TensorSpec("pixels", "float32", (-1, 100))], [],
                                {"pixels": _reference(300, 0).repeat(2, axis=1)[:, :100]},
                                "wrong width")
    client.set(drift.ref_key("digits", 1), wrong.dumps())
    observer = _observer(client, tmp_path)
    _drive(observer, 1, _reference(40, 1))  # binning 64 values by 100 features' edges fails
    _drive(observer, 2, _reference(600, 2))  # another version is not affected
    assert observer.versions[1].status == "off"
    assert observer.versions[2].status == "ready"


def test_settings() -> None:
    from workers.errors import SettingsError
    from workers.settings import Settings

    default = Settings.from_env({})
    assert default.drift and default.drift_sample == 0.1
    assert default.drift_reference_rows == 5000 and default.drift_flush_s == 5.0
    assert not Settings.from_env({"INFERQ_DRIFT": "0"}).drift
    assert Settings.from_env({"INFERQ_DRIFT_SAMPLE": "1"}).drift_sample == 1.0
    for env in ({"INFERQ_DRIFT_SAMPLE": "0"}, {"INFERQ_DRIFT_SAMPLE": "1.5"},
                {"INFERQ_DRIFT_REFERENCE_ROWS": "0"}, {"INFERQ_DRIFT_FLUSH": "0"}):
        with pytest.raises(SettingsError):
            Settings.from_env(env)
