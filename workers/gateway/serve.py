"""Running the gateway: uvicorn with TLS and N processes, after the settings are checked.

Each uvicorn process builds its app from ``$INFERQ_GATEWAY_SETTINGS`` (set here), so every
process serves the same settings; with several, Prometheus metrics are aggregated through
``PROMETHEUS_MULTIPROC_DIR`` (a temporary directory unless one is set).
"""

from __future__ import annotations

import os
import shutil
import tempfile

from fastapi import FastAPI

from workers.gateway.settings import SETTINGS_ENV, GatewaySettings
from workers.ops import logs


def app_from_env() -> FastAPI:
    """The uvicorn factory of each process: logging, then the app from the settings."""
    from workers.gateway.app import create_app

    settings = GatewaySettings.from_env()
    logs.configure(settings.log_format)
    return create_app(settings)


def serve(settings: GatewaySettings) -> None:
    """Serve until SIGINT/SIGTERM (uvicorn's graceful shutdown)."""
    import uvicorn

    from workers.gateway.transport import CoalescingHttp

    settings.validate()
    logs.configure(settings.log_format)
    os.environ[SETTINGS_ENV] = settings.to_env()
    metrics_dir = None
    if settings.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        metrics_dir = tempfile.mkdtemp(prefix="inferq-gateway-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    try:
        uvicorn.run("workers.gateway.serve:app_from_env", factory=True, host=settings.host,
                    http=CoalescingHttp,
                    port=settings.port, workers=settings.workers,
                    ssl_certfile=settings.certfile, ssl_keyfile=settings.keyfile,
                    log_config=None, access_log=False, server_header=False,
                    timeout_graceful_shutdown=30)
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
