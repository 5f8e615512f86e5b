"""Worker settings from the environment, and the launcher's process plan."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar

import pytest

from producer.wire import CONTROL_QUEUE, DEFAULT_URL
from workers.errors import SettingsError
from workers.launch import launcher
from workers.launch.launcher import LaunchError, Supervisor, WorkerSpec, parse_gpus, plan
from workers.settings import Settings, default_model_dir, usable_cores

# --- settings --------------------------------------------------------------------------------


def test_from_env_defaults() -> None:
    s = Settings.from_env({})
    assert s.broker_url == DEFAULT_URL == "redis://localhost:6379/0"
    assert s.result_url == s.broker_url
    assert s.model_dir == default_model_dir()
    assert s.models == ()
    assert s.device == "cpu"
    assert s.intra_op_threads == 0
    assert s.result_ttl_s == 3600
    assert s.visibility_timeout_s == 300
    assert s.restore_interval_s == 5.0
    assert s.max_tensor_bytes == 64 * 1024 * 1024
    assert s.task_events is True
    assert s.hostname == f"cpu@{socket.gethostname()}"


@pytest.mark.parametrize(
    ("env", "instances", "threads"),
    [
        # The launcher's per-instance count, split between a model's own instances.
        ({"INFERQ_INTRA_OP_THREADS": "2"}, 1, 2),
        ({"INFERQ_INTRA_OP_THREADS": "2"}, 2, 1),
        ({"INFERQ_INTRA_OP_THREADS": "2"}, 3, 1),
        ({"INFERQ_INTRA_OP_THREADS": "1", "INFERQ_INSTANCES": "4"}, 2, 2),
        ({"INFERQ_INTRA_OP_THREADS": "8"}, 4, 2),
        # Unset: ONNX Runtime decides for the default; a split uses every core.
        ({}, 1, 0),
    ],
)
def test_session_threads_split_the_process_threads(
    env: dict[str, str], instances: int, threads: int
) -> None:
    assert Settings.from_env(env).session_threads(instances) == threads


def test_session_threads_without_a_count_split_the_cores(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("workers.settings.usable_cores", lambda: 6)
    assert Settings.from_env({}).session_threads(2) == 3
    assert Settings.from_env({}).session_threads(12) == 1


@pytest.mark.parametrize(
    ("affinity", "cpu_max", "cores"),
    [
        # The affinity mask, not the host's core count, bounds the threads...
        ({0, 1, 2, 3}, None, 4),
        ({2}, None, 1),
        # ...and the container's quota caps it, rounded up (1.5 CPUs: 2 threads).
        ({0, 1, 2, 3}, "150000 100000", 2),
        ({0, 1, 2, 3}, "50000 100000", 1),
        ({0, 1}, "800000 100000", 2),
        ({0, 1, 2, 3}, "max 100000", 4),
        ({0, 1, 2, 3}, "garbage", 4),
    ],
)
def test_usable_cores_follow_affinity_and_the_cgroup_quota(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, affinity: set[int], cpu_max: str | None,
    cores: int,
) -> None:
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: affinity)
    path = tmp_path / "cpu.max"
    if cpu_max is not None:
        path.write_text(cpu_max + "\n")
    assert usable_cores(path) == cores


def test_the_launcher_splits_the_usable_cores_between_cpu_workers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("workers.launch.launcher.usable_cores", lambda: 4)
    specs = plan(None, 2, host="h", base_env={})
    assert [s.env["INFERQ_INTRA_OP_THREADS"] for s in specs] == ["2", "2"]


def test_default_model_dir_is_the_shipped_repository() -> None:
    assert default_model_dir() == Path(__file__).resolve().parents[2] / "models"


def test_from_env_parses_everything(tmp_path: Path) -> None:
    s = Settings.from_env({
        "INFERQ_BROKER_URL": "redis://broker:6380/1",
        "INFERQ_RESULT_URL": "rediss://results:6390/2",
        "INFERQ_MODEL_DIR": str(tmp_path),
        "INFERQ_MODELS": "digits,other,",
        "INFERQ_DEVICE": "cuda",
        "INFERQ_INTRA_OP_THREADS": "4",
        "INFERQ_RESULT_TTL": "60",
        "INFERQ_VISIBILITY_TIMEOUT": "120.0",
        "INFERQ_RESTORE_INTERVAL": "0.5",
        "INFERQ_MAX_TENSOR_BYTES": "1024",
        "INFERQ_TASK_EVENTS": "0",
        "INFERQ_HOSTNAME": "gpu3@box",
        "INFERQ_BATCH_TIME_LIMIT": "30",
        "INFERQ_NONFINITE": "allow",
        "INFERQ_MAX_EXECUTIONS": "5",
        "INFERQ_MAX_JOBS_PER_PROCESS": "1000",
        "INFERQ_PROFILE": "production",
        "INFERQ_BACKGROUND_RUN_MS": "2",
    })
    assert s.broker_url == "redis://broker:6380/1"
    assert s.result_url == "rediss://results:6390/2"
    assert s.model_dir == tmp_path
    assert s.models == ("digits", "other")
    assert s.device == "cuda"
    assert s.intra_op_threads == 4
    assert s.result_ttl_s == 60
    assert s.visibility_timeout_s == 120
    assert s.restore_interval_s == 0.5
    assert s.max_tensor_bytes == 1024
    assert s.task_events is False
    assert s.hostname == "gpu3@box"
    assert s.batch_time_limit_s == 30 and s.reject_nonfinite is False
    assert s.max_executions == 5 and s.max_jobs_per_process == 1000
    assert s.profile == "production"
    assert s.background_run_ms == 2


@pytest.mark.parametrize(("env", "match"), [
    ({"INFERQ_VISIBILITY_TIMEOUT": "10", "INFERQ_BATCH_TIME_LIMIT": "5"}, "at least 3x"),
    ({"INFERQ_BROKER_URL": "rediss://h:6379/0?ssl_cert_reqs=none"}, "verify certificates"),
    ({"INFERQ_RESULT_URL": "rediss://h/0?ssl_cert_reqs=optional"}, "verify certificates"),
    ({"INFERQ_NONFINITE": "maybe"}, "INFERQ_NONFINITE"),
    ({"INFERQ_PROFILE": "prod"}, "INFERQ_PROFILE"),
    ({"INFERQ_MAX_EXECUTIONS": "0"}, "MAX_EXECUTIONS"),
])
def test_contradictory_or_unsafe_settings_are_refused(env: dict[str, str], match: str) -> None:
    with pytest.raises(SettingsError, match=match):
        Settings.from_env(env)


def test_result_url_follows_broker_url() -> None:
    s = Settings.from_env({"INFERQ_BROKER_URL": "unix:///run/redis.sock"})
    assert s.result_url == "unix:///run/redis.sock"


def test_empty_values_mean_defaults() -> None:
    s = Settings.from_env({"INFERQ_RESULT_TTL": "", "INFERQ_BROKER_URL": "", "INFERQ_MODELS": ""})
    assert (s.result_ttl_s, s.broker_url, s.models) == (3600, DEFAULT_URL, ())


@pytest.mark.parametrize(
    ("value", "enabled"),
    [("0", False), ("false", False), ("no", False), ("1", True), ("yes", True)],
)
def test_task_events_flag(value: str, enabled: bool) -> None:
    assert Settings.from_env({"INFERQ_TASK_EVENTS": value}).task_events is enabled


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({"INFERQ_DEVICE": "gpu"}, "INFERQ_DEVICE must be cpu or cuda, got 'gpu'"),
        ({"INFERQ_DEVICE": "CUDA"}, "INFERQ_DEVICE must be cpu or cuda"),
        ({"INFERQ_DEVICE": ""}, "INFERQ_DEVICE must be cpu or cuda"),
        ({"INFERQ_RESULT_TTL": "an hour"}, "INFERQ_RESULT_TTL must be a number, got 'an hour'"),
        ({"INFERQ_INTRA_OP_THREADS": "many"}, "INFERQ_INTRA_OP_THREADS must be a number"),
        ({"INFERQ_VISIBILITY_TIMEOUT": "5m"}, "INFERQ_VISIBILITY_TIMEOUT must be a number"),
        ({"INFERQ_RESTORE_INTERVAL": "x"}, "INFERQ_RESTORE_INTERVAL must be a number"),
        ({"INFERQ_MAX_TENSOR_BYTES": "64MB"}, "INFERQ_MAX_TENSOR_BYTES must be a number"),
        ({"INFERQ_RESULT_TTL": "0"}, "INFERQ_RESULT_TTL must be > 0"),
        ({"INFERQ_RESULT_TTL": "-5"}, "INFERQ_RESULT_TTL must be > 0"),
        ({"INFERQ_RESULT_TTL": "0.5"}, "INFERQ_RESULT_TTL must be > 0"),  # whole seconds
        ({"INFERQ_VISIBILITY_TIMEOUT": "0"}, "must be > 0"),
        ({"INFERQ_RESTORE_INTERVAL": "-1"}, "must be > 0"),
        ({"INFERQ_MAX_TENSOR_BYTES": "0"}, "INFERQ_MAX_TENSOR_BYTES must be > 0"),
        ({"INFERQ_BACKGROUND_RUN_MS": "0"}, "INFERQ_BACKGROUND_RUN_MS must be > 0"),
        ({"INFERQ_BROKER_URL": "amqp://guest@rabbit//"}, "only Redis URLs are supported"),
        ({"INFERQ_RESULT_URL": "memory://"}, "only Redis URLs are supported, got 'memory://'"),
        ({"INFERQ_BROKER_URL": "localhost:6379"}, "only Redis URLs are supported"),
    ],
)
def test_from_env_rejects(env: dict[str, str], match: str) -> None:
    with pytest.raises(SettingsError, match=match):
        Settings.from_env(env)


def test_settings_error_is_a_value_error() -> None:
    assert issubclass(SettingsError, ValueError)


# Malformed settings and device listings.


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_non_finite_ttl_is_a_settings_error(value: str) -> None:
    with pytest.raises(SettingsError):
        Settings.from_env({"INFERQ_RESULT_TTL": value})


def test_nan_restore_interval_is_a_settings_error() -> None:
    with pytest.raises(SettingsError):
        Settings.from_env({"INFERQ_RESTORE_INTERVAL": "nan"})


def test_models_list_is_stripped() -> None:
    assert Settings.from_env({"INFERQ_MODELS": "digits, other"}).models == ("digits", "other")


# --- launcher ------------------------------------------------------------------------------


def _after(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def test_gpu_plan() -> None:
    base = {"PATH": "/usr/bin", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}
    specs = plan([0, 2], host="h", base_env=base)
    assert [s.hostname for s in specs] == ["gpu0@h", "gpu2@h"]
    for spec, index in zip(specs, ["0", "2"], strict=True):
        assert spec.env["CUDA_VISIBLE_DEVICES"] == index
        assert spec.env["INFERQ_DEVICE"] == "cuda"
        assert spec.env["INFERQ_HOSTNAME"] == spec.hostname
        assert spec.env["INFERQ_INTRA_OP_THREADS"] == "1"
        assert spec.env["PATH"] == "/usr/bin"
        argv = spec.argv
        assert argv[:3] == [sys.executable, "-m", "celery"]
        assert _after(argv, "-P") == "solo"
        assert _after(argv, "-n") == spec.hostname
        assert _after(argv, "-A") == "workers.app"
        assert _after(argv, "-Q") == CONTROL_QUEUE
        assert "worker" in argv
    assert base == {"PATH": "/usr/bin", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}, "base_env mutated"


def test_gpu_plan_keeps_an_explicit_thread_count() -> None:
    [spec] = plan([1], host="h", base_env={"INFERQ_INTRA_OP_THREADS": "3"})
    assert spec.env["INFERQ_INTRA_OP_THREADS"] == "3"


def test_cpu_plan() -> None:
    specs = plan(None, 2, host="h", base_env={}, cores=4)
    assert [s.hostname for s in specs] == ["cpu0@h", "cpu1@h"]
    for spec in specs:
        assert spec.env["INFERQ_INTRA_OP_THREADS"] == "2"
        assert spec.env["CUDA_VISIBLE_DEVICES"] == ""
        assert spec.env["INFERQ_DEVICE"] == "cpu"
        assert spec.env["INFERQ_HOSTNAME"] == spec.hostname
        assert _after(spec.argv, "-P") == "solo"
        assert _after(spec.argv, "-n") == spec.hostname


@pytest.mark.parametrize(
    ("workers", "cores", "threads"), [(1, 8, "8"), (3, 8, "2"), (4, 2, "1"), (1, 1, "1")]
)
def test_cpu_plan_threads(workers: int, cores: int, threads: str) -> None:
    specs = plan([], workers, host="h", base_env={}, cores=cores)
    assert len(specs) == workers
    assert {s.env["INFERQ_INTRA_OP_THREADS"] for s in specs} == {threads}


def test_plan_defaults_to_this_host_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERQ_TEST_MARKER", "kept")
    [spec] = plan(None, 1)
    assert spec.hostname == f"cpu0@{socket.gethostname()}"
    assert spec.env["INFERQ_TEST_MARKER"] == "kept"


@pytest.mark.parametrize(
    ("arg", "available", "wanted"),
    [("1", [0, 1], [1]), ("all", [0, 1, 2], [0, 1, 2]), ("2,0", [0, 1, 2], [2, 0]),
     ("0, 1", [0, 1], [0, 1])],
)
def test_parse_gpus(arg: str, available: list[int], wanted: list[int]) -> None:
    assert parse_gpus(arg, available) == wanted


@pytest.mark.parametrize(
    ("arg", "available", "match"),
    [
        ("all", [], "no NVIDIA GPU found"),
        ("0,1", [0], r"GPUs \[1\] not found; this host has \[0\]"),
        ("3", [], r"GPUs \[3\] not found"),
        ("0,0", [0, 1], "give each GPU index once"),
        ("1,0,1", [0, 1], "give each GPU index once"),
        ("", [0], "give each GPU index once"),
        ("gpu0", [0], "takes 'all' or indices"),
        ("0;1", [0, 1], "takes 'all' or indices"),
    ],
)
def test_parse_gpus_rejects(arg: str, available: list[int], match: str) -> None:
    with pytest.raises(LaunchError, match=match):
        parse_gpus(arg, available)


def test_detect_gpus_without_nvidia_smi(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launcher.shutil, "which", lambda name: None)
    assert launcher.detect_gpus() == []


def _fake_smi(monkeypatch: pytest.MonkeyPatch, listing: str) -> list[list[str]]:
    calls: list[list[str]] = []

    def fake_run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        calls.append(argv)
        return subprocess.CompletedProcess(argv, 0, stdout=listing, stderr="")

    monkeypatch.setattr(launcher.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    monkeypatch.setattr(launcher.subprocess, "run", fake_run)
    return calls


def test_detect_gpus_reads_nvidia_smi(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fake_smi(monkeypatch, (
        "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-aaaa)\n"
        "GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-cccc)\n"
    ))
    assert launcher.detect_gpus() == [0, 1]
    assert calls == [["/usr/bin/nvidia-smi", "-L"]]


def test_detect_gpus_with_mig_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_smi(monkeypatch, (
        "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-aaaa)\n"
        "  MIG 1g.10gb     Device  0: (UUID: MIG-bbbb)\n"
        "GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-cccc)\n"
    ))
    assert launcher.detect_gpus() == [0, 1]


def test_detect_gpus_when_nvidia_smi_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        raise subprocess.CalledProcessError(9, argv)

    monkeypatch.setattr(launcher.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    monkeypatch.setattr(launcher.subprocess, "run", failing)
    assert launcher.detect_gpus() == []


# --- supervisor (no real processes: Popen is replaced) --------------------------------------


class FakeProc:
    started: ClassVar[list[str]] = []

    def __init__(self, argv: list[str], *, env: dict[str, str], start_new_session: bool,
                 **streams: Any) -> None:
        assert start_new_session
        self.argv, self.env = argv, env
        self.code: int | None = None
        self.pid = 1000 + len(FakeProc.started)
        FakeProc.started.append(env["INFERQ_HOSTNAME"])

    def poll(self) -> int | None:
        return self.code


def test_supervisor_restarts_a_dead_worker_then_gives_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launcher.subprocess, "Popen", FakeProc)
    monkeypatch.setattr(FakeProc, "started", [])
    specs = [WorkerSpec(h, ["true"], {"INFERQ_HOSTNAME": h}) for h in ("gpu0@h", "gpu1@h")]
    sup = Supervisor(specs, max_restarts=2)
    sup.start()
    assert FakeProc.started == ["gpu0@h", "gpu1@h"]

    sup.poll()  # all alive: nothing happens
    assert FakeProc.started == ["gpu0@h", "gpu1@h"]

    for _ in range(2):
        sup.procs["gpu1@h"].code = 1  # type: ignore[attr-defined]
        sup.poll()
    assert FakeProc.started == ["gpu0@h", "gpu1@h", "gpu1@h", "gpu1@h"]

    sup.procs["gpu1@h"].code = 1  # type: ignore[attr-defined]
    with pytest.raises(LaunchError, match=r"worker gpu1@h exited 2 times in 60 s"):
        sup.poll()


# --- workers die with their supervisor -------------------------------------------------------

_linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux's")
#: Prints the calling process's parent-death signal (prctl PR_GET_PDEATHSIG).
_PDEATHSIG_PROBE = ("import ctypes; v = ctypes.c_int(); "
                    "ctypes.CDLL(None).prctl(2, ctypes.byref(v), 0, 0, 0); print(v.value)")


@_linux_only
def test_a_worker_gets_sigterm_when_its_supervisor_dies() -> None:
    import signal

    out = subprocess.run([sys.executable, "-c", _PDEATHSIG_PROBE], capture_output=True,
                         text=True, timeout=30, preexec_fn=launcher.die_with_parent())
    assert out.stdout.strip() == str(int(signal.SIGTERM)), out.stderr


@_linux_only
def test_a_worker_whose_supervisor_died_before_it_started_does_not_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    preexec = launcher.die_with_parent()
    monkeypatch.setattr(launcher.os, "getppid", lambda: 1)  # as the forked child sees it
    out = subprocess.run([sys.executable, "-c", "print('started')"], capture_output=True,
                         text=True, timeout=30, preexec_fn=preexec)
    assert (out.returncode, out.stdout) == (1, "")


def test_only_the_main_thread_spawns_workers_that_die_with_it() -> None:
    import threading

    # PDEATHSIG fires when the forking *thread* exits: from another one, not set at all.
    found: list[object] = []
    thread = threading.Thread(target=lambda: found.append(launcher.die_with_parent()))
    thread.start()
    thread.join()
    assert found == [None]


@_linux_only
def test_supervisor_spawns_each_worker_to_die_with_it(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[dict[str, Any]] = []

    class Recording:
        def __init__(self, argv: list[str], **kwargs: Any) -> None:
            seen.append(kwargs)
            self.pid = 1

    monkeypatch.setattr(launcher.subprocess, "Popen", Recording)
    Supervisor([WorkerSpec("cpu0@h", ["true"], {})]).start()
    assert seen[0]["start_new_session"] and callable(seen[0]["preexec_fn"])


def test_check_repository_refuses_a_broken_manifest(tmp_path: Path) -> None:
    from workers.errors import ManifestError

    (tmp_path / "digits").mkdir()
    (tmp_path / "digits" / "model.toml").write_text("max_batch_rows = \n")
    with pytest.raises(ManifestError, match=r"model\.toml"):
        launcher.check_repository({"INFERQ_MODEL_DIR": str(tmp_path)})
    launcher.check_repository({})  # the shipped repository
    with pytest.raises(SettingsError, match="INFERQ_RESULT_TTL"):
        launcher.check_repository({"INFERQ_RESULT_TTL": "0"})
