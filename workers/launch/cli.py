"""The ``inferq`` command: parse, build settings, make one library call."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
import numpy as np

from producer import InferenceClient, JobFailed, JobResult, JobTimeout
from producer.errors import InferqError


@click.group()
def main() -> None:
    """inferq: batching ONNX inference workers on a Celery + Redis queue."""


# --- services ------------------------------------------------------------------------


@main.command()
@click.option("--gpus", default=None, help="'all' or indices like 0,1: one worker per GPU.")
@click.option("--cpu", "cpu", is_flag=True, help="Run on the CPU (the default without GPUs).")
@click.option("--workers", "cpu_workers", default=1, show_default=True,
              help="CPU worker processes (with --cpu).")
def worker(gpus: str | None, cpu: bool, cpu_workers: int) -> None:
    """Start and supervise worker processes until Ctrl-C."""
    from workers.errors import LaunchError
    from workers.launch.launcher import Supervisor, detect_gpus, parse_gpus, plan

    try:
        if cpu and gpus:
            raise LaunchError("--cpu and --gpus exclude each other")
        available = detect_gpus()
        indices = parse_gpus(gpus, available) if gpus else ([] if cpu else available)
    except LaunchError as exc:
        raise click.ClickException(str(exc)) from None
    supervisor = Supervisor(plan(indices or None, cpu_workers))
    supervisor.start()
    sys.exit(supervisor.run())


@main.command()
@click.option("--workers", "cpu_workers", default=1, show_default=True,
              help="CPU worker processes when there is no GPU.")
def up(cpu_workers: int) -> None:
    """Run Redis (if none is configured), the workers and Flower until Ctrl-C."""
    import signal
    import threading

    from workers.errors import LaunchError
    from workers.launch.stack import LocalStack

    stopped = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopped.set())
    try:
        stack = LocalStack(cpu_workers=cpu_workers)
    except LaunchError as exc:
        raise click.ClickException(str(exc)) from None
    with stack:
        click.echo(f"broker  {stack.broker_url}\nflower  {stack.flower_url}\nready; Ctrl-C stops")
        while not stopped.wait(0.5):
            assert stack.supervisor is not None
            stack.supervisor.poll()
    click.echo("stopped")


@main.command()
def demo() -> None:
    """Classify the digits test set through the whole stack and print a summary."""
    from workers.errors import LaunchError
    from workers.launch import demo as demo_module

    try:
        sys.exit(demo_module.run(click.echo))
    except LaunchError as exc:
        raise click.ClickException(str(exc)) from None


@main.command()
@click.option("--models", "names", default="mlp,cnn,digits", show_default=True,
              help="Comma list of models to measure.")
@click.option("--workers", "cpu_workers", default=1, show_default=True,
              help="inferq worker processes (CPU).")
@click.option("--gpus", default=None, help="Run the inferq workers on these GPUs.")
@click.option("--quick", is_flag=True, help="A tenth of the load: a smoke test, not figures.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None,
              help="Write every figure to this JSON file.")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), default=None,
              help="Write a PNG of throughput and latency against offered load.")
@click.option("--sweep", is_flag=True, help="Also drive an open-loop arrival-rate sweep.")
@click.option("--payloads", is_flag=True, help="Also measure 4 KB, 48 KB and 1 MB rows.")
@click.option("--soak", "soak_jobs", default=0, help="Also run this many MLP jobs, tracking RSS.")
def bench(names: str, cpu_workers: int, gpus: str | None, quick: bool, json_path: Path | None,
          plot_path: Path | None, sweep: bool, payloads: bool, soak_jobs: int) -> None:
    """Measure direct ONNX Runtime, naive Celery and inferq in one run."""
    from workers.bench.run import run as run_bench
    from workers.errors import LaunchError
    from workers.launch.launcher import detect_gpus, parse_gpus

    try:
        indices = parse_gpus(gpus, detect_gpus()) if gpus else None
    except LaunchError as exc:
        raise click.ClickException(str(exc)) from None
    run_bench([n for n in names.split(",") if n], workers=cpu_workers, gpus=indices,
              quick=quick, json_path=json_path, plot_path=plot_path, sweep=sweep,
              payloads=payloads, soak_jobs=soak_jobs, say=click.echo)


@main.command()
@click.option("--model-dir", type=click.Path(path_type=Path), default=None)
def models(model_dir: Path | None) -> None:
    """List the models in the repository with their versions and signatures."""
    from workers.repository import ManifestError, scan
    from workers.settings import default_model_dir

    try:
        found = scan(model_dir or default_model_dir())
    except ManifestError as exc:
        raise click.ClickException(str(exc)) from None
    for name, m in found.items():
        click.echo(f"{name}  versions {sorted(m.versions)}  max_batch_rows {m.max_batch_rows}  "
                   f"max_wait_ms {m.max_wait_ms}")
        click.echo(f"  {m.description}")
        for kind, specs in (("in ", m.inputs), ("out", m.outputs)):
            for s in specs:
                click.echo(f"  {kind} {s.name}: {s.dtype}{list(s.shape)}")


@main.command()
@click.option("--hostname", default=None,
              help="Worker to check (default: $INFERQ_HOSTNAME, else cpu0@<host>).")
@click.option("--file", "path", type=click.Path(path_type=Path), default=None,
              help="Health file to read instead of the worker's default one.")
def check(hostname: str | None, path: Path | None) -> None:
    """Exit 0 only when this host's worker has its models loaded, warm and is consuming."""
    import os
    import socket

    from workers.ops.health import check as check_health
    from workers.ops.health import health_file

    name = hostname or os.environ.get("INFERQ_HOSTNAME") or f"cpu0@{socket.gethostname()}"
    ok, reason = check_health(path or health_file(name))
    click.echo(reason)
    sys.exit(0 if ok else 1)


@main.command()
@click.option("--port", default=9460, show_default=True)
@click.option("--interval", "interval_s", default=5.0, show_default=True)
@click.option("--model", "models", multiple=True, help="Also report this model's queue.")
def exporter(port: int, interval_s: float, models: tuple[str, ...]) -> None:
    """Queue depth, oldest age, consumers per model and dead letters, for Prometheus."""
    import signal
    import threading

    from producer.wire.connect import broker_url
    from workers.ops.exporter import run_exporter

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # PID 1 in a container ignores SIGTERM
        signal.signal(sig, lambda *_: stop.set())
    run_exporter(broker_url(), port, interval_s,
                 models=models, stop=stop)


@main.group()
def dlq() -> None:
    """Read and work the dead-letter list (poisoned jobs, unreadable messages)."""


def _dlq_client() -> Any:
    from producer.wire.connect import broker_url, connect

    return connect(broker_url(), timeout=5)


def _dlq_results() -> Any:
    """The result Redis when it is not the broker (where requeue clears a POISONED result)."""
    from producer.wire.connect import broker_url, connect, result_url

    return connect(result_url(), timeout=5) if result_url() != broker_url() else None


@dlq.command("list")
@click.option("--limit", default=100, show_default=True, help="Newest entries to show (0: all).")
def dlq_list(limit: int) -> None:
    """One line per entry: id, kind, model, code, age, reason."""
    import time

    from workers.ops import deadletter

    for e in deadletter.entries(_dlq_client(), limit):
        age = time.time() - float(e.get("at", 0))
        click.echo(f"{e['id']}  {e['kind']}  {e.get('model') or e.get('queue')}  {e['code']}  "
                   f"{age:,.0f}s ago  {e['reason']}")


@dlq.command("show")
@click.argument("entry_id")
def dlq_show(entry_id: str) -> None:
    """Print one entry as JSON."""
    from workers.ops import deadletter

    doc = deadletter.show(_dlq_client(), entry_id)
    if doc is None:
        raise click.ClickException(f"no dead-letter entry {entry_id}")
    click.echo(json.dumps(doc, indent=2))


@dlq.command("requeue")
@click.argument("entry_ids", nargs=-1)
@click.option("--all", "everything", is_flag=True, help="Requeue every entry.")
def dlq_requeue(entry_ids: tuple[str, ...], everything: bool) -> None:
    """Put entries back on their queues (a requeued job gets a fresh result)."""
    from workers.ops import deadletter

    client = _dlq_client()
    ids = [e["id"] for e in deadletter.entries(client, 0)] if everything else list(entry_ids)
    if not ids:
        raise click.ClickException("name entries to requeue, or pass --all")
    results = _dlq_results()
    missing = [i for i in ids if not deadletter.requeue(client, i, results)]
    click.echo(f"requeued {len(ids) - len(missing)}")
    if missing:
        raise click.ClickException(f"not in the dead-letter list: {', '.join(missing)}")


@dlq.command("purge")
@click.option("--yes", is_flag=True, help="Do not ask.")
def dlq_purge(yes: bool) -> None:
    """Delete every entry."""
    from workers.ops import deadletter

    if not yes:
        click.confirm("Delete every dead-letter entry?", abort=True)
    click.echo(f"purged {deadletter.purge(_dlq_client())}")


# --- jobs ------------------------------------------------------------------------------


def _result_json(result: JobResult) -> dict[str, Any]:
    return {
        "id": result.id, "status": "SUCCESS", "model": result.model, "version": result.version,
        "worker": result.worker, "batch_size": result.batch_size,
        "timings_ms": result.timings_ms,
        "outputs": {k: v.tolist() for k, v in result.outputs.items()},
    }


def _load_inputs(client: InferenceClient, model: str, paths: tuple[str, ...]) -> dict[str, Any]:
    named: dict[str, str] = {}
    for item in paths:
        name, sep, path = item.partition("=")
        named[name if sep else ""] = path if sep else item
    info = client.models().get(model)
    inputs: dict[str, Any] = {}
    for name, path in named.items():
        if path.endswith(".json"):
            doc = json.loads(Path(path).read_text())
            if not isinstance(doc, dict):
                raise click.ClickException(f"{path}: expected an object of input name -> array")
            inputs.update(doc)
        else:
            if not name:
                if info is None or len(info.inputs) != 1:
                    raise click.ClickException("name the input: --input NAME=file.npy")
                name = info.inputs[0].name
            inputs[name] = np.load(path, allow_pickle=False)
    if info is not None:  # JSON numbers carry no dtype: take the model's.
        for spec in info.inputs:
            if spec.name in inputs and not isinstance(inputs[spec.name], np.ndarray):
                inputs[spec.name] = np.asarray(inputs[spec.name], dtype=spec.dtype)
    return inputs


@main.command()
@click.argument("model")
@click.option("--input", "inputs", multiple=True, required=True,
              help="x.npy, NAME=x.npy, or x.json mapping input names to arrays.")
@click.option("--version", type=int, default=None, help="Pin a model version.")
@click.option("--wait/--no-wait", default=False, help="Wait for and print the result.")
@click.option("--timeout", default=60.0, show_default=True, help="Seconds to wait.")
def submit(model: str, inputs: tuple[str, ...], version: int | None, wait: bool,
           timeout: float) -> None:
    """Submit one job; print its ID (or, with --wait, its result as JSON)."""
    try:
        with InferenceClient() as client:
            handle = client.submit(model, _load_inputs(client, model, inputs), version=version)
            if not wait:
                click.echo(handle.id)
                return
            click.echo(json.dumps(_result_json(handle.result(timeout=timeout))))
    except JobFailed as exc:
        click.echo(json.dumps({"id": exc.job_id, "status": "FAILURE", "code": exc.code,
                               "message": exc.message}))
        sys.exit(1)
    except InferqError as exc:
        raise click.ClickException(str(exc)) from None


@main.command()
@click.argument("job_id")
@click.option("--timeout", default=0.0, show_default=True,
              help="Seconds to wait for a pending job (0: answer at once).")
def result(job_id: str, timeout: float) -> None:
    """Print a job's result as JSON; exit 1 on FAILURE, 2 while PENDING."""
    with InferenceClient() as client:
        try:
            click.echo(json.dumps(_result_json(client.results([job_id], timeout=timeout)[0])))
        except JobFailed as exc:
            click.echo(json.dumps({"id": job_id, "status": "FAILURE", "code": exc.code,
                                   "message": exc.message}))
            sys.exit(1)
        except JobTimeout:
            click.echo(json.dumps({"id": job_id, "status": "PENDING"}))
            sys.exit(2)
        except InferqError as exc:
            raise click.ClickException(str(exc)) from None


if __name__ == "__main__":
    main()
