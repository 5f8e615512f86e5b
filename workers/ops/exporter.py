"""``inferq exporter``: what no worker can report — jobs waiting for a model nobody
serves (queue depth and live consumers per model) and the dead-letter list.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Sequence

import redis
import structlog
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric

from producer import wire
from producer.wire.connect import connect
from workers.ops.queues import queue_families, queue_stats

log = structlog.get_logger(__name__)

#: Port of ``inferq exporter``.
EXPORTER_PORT = 9460


def consumers(client: redis.Redis) -> dict[str, int]:
    """Live workers per model, from the heartbeat keys (they expire when a worker dies)."""
    keys = list(client.scan_iter(match=wire.WORKER_KEY_PREFIX + "*", count=1000))
    counts: dict[str, int] = {}
    for raw in client.mget(keys) if keys else []:
        try:
            models = json.loads(raw)["models"] if raw is not None else []
        except (ValueError, TypeError, KeyError):
            continue
        for model in models if isinstance(models, list) else []:
            counts[str(model)] = counts.get(str(model), 0) + 1
    return counts


class QueueExporter:
    """What no worker can report: jobs waiting for a model nobody serves, dead letters."""

    def __init__(self, client: redis.Redis, models: Sequence[str] = ()) -> None:
        self.client = client
        self.models = tuple(models)
        self._families: list[Metric] = []

    def sample(self, now: float | None = None) -> None:
        """Read Redis and replace what the next scrape returns; clears it on a Redis error."""
        try:
            known = self.client.hkeys(wire.MODELS_KEY)
            names = sorted({*(k.decode() if isinstance(k, bytes) else str(k) for k in known),
                            *self.models})
            stats = queue_stats(self.client, names, now)
            live = consumers(self.client)
            dead = int(self.client.llen(wire.DLQ_KEY))
        except redis.exceptions.RedisError:
            self._families = []
            raise
        serving = GaugeMetricFamily("inferq_queue_consumers", "Live workers serving the model.",
                                    labels=("model",))
        for name in names:
            serving.add_metric((name,), live.get(name, 0))
        dlq = GaugeMetricFamily("inferq_dead_letter_jobs", f"Jobs in the {wire.DLQ_KEY} list.",
                                value=dead)
        self._families = [*queue_families(stats), serving, dlq]

    def collect(self) -> Iterable[Metric]:
        return list(self._families)



def run_exporter(redis_url: str, port: int = EXPORTER_PORT, interval_s: float = 5.0, *,
                 models: Sequence[str] = (), stop: threading.Event | None = None,
                 addr: str = "0.0.0.0") -> None:
    """Serve the queue exporter on ``port`` and sample Redis every ``interval_s`` until
    ``stop`` is set (the body of ``inferq exporter``)."""
    registry = CollectorRegistry()
    exporter = QueueExporter(connect(redis_url, timeout=10, connect_timeout=5), models)
    registry.register(exporter)
    server, _ = start_http_server(port, addr=addr, registry=registry)
    log.info("exporter_listening", port=server.server_port, interval_s=interval_s)
    stop = threading.Event() if stop is None else stop
    try:
        while True:
            try:
                exporter.sample()
            except redis.exceptions.RedisError as exc:
                log.warning("exporter_sample_failed", error=str(exc))
            if stop.wait(interval_s):
                break
    finally:
        server.shutdown()
        server.server_close()

