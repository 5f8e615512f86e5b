"""The bootstep that serves models inside a Celery worker process.

It loads, verifies and warms every model version, builds one :class:`ModelServer` per model
instance with its reader, intake, writer and observers, advertises the models, and runs
each server in a thread of its own beside Celery's consumer (which keeps remote control,
heartbeats, Flower events and the visibility sweep).
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import threading
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import redis
import structlog
from celery import bootsteps, signals

from producer import wire
from producer.wire import TensorSpec
from producer.wire.connect import connect, masked
from workers.errors import EXIT_NOTHING_TO_SERVE, DeviceUnavailable, RedisRefused
from workers.ops import metrics as metrics_module
from workers.ops.gcpause import freeze_startup_heap
from workers.ops.health import Monitor
from workers.ops.metrics import MetricsObserver, WorkerMetrics
from workers.ops.sweeper import UnknownQueueSweeper
from workers.ops.versionstats import VersionStats, check_guards
from workers.repository import Manifest, scan_all
from workers.serving import runtime
from workers.serving.batching import BatchPolicy
from workers.serving.events import Dispatcher, TaskEvents
from workers.serving.hotload import HotVersions, Served, load_version, signature
from workers.serving.inflight import InFlight
from workers.serving.intake import Checks, Intake
from workers.serving.loop import ModelServer
from workers.serving.observers import BatchLog, Observer, Observers
from workers.serving.poison import PoisonGuard
from workers.serving.reader import PRIORITY_POLL_S, QueueReader
from workers.serving.routing import RouteBook
from workers.serving.shadow import ShadowObserver
from workers.serving.writer import ResultStore, ResultWriter
from workers.settings import Settings

log = structlog.get_logger(__name__)

#: Seconds model servers wait for Celery's consumer to connect before serving anyway.
CONSUMER_WAIT_S = 2.0



def _redis(url: str) -> Any:
    # Longer than the 1 s blocking wait, short enough to notice a dead server.
    return connect(url, timeout=10, connect_timeout=5, health_check_s=25)


def check_redis_durability(client: Any) -> None:
    """Refuse (production profile) a Redis that can lose or evict queued jobs."""
    persistence, memory = client.info("persistence"), client.info("memory")
    problems = []
    if not int(persistence.get("aof_enabled", 0)):
        problems.append("appendonly is off (a restart loses queued jobs)")
    if memory.get("maxmemory_policy") != "noeviction":
        problems.append(f"maxmemory-policy is {memory.get('maxmemory_policy')} "
                        "(eviction silently drops queues); set noeviction")
    if problems:
        raise RedisRefused("INFERQ_PROFILE=production refuses this Redis: "
                           + "; ".join(problems))


#: Below this Redis ``hz``, a worker's short blocking waits last much longer than asked.
MIN_REDIS_HZ = 50


def check_redis_clock(client: Any) -> int | None:
    """Warn when Redis's ``hz`` is low; return it (None when INFO is not allowed).

    Redis times out blocking commands on its ``hz`` clock: at the default 10, the 20 ms
    wait steps a worker takes while batch jobs flow end after 100 ms on a quiet server, so
    a job of another priority waits that long.
    """
    try:
        info = client.info("server")
    except redis.exceptions.RedisError:
        return None  # an ACL without INFO: nothing to say
    hz = int(info.get("configured_hz", info.get("hz", 0)) or 0)
    if hz and hz < MIN_REDIS_HZ:
        log.warning("redis_hz_low", hz=hz, effect=f"blocking waits end on a {1000 // hz} ms "
                    f"clock: {PRIORITY_POLL_S * 1000:.0f} ms wait steps (while batch jobs "
                    "flow) last that long", fix="run Redis with hz 100")
    return hz


def model_server(name: str, versions: Mapping[int, runtime.LoadedModel],
                 inputs: Sequence[TensorSpec], *, broker: redis.Redis, results: redis.Redis,
                 same_server: bool, observer: Observer, policy: BatchPolicy,
                 settings: Settings, worker: str, instance: int = 0,
                 store: ResultStore | None = None, routes: RouteBook | None = None
                 ) -> ModelServer:
    """One model instance's serving loop with its reader, intake, writer and poison guard.

    ``store`` replaces the result store (tests use it to inject failures).
    """
    checks = Checks(name, frozenset(versions), inputs, settings.max_tensor_bytes,
                    settings.reject_nonfinite)
    store = store or ResultStore(results, settings.result_ttl_s, None if same_server else broker)
    reader = QueueReader(broker, wire.queue_name(name))
    return ModelServer(
        name, versions,
        reader=reader,
        intake=Intake(checks, broker, results, InFlight(), observer, routes,
                      pin_ttl_s=max(settings.result_ttl_s, 4 * settings.visibility_timeout_s),
                      background=reader.background),
        writer=ResultWriter(store, redis_url=settings.result_url),
        # Dead letters live on the broker, where `inferq dlq` and the exporter read them.
        poison=PoisonGuard(broker, settings.max_executions, settings.result_ttl_s),
        observer=observer, policy=policy, worker=worker, instance=instance,
        redis_url=settings.broker_url)


class ServeModels(bootsteps.StartStopStep):  # type: ignore[misc]
    """Load every model, advertise it, and run one ModelServer thread per model instance.

    ``settings`` and ``metrics`` are bound by :func:`workers.app.make_app`.
    """

    requires: ClassVar[set[str]] = {"celery.worker.components:Pool"}
    settings: ClassVar[Settings]
    metrics: ClassVar[WorkerMetrics]

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.stop_event = threading.Event()
        #: Set once Celery's consumer is connected and consuming (its queues declared).
        self.consumer_ready = threading.Event()
        #: The monitor's first heartbeat was sent (see ``_run``).
        self.first_beat = threading.Event()
        self.threads: list[threading.Thread] = []
        self.dispatchers: list[Dispatcher] = []
        self.vstats: list[VersionStats] = []

    def start(self, worker: Any) -> None:
        settings, metrics = self.settings, self.metrics
        # Stop taking work as soon as a shutdown begins: Celery stops this step only after
        # its consumer, which can hang on a broker that does not answer.
        signals.worker_shutting_down.connect(self._shutting_down, weak=False)
        signals.worker_ready.connect(lambda **_: self.consumer_ready.set(), weak=False)
        hostname = worker.hostname or settings.hostname
        port = metrics_module.port_from_env(os.environ)
        if port is not None:
            # Up before the models load, so a long load reads as "not ready", not "down".
            try:
                log.info("metrics_listening", port=metrics.start_http(port))
            except OSError as exc:
                log.warning("metrics_port_unavailable", port=port, error=str(exc))
        control = _redis(settings.broker_url)
        if settings.profile == "production":
            check_redis_durability(control)
        check_redis_clock(control)
        manifests, failed = scan_all(settings.model_dir, settings.models)
        for name, reason in failed.items():
            log.error("model_not_served", model=name, reason=reason)
        servers: list[ModelServer] = []
        served: dict[str, Served] = {}
        self.routes = RouteBook(_redis(settings.broker_url), sorted(manifests))
        for name, manifest in manifests.items():
            instances = manifest.instances or settings.instances
            versions = self._load(manifest, settings.session_threads(instances), instances,
                                  failed)
            if not versions:
                continue
            served[name] = Served(manifest, [], versions)
            for instance in range(instances):
                server = self._server(worker, hostname, manifest, versions, instance, instances)
                servers.append(server)
                served[name].servers.append(server)
                self.threads.append(threading.Thread(
                    target=self._run, args=(server,), name=f"inferq-{name}-{instance}",
                    daemon=True))
        if failed and not served:
            # Nothing at all can be served: restarting would fail the same way.
            log.critical("no_model_served", reasons=failed)
            sys.stderr.flush()
            os._exit(EXIT_NOTHING_TO_SERVE)
        if not served:
            log.warning("no_models_in_repository", model_dir=str(settings.model_dir),
                        hint="add one with: inferq models add PATH.onnx --name NAME")
        # Producers keep by-reference data alive across a redelivery: they need to know how
        # long one can take. Only the versions that loaded are advertised.
        signatures = {name: signature(s.manifest, s.advertised, settings)
                      for name, s in served.items()}
        sweeper = UnknownQueueSweeper(
            control, ResultStore(_redis(settings.result_url), settings.result_ttl_s,
                                 None if settings.result_url == settings.broker_url
                                 else control), hostname, settings.unknown_model_grace_s)
        self.routes.models = sorted(served)

        def on_beat() -> None:
            try:
                self.routes.refresh()  # a route change whose message this worker missed
            except redis.exceptions.RedisError as exc:
                log.debug("routes_not_refreshed", error=str(exc))
            sweeper()
            check_guards(self.routes, self.vstats, self.metrics.lifecycle, hostname)

        with contextlib.suppress(redis.exceptions.RedisError):
            self.routes.refresh()  # before the first job is taken

        monitor = Monitor(settings, hostname, servers, control, self.stop_event, signatures,
                          failed, on_beat)
        self.first_beat = monitor.first_beat
        self.threads.append(threading.Thread(target=self.routes.listen, args=(self.stop_event,),
                                             name="inferq-routes", daemon=True))
        self.threads.append(threading.Thread(target=monitor.run, name="inferq-monitor",
                                             daemon=True))
        # Versions added to or removed from the repository while serving.
        hot = HotVersions(settings, metrics, served, client=_redis(settings.broker_url),
                          monitor=monitor, routes=self.routes, scanned=manifests,
                          start_model=functools.partial(self._start_model, worker, hostname,
                                                        servers))
        self.threads.append(threading.Thread(target=hot.run, args=(self.stop_event,),
                                             name="inferq-hot-versions", daemon=True))
        # What is loaded by now lives as long as the process: out of the collector's walks.
        frozen = freeze_startup_heap()
        metrics.gc.start()
        for thread in self.threads:
            thread.start()
        metrics.set_ready(True)
        metrics.start_sampler(stop=self.stop_event)
        try:
            control.ping()
            log.info("worker_ready", worker=hostname, models=sorted(served),
                     device=settings.device, not_served=sorted(failed), gc_frozen=frozen)
        except redis.exceptions.RedisError as exc:
            # Not "ready": every loop retries with backoff and says so once.
            log.warning("worker_waiting_for_redis", worker=hostname, error=str(exc),
                        redis=masked(settings.broker_url), models=sorted(served))

    def _load(self, manifest: Manifest, threads: int, instances: int,
              failed: dict[str, str]) -> dict[int, runtime.LoadedModel]:
        """Every version of ``manifest`` that loads; the others go into ``failed``."""
        loaded = {}
        for v in sorted(manifest.versions):
            try:
                model = load_version(manifest, v, self.settings, self.metrics, threads,
                                     instances)
            except DeviceUnavailable:
                raise  # the whole worker is on the wrong device: not one model's problem
            except Exception as exc:
                # One bad model (or version) is that model's problem: the rest are served.
                failed[f"{manifest.name} v{v}"] = str(exc)
                log.error("model_not_served", model=manifest.name, version=v, reason=str(exc))
                self.metrics.model_ready(manifest.name, v, False)
                continue
            loaded[v] = model
        return loaded

    def _server(self, worker: Any, hostname: str, manifest: Manifest,
                versions: dict[int, runtime.LoadedModel], instance: int, instances: int
                ) -> ModelServer:
        settings = self.settings
        broker, results = _redis(settings.broker_url), _redis(settings.result_url)
        same_server = settings.result_url == settings.broker_url
        observers: list[Observer] = [
            MetricsObserver(self.metrics, manifest.name),
            BatchLog(log.bind(model=manifest.name, worker=hostname, instance=instance)),
        ]
        # Model lifecycle: per-version figures for guardrails, and shadow comparisons.
        stats = VersionStats(broker, manifest.name)
        self.vstats.append(stats)
        shadow = ShadowObserver(manifest.name, self.routes, broker, self.metrics.lifecycle,
                                self.stop_event, max_rows=manifest.max_batch_rows)
        observers += [stats, shadow]
        if settings.task_events:
            dispatcher = Dispatcher(worker.app, hostname)
            self.dispatchers.append(dispatcher)
            observers.append(TaskEvents(manifest.name, dispatcher.send,
                                        settings.events_max_rate / instances))
        if settings.drift:
            from workers.serving.drift import DriftObserver

            observers.append(DriftObserver(
                manifest, broker, settings.model_dir, sample=settings.drift_sample,
                reference_rows=settings.drift_reference_rows, flush_s=settings.drift_flush_s))
        server = model_server(manifest.name, versions, manifest.inputs, broker=broker,
                              results=results, same_server=same_server,
                              observer=Observers(observers),
                              policy=BatchPolicy(
                                  manifest.max_batch_rows, manifest.max_wait_ms / 1000.0,
                                  background_run_s=settings.background_run_ms / 1000.0),
                              settings=settings, worker=hostname, instance=instance,
                              routes=self.routes)
        shadow.bind(lambda: server.versions)  # looked up per run: versions come and go
        return server

    def _start_model(self, worker: Any, hostname: str, servers: list[ModelServer],
                     manifest: Manifest, versions: dict[int, runtime.LoadedModel]
                     ) -> list[ModelServer]:
        """Build and start the servers of a model added to the repository while serving."""
        instances = manifest.instances or self.settings.instances
        started = []
        for instance in range(instances):
            server = self._server(worker, hostname, manifest, versions, instance, instances)
            thread = threading.Thread(target=self._run, args=(server,),
                                      name=f"inferq-{manifest.name}-{instance}", daemon=True)
            self.threads.append(thread)
            thread.start()
            started.append(server)
        servers.extend(started)  # the monitor's list: heartbeat, batch watchdog, recycling
        return started

    def _shutting_down(self, *args: Any, **kwargs: Any) -> None:
        self.stop_event.set()

    def _run(self, server: ModelServer) -> None:
        # Jobs are taken once Celery's consumer is up (or after CONSUMER_WAIT_S without it:
        # Redis away, say): a consumer that fails at start-up, on a Redis at its memory
        # limit for one, must not find the jobs this worker took meanwhile filling it.
        self.consumer_ready.wait(CONSUMER_WAIT_S)
        # Likewise the worker's heartbeat: written before the first job is taken.
        self.first_beat.wait(CONSUMER_WAIT_S)
        try:
            server.serve(self.stop_event)
        except Exception:
            server.log.exception("model_server_crashed")
            self.metrics.set_ready(False)
            # A worker that stopped serving must not look healthy: stop the whole process.
            os.kill(os.getpid(), signal.SIGTERM)

    def stop(self, worker: Any) -> None:
        self.metrics.set_ready(False)
        self.stop_event.set()
        for thread in self.threads:
            thread.join(timeout=60)
        for dispatcher in self.dispatchers:
            dispatcher.close()
        self.metrics.close()
