"""``inferq shadow``: run a sample of a model's jobs through another version too, off the
results path, and read how the two versions' outputs differ."""

from __future__ import annotations

import click

from workers.launch.routes_cli import _client, _show


@click.command()
@click.argument("words", nargs=-1, required=True, metavar="MODEL [VERSION] | report MODEL")
@click.option("--sample", default=0.1, show_default=True,
              help="Fraction of the model's answered jobs to run through VERSION too.")
@click.option("--off", is_flag=True, help="Stop shadowing MODEL.")
@click.option("--version", "report_version", type=int, default=None,
              help="report: the shadow version to report (default: the current one, else "
                   "the last one).")
@click.option("--top", default=10, show_default=True, help="report: most different jobs.")
def shadow(words: tuple[str, ...], sample: float, off: bool, report_version: int | None,
           top: int) -> None:
    """Shadow MODEL's traffic with another version, off the results path, and compare.

    \b
    inferq shadow digits 2 --sample 0.1   run 10% of digits jobs through v2 as well
    inferq shadow digits --off            stop
    inferq shadow report digits           how v2's outputs differed, most different jobs
    """
    if words[0] == "report":
        if len(words) != 2:
            raise click.UsageError("write: inferq shadow report MODEL")
        report(words[1], report_version, top)
        return
    if len(words) > 2 or (len(words) == 2 and not words[1].isdigit()):
        raise click.UsageError("write: inferq shadow MODEL VERSION --sample F, or MODEL --off")
    version = int(words[1]) if len(words) == 2 else None
    set_shadow(words[0], version, sample, off)


def set_shadow(model: str, version: int | None, sample: float, off: bool) -> None:
    """Run a sample of MODEL's jobs through VERSION as well (never answering from it)."""
    from workers.ops import routes

    if off == (version is not None):
        raise click.UsageError("give a VERSION, or --off")
    _show(model, routes.set_shadow(_client(), model, None if off else version, sample))


def report(model: str, version: int | None, top: int) -> None:
    """How the shadow version's outputs differed from the answers, and the most different
    jobs."""
    from workers.ops import routes
    from workers.serving.shadow import read_report

    client = _client()
    if version is None:
        for route in [routes.current(client, model), *routes.history(client, model, 100)]:
            if route.shadow is not None:
                version = route.shadow.version
                break
        else:
            raise click.ClickException(f"{model} has no shadow version; set one with: "
                                       f"inferq shadow {model} VERSION --sample 0.1")
    r = read_report(client, model, version, top)
    c = r.counts
    compared = int(c.get("compared", 0))
    click.echo(f"{model} shadow v{version}: {compared} compared, {int(c.get('dropped', 0))} "
               f"dropped (backlog full), {int(c.get('failed', 0))} failed")
    if compared:
        labels = int(c.get("labels_compared", 0))
        if labels:
            agree = int(c.get("labels_agree", 0))
            click.echo(f"  labels agree: {agree}/{labels} ({agree / labels:.1%})")
        click.echo(f"  max abs diff per job, mean: {c.get('sum_max_diff', 0) / compared:.6g}; "
                   f"mean abs diff per job, mean: {c.get('sum_mean_diff', 0) / compared:.6g}")
        rows = max(1.0, c.get("rows", 0))
        primary_ms, shadow_ms = (1000 * c.get("primary_s", 0) / rows,
                                 1000 * c.get("shadow_s", 0) / rows)
        click.echo(f"  compute per row: primary {primary_ms:.4f} ms, shadow {shadow_ms:.4f} ms")
    if r.top:
        click.echo("  most different jobs:")
    for detail, score in r.top:
        labels_text = "  ".join(f"{k} {v['primary'][:4]} -> {v['shadow'][:4]}"
                                for k, v in detail.get("labels", {}).items())
        click.echo(f"    {detail['job_id']}  v{detail['primary_version']} vs "
                   f"v{detail['shadow_version']}  max abs diff {score:.6g}  {labels_text}")


COMMANDS = (shadow,)
