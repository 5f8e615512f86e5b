"""The Celery app of an inferq worker process.

Run one process per GPU: ``celery -A workers.app worker -P solo -n gpu0@%h`` (what
``inferq worker`` does). The app is built from settings by :func:`make_app`; the module's
``app`` attribute, which ``celery -A`` reads, is built from the environment on first use,
so importing this module configures nothing.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

from producer.wire import CONTROL_QUEUE
from producer.wire.connect import tls_options
from workers.errors import SettingsError
from workers.ops import logs
from workers.ops.metrics import WorkerMetrics
from workers.serving.service import ServeModels
from workers.settings import Settings


def make_app(settings: Settings, metrics: WorkerMetrics | None = None) -> Celery:
    """A Celery app configured for inferq's delivery guarantees, serving models with
    ``settings`` and reporting into ``metrics``.

    For ``rediss://`` URLs the broker and the result backend get explicit TLS options
    that always verify the server's certificate.
    """
    try:
        broker_tls, backend_tls = tls_options(settings.broker_url), tls_options(settings.result_url)
    except ValueError as exc:
        raise SettingsError(str(exc)) from None
    app = Celery("inferq", broker=settings.broker_url, backend=settings.result_url)
    if broker_tls is not None:
        app.conf.broker_use_ssl = broker_tls
    if backend_tls is not None:
        app.conf.redis_backend_use_ssl = backend_tls
    vt = settings.visibility_timeout_s
    app.conf.update(
        # Control replies (Flower, inspect) use the task serializer: keep it json.
        task_serializer="json",
        result_serializer="json",
        # Jobs never pass Celery's consumer (the serving loop reads their queues and
        # refuses other content types itself); this covers the control queue.
        accept_content=["msgpack", "json"],
        result_accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_send_task_events=settings.task_events,
        task_default_queue=CONTROL_QUEUE,
        result_expires=settings.result_ttl_s,
        # kombu reads the visibility timeout in three places; set all of them.
        visibility_timeout=vt,
        broker_transport_options={
            "visibility_timeout": vt,
            "unacked_restore_interval": settings.restore_interval_s,
            "unacked_restore_throttle": 1,
            # kombu holds this lock while it sweeps; its 300 s default, if taken by a client
            # that then loses Redis, stops every sweep for 5 minutes.
            "unacked_mutex_expire": max(5, int(3 * settings.restore_interval_s)),
            "socket_timeout": 10,
            "socket_connect_timeout": 5,
            "health_check_interval": 25,
        },
        result_backend_transport_options={"visibility_timeout": vt},
        redis_socket_timeout=10,
        redis_socket_connect_timeout=5,
        broker_connection_retry_on_startup=True,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
    )
    step = type("ServeModels", (ServeModels,),
                {"settings": settings, "metrics": metrics or WorkerMetrics()})
    app.steps["worker"].add(step)
    return app


def create_app() -> Celery:
    """The app of a worker process, from ``INFERQ_*`` variables, with logging configured."""
    logs.configure(json_output=os.environ.get("INFERQ_LOG_FORMAT", "auto"))
    return make_app(Settings.from_env())


_app: Celery | None = None


def __getattr__(name: str) -> Any:
    # ``celery -A workers.app`` reads ``workers.app.app``: build it then, not at import.
    global _app
    if name == "app":
        if _app is None:
            _app = create_app()
        return _app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
