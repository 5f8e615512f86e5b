"""``inferq route|alias|promote|rollback|routes``: a model's route, changed in one step."""

from __future__ import annotations

import time
from typing import Any

import click

from producer.wire.routes import Route


def _client() -> Any:
    from producer.wire.connect import broker_url, connect

    return connect(broker_url(), timeout=5)


def _show(model: str, route: Route) -> None:
    aliases = ", ".join(f"{a}={v}" for a, v in sorted(route.aliases.items())) or "none"
    click.echo(f"{model}  route {route.describe()}  aliases {aliases}  (rev {route.rev})")


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
def route(model: str, split: tuple[str, ...]) -> None:
    """Route jobs that name no version: one VERSION, or a split like 2=90 3=10."""
    from workers.ops import routes

    _show(model, routes.set_split(_client(), model, _split(split)))


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
def promote(model: str, version: int) -> None:
    """Send all of MODEL's unpinned jobs to VERSION and make it the stable alias."""
    from workers.ops import routes

    _show(model, routes.promote(_client(), model, version))


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
                   f"aliases {aliases}{'  (' + old.note + ')' if old.note else ''}")


COMMANDS = (route, alias, promote, rollback, show_routes)
