"""``inferq models``: list, add, remove and check the models of a repository.

Every command works on ``--model-dir``, else ``$INFERQ_MODEL_DIR``, else the source tree's
``models/``; ``check`` runs exactly the worker's load path for each model version.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from workers.errors import WorkerError

if TYPE_CHECKING:
    from workers.settings import Settings

_MODEL_DIR = click.option(
    "--model-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
    help="Model repository (default: $INFERQ_MODEL_DIR, else models/ of the source tree).")


def _settings() -> Settings:
    from workers.settings import Settings

    try:
        return Settings.from_env()
    except WorkerError as exc:
        raise click.ClickException(str(exc)) from None


def _root(model_dir: Path | None) -> Path:
    # --model-dir of the command, else of `inferq models` (before the subcommand), else the
    # settings' (INFERQ_MODEL_DIR, else models/ of the source tree).
    ctx: click.Context | None = click.get_current_context()
    while model_dir is None and ctx is not None:
        model_dir = ctx.params.get("model_dir")
        ctx = ctx.parent
    if model_dir is not None:
        return model_dir
    root: Path = _settings().model_dir
    return root


def _scan(root: Path) -> tuple[dict[str, Any], dict[str, str]]:
    from workers.repository.manifest import scan_all

    try:
        return scan_all(root)
    except WorkerError as exc:
        raise click.ClickException(str(exc)) from None


def _announce(model: str | None) -> bool:
    """Tell running workers that ``model`` (None: any model) changed in the repository, so
    they load or unload versions now; they rescan every ``INFERQ_RESCAN_S`` regardless."""
    from producer.wire.connect import broker_url, connect, masked
    from producer.wire.names import MODELS_CHANNEL

    url = broker_url()
    try:
        heard = connect(url, timeout=3, connect_timeout=3, retries=0).publish(
            MODELS_CHANNEL, model or "")
    except Exception as exc:  # no Redis here, refused, bad URL: the change is on disk
        click.echo(f"  workers not told ({masked(url)}: {exc}); they notice within "
                   "INFERQ_RESCAN_S (default 30 s)", err=True)
        return False
    click.echo(f"  told {heard} running worker(s) at {masked(url)}")
    return True


@click.group(invoke_without_command=True)
@_MODEL_DIR
@click.pass_context
def models(ctx: click.Context, model_dir: Path | None) -> None:
    """List the models in the repository with their versions and signatures.

    Exits 1 when a manifest cannot be read.
    """
    if ctx.invoked_subcommand is not None:
        return
    root = _root(model_dir)
    found, failed = _scan(root)
    for name, m in found.items():
        click.echo(f"{name}  versions {sorted(m.versions)}  max_batch_rows {m.max_batch_rows}  "
                   f"max_wait_ms {m.max_wait_ms}")
        click.echo(f"  {m.description}")
        for kind, specs in (("in ", m.inputs), ("out", m.outputs)):
            for s in specs:
                click.echo(f"  {kind} {s.name}: {s.dtype}{list(s.shape)}")
    for name, reason in failed.items():
        click.echo(f"{name}  FAILED: {reason}")
    if failed:
        raise click.ClickException(f"{len(failed)} manifest(s) in {root} cannot be read")
    if not found:
        click.echo(f"no models in {root}")


@models.command()
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--name", required=True, help="Model name (also its queue: inferq.<name>).")
@click.option("--version", "version", type=click.IntRange(min=1), default=None,
              help="Version number (default: the next one).")
@click.option("--max-batch-rows", type=click.IntRange(min=1), default=None,
              help="Largest batch (default: 64 with a dynamic batch axis, else 1).")
@click.option("--max-wait-ms", type=click.FloatRange(min=0), default=None,
              help="Longest wait for a batch to fill (default: 2.0 with a dynamic batch axis).")
@click.option("--tune", is_flag=True,
              help="Measure batch sizes 1..1024 here and write the best values.")
@click.option("--dim", "dims", multiple=True, metavar="NAME=VALUE",
              help="With --tune: size of a named dimension of the inputs (default 1).")
@click.option("--description", default=None, help="Manifest description.")
@_MODEL_DIR
def add(path: Path, name: str, version: int | None, max_batch_rows: int | None,
        max_wait_ms: float | None, tune: bool, dims: tuple[str, ...], description: str | None,
        model_dir: Path | None) -> None:
    """Add the ONNX file PATH as a version of model NAME, writing its model.toml."""
    from workers.bench import tuning
    from workers.repository.importing import add_model
    from workers.serving import runtime

    root = _root(model_dir)
    try:
        tuner = None
        if tune:
            settings = _settings()
            tuner = functools.partial(tuning.tune, dims=tuning.parse_dims(dims),
                                      device=settings.device,
                                      threads=settings.intra_op_threads)
        elif dims:
            raise click.ClickException("--dim only applies with --tune")
        added = add_model(
            path, root, name, version=version, max_batch_rows=max_batch_rows,
            max_wait_ms=max_wait_ms, description=description, tuner=tuner,
            verify=lambda m, v: runtime.load(m, v, "cpu", 1))
    except WorkerError as exc:
        raise click.ClickException(str(exc)) from None
    m = added.manifest
    entry = m.versions[added.version]
    click.echo(f"added {m.name} v{added.version}: {entry.path} (sha256 {entry.sha256[:12]}…)")
    for kind, specs in (("in ", m.inputs), ("out", m.outputs)):
        for s in specs:
            click.echo(f"  {kind} {s.name}: {s.dtype}{list(s.shape)}")
    click.echo(f"  max_batch_rows {m.max_batch_rows}, max_wait_ms {m.max_wait_ms}")
    for note in added.notes:
        click.echo(f"    {note}")
    _announce(m.name)


@models.command()
@click.argument("name")
@click.option("--version", "version", type=int, required=True, help="Version to remove.")
@click.option("--yes", is_flag=True, help="Removing the last version removes the model: do it.")
@_MODEL_DIR
def remove(name: str, version: int, yes: bool, model_dir: Path | None) -> None:
    """Remove a version of model NAME (its folder and manifest entry)."""
    from workers.repository.importing import remove_version, versions

    root = _root(model_dir)
    try:
        last = versions(root, name) == [version]
        if last and not yes:
            click.confirm(f"v{version} is the last version of '{name}': remove the model "
                          f"({root / name})?", abort=True)
        gone = remove_version(root, name, version, remove_model=last)
    except WorkerError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"removed model {name}" if gone else f"removed {name} v{version}")
    _announce(name)


@models.command()
@click.argument("name", required=False)
def reload(name: str | None) -> None:
    """Tell running workers to rescan the repository now (model NAME, or every model) and
    to retry versions they refused; they load what was added and unload what was removed.

    Exits 1 when Redis cannot be reached."""
    if not _announce(name):
        raise click.ClickException("no worker was told")


@models.command()
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None,
              help="Device to load on (default: $INFERQ_DEVICE, else cpu).")
@_MODEL_DIR
def check(device: str | None, model_dir: Path | None) -> None:
    """Load every version of every model as a worker does; exit 1 if any fails."""
    from workers.serving import runtime

    settings = _settings()
    root = _root(model_dir)
    found, failed = _scan(root)
    lines: list[tuple[str, str]] = [(name, f"{name} FAILED: {r}") for name, r in failed.items()]
    failures = len(failed)
    for name, manifest in found.items():
        threads = settings.session_threads(manifest.instances or settings.instances)
        for version in sorted(manifest.versions):
            started = time.perf_counter()
            try:
                model = runtime.load(manifest, version, device or settings.device, threads)
            except Exception as exc:  # one broken model must not hide the others
                failures += 1
                reason = str(exc).strip() or type(exc).__name__
                lines.append((name, f"{name} v{version} FAILED: {reason}"))
                continue
            took = (time.perf_counter() - started) * 1000
            where = "cuda" if model.provider == "CUDAExecutionProvider" else "cpu"
            lines.append((name, f"{name} v{version} OK ({where}, {took:.0f} ms)"))
    for _, line in sorted(lines, key=lambda item: item[0]):
        click.echo(line)
    if not lines:
        raise click.ClickException(f"no models in {root}")
    if failures:
        raise click.ClickException(f"{failures} of the models in {root} failed to load")


from workers.launch.drift_cli import profile_command  # noqa: E402  (inferq models profile)

models.add_command(profile_command)
