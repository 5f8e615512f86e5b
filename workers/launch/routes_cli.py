"""``inferq route|alias|promote|rollback|routes``: a model's route, changed in one step."""

from __future__ import annotations

import time
from typing import Any

import click

from producer.wire.routes import Guard, Route


def _client() -> Any:
    from producer.wire.connect import broker_url, connect

    return connect(broker_url(), timeout=5)


def _extras(route: Route) -> str:
    out = ""
    if route.shadow is not None:
        out += f"  shadow v{route.shadow.version} at {route.shadow.sample:g}"
    if route.guard is not None:
        out += f"  guard: {route.guard.describe()}"
    return out


def _show(model: str, route: Route) -> None:
    aliases = ", ".join(f"{a}={v}" for a, v in sorted(route.aliases.items())) or "none"
    click.echo(f"{model}  route {route.describe()}  aliases {aliases}  (rev {route.rev})"
               + _extras(route))


def _split(specs: tuple[str, ...]) -> dict[int, float]:
    """``2`` or ``2=90 3=10`` -> {version: weight}."""
    if len(specs) == 1 and specs[0].isdigit():
        return {int(specs[0]): 1.0}
    out: dict[int, float] = {}
    for spec in specs:
        version, _, weight = spec.partition("=")
        try:
            out[int(version)] = float(weight)
        except ValueError:
            raise click.BadParameter(f"{spec!r}: write VERSION or VERSION=WEIGHT, e.g. 2=90 3=10"
                                     ) from None
    return out


@click.command()
@click.argument("model")
@click.argument("split", nargs=-1, required=True)
@click.option("--rollback-on-error-rate", type=float, default=None,
              help="Roll this split back when a version other than the largest fails more "
                   "than this fraction of its jobs (e.g. 0.05).")
@click.option("--rollback-on-p99-ms", type=float, default=None,
              help="Roll this split back when such a version's p99 (enqueued to computed) "
                   "exceeds this many ms.")
@click.option("--guard-window", default=5, show_default=True,
              help="Minutes of recent jobs a guard judges.")
@click.option("--guard-min-jobs", default=20, show_default=True,
              help="Jobs a version needs in the window before a guard judges it.")
def route(model: str, split: tuple[str, ...], rollback_on_error_rate: float | None,
          rollback_on_p99_ms: float | None, guard_window: int, guard_min_jobs: int) -> None:
    """Route jobs that name no version: one VERSION, or a split like 2=90 3=10."""
    from workers.ops import routes

    guard = None
    if rollback_on_error_rate is not None or rollback_on_p99_ms is not None:
        guard = Guard(rollback_on_error_rate, rollback_on_p99_ms, guard_window, guard_min_jobs)
    _show(model, routes.set_split(_client(), model, _split(split), guard=guard))


@click.command()
@click.argument("model")
@click.argument("name")
@click.argument("version", type=int, required=False)
@click.option("--remove", is_flag=True, help="Remove the alias instead of setting it.")
def alias(model: str, name: str, version: int | None, remove: bool) -> None:
    """Point alias NAME (stable, canary, any name) of MODEL at VERSION."""
    from workers.ops import routes

    if version is None and not remove:
        raise click.UsageError("give a VERSION, or --remove")
    _show(model, routes.set_alias(_client(), model, name, None if remove else version))


@click.command()
@click.argument("model")
@click.argument("version", type=int)
@click.option("--window", default=5, show_default=True,
              help="Minutes of recent jobs to compare the two versions over.")
@click.option("--max-error-increase", default=1.0, show_default=True,
              help="Refuse when VERSION's error rate exceeds the current one's by more than "
                   "this many points.")
@click.option("--max-p99-increase", default=20.0, show_default=True,
              help="Refuse when VERSION's p99 exceeds the current one's by more than this %.")
@click.option("--force", is_flag=True, help="Promote even when the figures say no.")
def promote(model: str, version: int, window: int, max_error_increase: float,
            max_p99_increase: float, force: bool) -> None:
    """Send all of MODEL's unpinned jobs to VERSION and make it the stable alias, unless
    VERSION did worse than the current version over its recent jobs."""
    from workers.ops import routes

    client = _client()
    review = routes.review_promotion(client, model, version, window,
                                     max_error_increase / 100, max_p99_increase / 100)
    try:
        new = routes.promote(client, model, version, review=review, force=force)
    except routes.PromotionRefused as refused:
        click.echo(review.describe(), err=True)
        raise click.ClickException(str(refused)) from None
    if review.candidate != review.current and not review.compared:
        click.echo(f"warning: v{version} has no jobs in the last {window} min: nothing could "
                   "be compared", err=True)
    elif review.candidate != review.current:
        click.echo(("forced over: " + "; ".join(review.refusals) + "\n"
                    if review.refusals else "") + review.describe(), err=True)
    _show(model, new)


@click.command()
@click.argument("model")
def rollback(model: str) -> None:
    """Go back to MODEL's previous route, in one step."""
    from workers.ops import routes

    back = routes.rollback(_client(), model)
    if back is None:
        raise click.ClickException(f"{model} has no earlier route to go back to")
    _show(model, back)


@click.command(name="routes")
@click.argument("model")
@click.option("--limit", default=10, show_default=True, help="History entries to show.")
def show_routes(model: str, limit: int) -> None:
    """MODEL's current route, aliases, and history (when and by whom)."""
    from workers.ops import routes

    client = _client()
    _show(model, routes.current(client, model))
    for old in routes.history(client, model, limit):
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(old.at)) if old.at else "-"
        aliases = ", ".join(f"{a}={v}" for a, v in sorted(old.aliases.items())) or "none"
        click.echo(f"  rev {old.rev:>3}  {when}Z  {old.by or '-':<24} route {old.describe()}  "
                   f"aliases {aliases}{_extras(old)}{'  (' + old.note + ')' if old.note else ''}")


COMMANDS = (route, alias, promote, rollback, show_routes)
