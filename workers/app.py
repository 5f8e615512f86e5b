"""The Celery app of an inferq worker process and the bootstep that serves models.

Run one process per GPU: ``celery -A workers.app worker -P solo -n gpu0@%h`` (what
``inferq worker`` does). Models are loaded, verified and warmed in this process before
any queue is read; then one thread per model drains its queue in bulk.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from typing import Any, ClassVar

import redis
import structlog
from celery import Celery, bootsteps

from producer import contract
from workers import logs, metrics, repository, runtime
from workers.consumer import QueueReader
from workers.health import Monitor
from workers.results import ResultStore, ResultWriter, TaskEvents
from workers.settings import CONTROL_QUEUE, Settings
from workers.tasks import ModelServer

log = structlog.get_logger(__name__)



def make_app(settings: Settings) -> Celery:
    """A Celery app configured for inferq's delivery guarantees.

    For ``rediss://`` URLs the broker and the result backend get explicit TLS options
    that always verify the server's certificate: kombu alone would fall back to
    ``ssl_cert_reqs=CERT_NONE`` for a ``rediss://`` URL without TLS parameters.
    """
    # Imported here so that this TLS block stays within make_app.
    import ssl
    from urllib.parse import parse_qsl, urlsplit

    from workers.settings import SettingsError

    def tls_options(url: str) -> dict[str, Any] | None:
        """The ssl dict kombu (broker_use_ssl) and Celery (redis_backend_use_ssl) take."""
        parts = urlsplit(url)
        if parts.scheme != "rediss":
            return None
        query = dict(parse_qsl(parts.query))
        # Only "required": the one spelling redis-py, kombu and Celery all accept.
        reqs = query.get("ssl_cert_reqs", "required")
        if reqs != "required":
            raise SettingsError(
                f"rediss:// URLs must verify the server certificate: ssl_cert_reqs={reqs!r} "
                "is refused; use ssl_cert_reqs=required (or leave it out)")
        options: dict[str, Any] = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
        # Without ssl_ca_certs the system's CA store verifies the server.
        for key in ("ssl_ca_certs", "ssl_ca_path", "ssl_certfile", "ssl_keyfile"):
            if query.get(key):
                options[key] = query[key]
        if "ssl_check_hostname" in query:
            options["ssl_check_hostname"] = query["ssl_check_hostname"].lower() not in (
                "false", "0", "no", "off")
        return options

    broker_tls, backend_tls = tls_options(settings.broker_url), tls_options(settings.result_url)
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
    app.steps["worker"].add(ServeModels)
    return app


def check_redis_durability(client: redis.Redis) -> None:
    """Refuse (production profile) a Redis that can lose or evict queued jobs."""
    persistence, memory = client.info("persistence"), client.info("memory")
    problems = []
    if not int(persistence.get("aof_enabled", 0)):
        problems.append("appendonly is off (a restart loses queued jobs)")
    if memory.get("maxmemory_policy") != "noeviction":
        problems.append(f"maxmemory-policy is {memory.get('maxmemory_policy')} "
                        "(eviction silently drops queues); set noeviction")
    if problems:
        raise RuntimeError("INFERQ_PROFILE=production refuses this Redis: " + "; ".join(problems))


def _redis(url: str) -> redis.Redis:
    # Longer than the 1 s blocking wait, short enough to notice a dead server.
    return redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5,
                                health_check_interval=25)


class ServeModels(bootsteps.StartStopStep):  # type: ignore[misc]
    """Load every model, advertise it, and run one ModelServer thread per model."""

    requires: ClassVar[set[str]] = {"celery.worker.components:Pool"}

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.stop_event = threading.Event()
        self.threads: list[threading.Thread] = []

    def start(self, worker: Any) -> None:
        settings = SETTINGS
        hostname = worker.hostname or settings.hostname
        port = metrics.port_from_env(os.environ)
        if port is not None:
            # Up before the models load, so a long load reads as "not ready", not "down".
            try:
                log.info("metrics_listening", port=METRICS.start_http(port))
            except OSError as exc:
                log.warning("metrics_port_unavailable", port=port, error=str(exc))
        manifests = repository.scan(settings.model_dir, settings.models)
        loaded: dict[str, dict[int, runtime.LoadedModel]] = {}
        instances = {name: m.instances or settings.instances for name, m in manifests.items()}
        for name, manifest in manifests.items():
            loaded[name] = {}
            threads = settings.session_threads(instances[name])
            for v in sorted(manifest.versions):
                started = time.perf_counter()
                model = runtime.load(manifest, v, settings.device, threads)
                seconds = time.perf_counter() - started
                METRICS.model_loaded(name, v, model.provider, seconds)
                log.info("model_loaded", model=name, version=v, provider=model.provider,
                         load_ms=round(seconds * 1000, 1), instances=instances[name],
                         intra_op_threads=threads)
                loaded[name][v] = model
        control = _redis(settings.broker_url)
        if settings.profile == "production":
            check_redis_durability(control)
        signatures = {name: json.dumps(m.signature()) for name, m in manifests.items()}
        servers: list[ModelServer] = []
        for name, versions in loaded.items():
            for instance in range(instances[name]):
                reader = QueueReader(_redis(settings.broker_url), contract.queue_name(name))
                writer = ResultWriter(
                    ResultStore(_redis(settings.result_url), settings.result_ttl_s),
                    reader,
                    TaskEvents(worker.app, hostname, settings.task_events,
                               settings.events_max_rate / instances[name]),
                    same_server=settings.result_url == settings.broker_url,
                )
                server = ModelServer(name, versions, reader, writer, worker=hostname,
                                     settings=settings, metrics=METRICS, instance=instance)
                servers.append(server)
                self.threads.append(threading.Thread(
                    target=self._run, args=(server,), name=f"inferq-{name}-{instance}",
                    daemon=True))
        monitor = Monitor(settings, hostname, servers, control, self.stop_event, signatures)
        self.threads.append(threading.Thread(target=monitor.run, name="inferq-monitor",
                                             daemon=True))
        for thread in self.threads:
            thread.start()
        METRICS.set_ready(True)
        METRICS.start_sampler(_redis(settings.broker_url), sorted(loaded), stop=self.stop_event)
        log.info("worker_ready", worker=hostname, models=sorted(loaded), device=settings.device)

    def _run(self, server: ModelServer) -> None:
        try:
            server.serve(self.stop_event)
        except Exception:
            server.log.exception("model_server_crashed")
            METRICS.set_ready(False)
            # A worker that stopped serving must not look healthy: stop the whole process.
            os.kill(os.getpid(), signal.SIGTERM)

    def stop(self, worker: Any) -> None:
        METRICS.set_ready(False)
        self.stop_event.set()
        for thread in self.threads:
            thread.join(timeout=60)
        METRICS.close()


SETTINGS = Settings.from_env()
METRICS = metrics.WorkerMetrics()
logs.configure(json_output=os.environ.get("INFERQ_LOG_FORMAT", "auto"))
app = make_app(SETTINGS)
