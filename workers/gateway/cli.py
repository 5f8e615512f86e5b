"""``inferq gateway serve`` and ``inferq gateway keys create|list|revoke``."""

from __future__ import annotations

import time

import click


@click.group()
def gateway() -> None:
    """The HTTP API (FastAPI) for services that don't speak Celery, and its API keys."""


@gateway.command()
@click.option("--host", default="127.0.0.1", show_default=True, envvar="INFERQ_GATEWAY_HOST",
              help="Address to listen on; any but loopback needs TLS or "
                   "--allow-insecure-http.")
@click.option("--port", default=8080, show_default=True, envvar="INFERQ_GATEWAY_PORT",
              type=click.IntRange(0, 65535), help="Port to listen on.")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 64),
              help="uvicorn worker processes.")
@click.option("--certfile", type=click.Path(dir_okay=False), default=None,
              help="TLS certificate (PEM); with --keyfile, serve HTTPS.")
@click.option("--keyfile", type=click.Path(dir_okay=False), default=None,
              help="TLS private key (PEM).")
@click.option("--allow-insecure-http", is_flag=True,
              help="Serve plain HTTP on a non-loopback address (a TLS proxy or a private "
                   "network in front).")
@click.option("--max-body-mb", default=64.0, show_default=True, type=float,
              help="Largest request body (413 past it).")
@click.option("--rate-limit", default=1000, show_default=True, type=click.IntRange(0),
              help="Requests per second per API key, across all gateway processes (0: off).")
@click.option("--cors-origin", "cors_origins", multiple=True,
              help="Allow this origin (CORS); repeat for several. Off by default.")
@click.option("--max-wait", "max_wait_s", default=60.0, show_default=True, type=float,
              help="Longest ?wait= a request may ask for, in seconds.")
def serve(host: str, port: int, workers: int, certfile: str | None, keyfile: str | None,
          allow_insecure_http: bool, max_body_mb: float, rate_limit: int,
          cors_origins: tuple[str, ...], max_wait_s: float) -> None:
    """Serve the HTTP API until Ctrl-C (docs at /docs)."""
    from workers.errors import SettingsError
    from workers.gateway.serve import serve as run
    from workers.gateway.settings import GatewaySettings

    try:
        settings = GatewaySettings(
            host=host, port=port, workers=workers, certfile=certfile, keyfile=keyfile,
            allow_insecure_http=allow_insecure_http,
            max_body_bytes=int(max_body_mb * 1024 * 1024), rate_limit=rate_limit,
            cors_origins=cors_origins, max_wait_s=max_wait_s,
            predict_wait_s=min(30.0, max_wait_s))
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"gateway  {settings.url}  (docs {settings.url}/docs)", err=True)
    run(settings)


@gateway.group("keys")
def keys_group() -> None:
    """Create, list and revoke API keys (stored hashed in Redis)."""


def _redis() -> object:
    from producer.wire.connect import broker_url, connect

    return connect(broker_url(), timeout=5)


@keys_group.command("create")
@click.argument("name")
@click.option("--models", required=True, help="Comma list of models the key may use, or '*'.")
@click.option("--scopes", default="submit,read", show_default=True,
              help="Comma list of: submit (jobs, jobs:batch, :predict), read (jobs, models).")
def keys_create(name: str, models: str, scopes: str) -> None:
    """Create a key; print it once, alone on the last line (it is stored only hashed)."""
    from workers.gateway import keys

    try:
        key, record = keys.create(_redis(), name, keys.parse_models(models),  # type: ignore[arg-type]
                                  keys.parse_scopes(scopes))
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"created key {record.name} (id {record.id}) for models "
               f"{','.join(record.models)} with scopes {','.join(sorted(record.scopes))}; "
               "it is shown once:")
    click.echo(key)


@keys_group.command("list")
def keys_list() -> None:
    """One line per key: name, id, models, scopes, age (never the key)."""
    from workers.gateway import keys

    for record in keys.list_keys(_redis()):  # type: ignore[arg-type]
        age = time.time() - record.created
        click.echo(f"{record.name}  {record.id}  models={','.join(record.models)}  "
                   f"scopes={','.join(sorted(record.scopes))}  created {age:,.0f}s ago")


@keys_group.command("revoke")
@click.argument("name")
def keys_revoke(name: str) -> None:
    """Delete the key NAME: every gateway refuses it (401) within milliseconds."""
    from workers.gateway import keys

    if not keys.revoke(_redis(), name):  # type: ignore[arg-type]
        raise click.ClickException(f"no key named {name!r}")
    click.echo(f"revoked {name}")
