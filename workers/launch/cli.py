"""The ``inferq`` command: parse, build settings, make one library call."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from producer import InferenceClient, JobFailed, JobResult, JobTimeout
from producer.errors import InferqError, Unavailable, UnknownJob
from workers.launch.inputs import load_inputs


def explain(exc: Exception) -> str:
    """One or two lines for an expected failure: what went wrong, and what to do."""
    import redis

    from producer.wire.connect import broker_url, masked, result_url
    from workers.errors import ManifestError, WorkerError

    cause = exc.__cause__ if isinstance(exc, Unavailable) and exc.__cause__ else exc
    if isinstance(cause, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
        broker, results = broker_url(), result_url()
        where = f"INFERQ_BROKER_URL={masked(broker)}"
        if results != broker:
            where += f" or INFERQ_RESULT_URL={masked(results)}"
        if isinstance(cause, redis.exceptions.AuthenticationError):
            return f"Redis refused the credentials in {where}: {cause}"
        return (f"cannot reach Redis at {where} ({cause})\n"
                "Start Redis there, or set INFERQ_BROKER_URL to one that runs "
                "(unset, `inferq up` starts a private one).")
    if isinstance(exc, redis.exceptions.RedisError):
        return f"Redis at INFERQ_BROKER_URL={masked(broker_url())} answered: {exc}"
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror or exc}"
    if isinstance(exc, ManifestError):
        return (f"model repository: {exc}\n"
                "Fix the manifest, or point INFERQ_MODEL_DIR at another repository.")
    if isinstance(exc, WorkerError | InferqError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}\n(unexpected: `inferq --debug ...` shows the traceback)"


class InferqGroup(click.Group):
    """The ``inferq`` group: any command's failure ends in one or two lines on stderr and a
    non-zero exit, never a traceback (unless ``--debug``)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as exc:
            if ctx.params.get("debug"):
                raise
            raise click.ClickException(explain(exc)) from None


@click.group(cls=InferqGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="inferq", prog_name="inferq",
                      message="%(prog)s %(version)s")
@click.option("--debug", is_flag=True, envvar="INFERQ_DEBUG",
              help="Show the full traceback of a failure instead of one line (or "
                   "INFERQ_DEBUG=1).")
def main(debug: bool) -> None:
    """inferq: batching ONNX inference workers on a Celery + Redis queue."""


def _gpu_indices(gpus: str | None, cpu: bool) -> list[int]:
    """``--gpus`` / ``--cpu`` -> the GPUs to use; [] for the CPU (the default without GPUs)."""
    from workers.errors import LaunchError
    from workers.launch.launcher import detect_gpus, parse_gpus

    if cpu and gpus:
        raise LaunchError("--cpu and --gpus exclude each other")
    if cpu:
        return []
    return parse_gpus(gpus, detect_gpus()) if gpus else detect_gpus()


# --- services ------------------------------------------------------------------------


@main.command()
@click.option("--gpus", default=None, help="'all' or indices like 0,1: one worker per GPU.")
@click.option("--cpu", "cpu", is_flag=True, help="Run on the CPU (the default without GPUs).")
@click.option("--workers", "cpu_workers", default=1, show_default=True,
              help="CPU worker processes (with --cpu).")
def worker(gpus: str | None, cpu: bool, cpu_workers: int) -> None:
    """Start and supervise worker processes until Ctrl-C."""
    from producer.wire.connect import broker_url, masked
    from workers.launch.launcher import Supervisor, check_repository, plan
    from workers.launch.stack import answers

    indices = _gpu_indices(gpus, cpu)
    check_repository()
    if not answers(broker_url(), timeout=2.0):
        # Not fatal: a worker waits for its Redis (one started alongside may come up later).
        click.echo(f"warning: no Redis answers at INFERQ_BROKER_URL={masked(broker_url())} "
                   "yet; the workers keep trying to connect", err=True)
    supervisor = Supervisor(plan(indices or None, cpu_workers))
    supervisor.start()
    sys.exit(supervisor.run())


@main.command()
@click.option("--gpus", default=None,
              help="'all' or indices like 0,1: one worker per GPU (default: every GPU found).")
@click.option("--cpu", "cpu", is_flag=True, help="Run the workers on the CPU even on a GPU host.")
@click.option("--workers", "cpu_workers", default=1, show_default=True,
              help="CPU worker processes when there is no GPU (or with --cpu).")
@click.option("--flower-port", type=click.IntRange(0, 65535), default=None,
              help="Flower's port (default 5555, or a free one when 5555 is taken; 0: any "
                   "free port).")
def up(gpus: str | None, cpu: bool, cpu_workers: int, flower_port: int | None) -> None:
    """Run Redis (if none is configured), the workers and Flower until Ctrl-C."""
    from producer.wire.connect import masked
    from workers.launch.stack import LocalStack

    stack = LocalStack(gpus=_gpu_indices(gpus, cpu), cpu_workers=cpu_workers,
                       flower_port=flower_port)
    with stack:
        # Announced only once Ctrl-C is caught: a Ctrl-C right after "ready" stops cleanly.
        stack.run_until_stopped(lambda: click.echo(
            f"broker  {masked(stack.broker_url)}\nflower  {stack.flower_url}\n"
            "ready; Ctrl-C stops"))
    click.echo("stopped")


@main.command()
@click.option("--keep", is_flag=True,
              help="After the summary, keep the stack up, with Flower, until Ctrl-C.")
@click.option("--log", "log_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="File the workers log to (default: a new one in the temporary directory).")
def demo(keep: bool, log_path: Path | None) -> None:
    """Classify the digits test set through the whole stack and print a summary."""
    from workers.launch import demo as demo_module

    sys.exit(demo_module.run(click.echo, keep=keep, log_path=log_path))


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
@click.option("--batch", "batch_rows", type=int, default=None, is_flag=False, flag_value=1_000_000,
              help="Also score a Parquet file of this many MLP rows with inferq batch "
                   "(--batch alone: 1,000,000).")
@click.option("--gateway", is_flag=True,
              help="Also measure the HTTP gateway and the asyncio client (mlp).")
@click.option("--shadow", is_flag=True,
              help="Also measure mlp with a 10% shadow version against none.")
@click.option("--drift", is_flag=True,
              help="Also measure mlp and cnn with drift histograms on against off.")
@click.option("--isolate", is_flag=True,
              help="Also measure each model's worker on core(s) of its own (the producer and "
                   "Redis on the others) against ONNX Runtime alone on those core(s); "
                   "with --batch, the batch phase too.")
@click.option("--profile", "profile_s", type=float, default=0.0,
              help="With --isolate: profile the worker for this many seconds (py-spy) and "
                   "report its CPU per job by stage.")
def bench(names: str, cpu_workers: int, gpus: str | None, quick: bool, json_path: Path | None,
          plot_path: Path | None, sweep: bool, payloads: bool, soak_jobs: int,
          batch_rows: int | None, gateway: bool, isolate: bool, profile_s: float,
          shadow: bool, drift: bool) -> None:
    """Measure direct ONNX Runtime, naive Celery and inferq in one run."""
    from workers.bench.run import run as run_bench
    from workers.launch.launcher import detect_gpus, parse_gpus

    indices = parse_gpus(gpus, detect_gpus()) if gpus else None
    run_bench([n for n in names.split(",") if n], workers=cpu_workers, gpus=indices,
              quick=quick, json_path=json_path, plot_path=plot_path, sweep=sweep,
              payloads=payloads, soak_jobs=soak_jobs, batch_rows=batch_rows or 0,
              gateway=gateway, isolate=isolate, profile_s=profile_s, shadow=shadow,
              drift=drift, say=click.echo)


from workers.batch.cli import batch as batch_group  # noqa: E402  (inferq batch ...)
from workers.gateway.cli import gateway as gateway_group  # noqa: E402  (HTTP API)
from workers.launch.models_cli import models as models_group  # noqa: E402  (its commands)
from workers.launch.routes_cli import COMMANDS as ROUTE_COMMANDS  # noqa: E402
from workers.launch.shadow_cli import COMMANDS as SHADOW_COMMANDS  # noqa: E402

main.add_command(models_group)
main.add_command(batch_group)
main.add_command(gateway_group)
for _command in ROUTE_COMMANDS:
    main.add_command(_command)
for _command in SHADOW_COMMANDS:
    main.add_command(_command)

from workers.launch.drift_cli import drift_command  # noqa: E402  (inferq drift)

main.add_command(drift_command)


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
@click.option("--port", default=9460, show_default=True,
              help="Port to serve /metrics on (all interfaces).")
@click.option("--interval", "interval_s", default=5.0, show_default=True,
              help="Seconds between two reads of the queues from Redis.")
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
        "route": result.route, "worker": result.worker, "batch_size": result.batch_size,
        "timings_ms": result.timings_ms,
        "outputs": {k: v.tolist() for k, v in result.outputs.items()},
    }


def _print_outcome(job_id: str, read: Any) -> None:
    """Print what ``read()`` returns as JSON; exit 1 when the job failed, 2 while pending."""
    try:
        result = read()
    except UnknownJob as exc:
        click.echo(json.dumps({"id": job_id, "status": "UNKNOWN", "message": exc.message}))
        sys.exit(3)
    except JobFailed as exc:
        if exc.job_id is None:  # refused (Redis unreachable ...): not a failure of the job
            raise
        click.echo(json.dumps({"id": job_id, "status": "FAILURE", "code": exc.code,
                               "message": exc.message}))
        sys.exit(1)
    except JobTimeout:
        click.echo(json.dumps({"id": job_id, "status": "PENDING"}))
        sys.exit(2)
    click.echo(json.dumps(_result_json(result)))


@main.command()
@click.argument("model")
@click.option("--input", "inputs", multiple=True, required=True,
              help="x.npy (the model's only input), NAME=x.npy, or x.json mapping input names "
                   "to arrays; repeat for several. Values are cast to the model's dtype when "
                   "none changes but for float rounding (float64 -> float32 is what a float32 "
                   "model computes with); other mismatches are refused.")
@click.option("--version", default=None,
              help="A version number, an alias (inferq alias), or latest; default: the "
                   "model's route (inferq route).")
@click.option("--route-key", default=None,
              help="Under a split, the same key always gets the same version.")
@click.option("--wait/--no-wait", default=False,
              help="Wait for and print the result (exit 1 on FAILURE, 2 if still pending).")
@click.option("--timeout", default=60.0, show_default=True, help="Seconds to wait.")
def submit(model: str, inputs: tuple[str, ...], version: str | None, route_key: str | None,
           wait: bool, timeout: float) -> None:
    """Submit one job; print its ID (or, with --wait, its result as JSON)."""
    number = int(version) if version is not None and version.isdigit() else None
    with InferenceClient() as client:
        handle = client.submit(model, load_inputs(client, model, number, inputs),
                               version=number if number is not None else version,
                               route_key=route_key)
        if not wait:
            click.echo(handle.id)
            return
        _print_outcome(handle.id, lambda: handle.result(timeout=timeout))


@main.command()
@click.argument("job_id")
@click.option("--timeout", default=0.0, show_default=True,
              help="Seconds to wait for a pending job (0: answer at once).")
def result(job_id: str, timeout: float) -> None:
    """Print a job's result as JSON; exit 1 on FAILURE (3 for an unknown job ID), 2 while
    PENDING."""
    with InferenceClient() as client:
        _print_outcome(job_id, lambda: client.results([job_id], timeout=timeout)[0])


if __name__ == "__main__":
    main()
