"""``inferq exporter``: what no worker can report — queue depth and age per model, jobs
waiting for a model nobody serves (live consumers per model), the dead-letter list, and
Redis itself (reachable, memory used against ``maxmemory``).

It is the only owner of these series: workers export their own jobs only. While Redis
cannot be read a scrape still answers, with ``inferq_redis_up 0`` and nothing else.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import redis
import structlog
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric

from producer import wire
from producer.wire.connect import connect
from workers.ops import drift
from workers.ops.queues import queue_families, queue_stats

log = structlog.get_logger(__name__)

#: Port of ``inferq exporter``.
EXPORTER_PORT = 9460
#: Features per tensor exported with their PSI.
DRIFT_TOP_K = 10


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


def redis_up(up: bool) -> Metric:
    return GaugeMetricFamily("inferq_redis_up",
                             "1 when the exporter's last read of Redis succeeded, 0 when Redis "
                             "was unreachable or refused it.", value=1 if up else 0)


def memory_families(info: Mapping[str, Any]) -> list[Metric]:
    """Redis memory in use and its ``maxmemory`` (0: no limit), from ``INFO memory``."""
    return [
        GaugeMetricFamily("inferq_redis_memory_used_bytes",
                          "Memory Redis uses (INFO memory used_memory).",
                          value=int(info["used_memory"])),
        GaugeMetricFamily("inferq_redis_maxmemory_bytes",
                          "Redis maxmemory; 0 means no limit. At the limit (noeviction) "
                          "producers are refused and workers cannot store results.",
                          value=int(info.get("maxmemory", 0))),
    ]


class QueueExporter:
    """What no worker can report: queues, consumers, dead letters, Redis itself."""

    def __init__(self, client: redis.Redis, models: Sequence[str] = ()) -> None:
        self.client = client
        self.models = tuple(models)
        self._families: list[Metric] = []
        self._memory_refused = ""  # log a refused INFO once, not every interval
        self.drift = DriftGauges(client)

    def sample(self, now: float | None = None) -> None:
        """Read Redis and replace what the next scrape returns. On a Redis error only
        ``inferq_redis_up 0`` is left (stale queue gauges would look healthy), and the error
        is raised."""
        try:
            known = self.client.hkeys(wire.MODELS_KEY)
            names = sorted({*(k.decode() if isinstance(k, bytes) else str(k) for k in known),
                            *self.models})
            stats = queue_stats(self.client, names, now)
            live = consumers(self.client)
            dead = int(self.client.llen(wire.DLQ_KEY))
            memory = self._memory()
        except redis.exceptions.RedisError:
            self._families = [redis_up(False)]
            raise
        serving = GaugeMetricFamily("inferq_queue_consumers", "Live workers serving the model.",
                                    labels=("model",))
        for name in names:
            serving.add_metric((name,), live.get(name, 0))
        dlq = GaugeMetricFamily("inferq_dead_letter_jobs", f"Jobs in the {wire.DLQ_KEY} list.",
                                value=dead)
        self._families = [*queue_families(stats), serving, dlq, redis_up(True), *memory,
                          *self.drift.families()]

    def _memory(self) -> list[Metric]:
        """The memory gauges; none when Redis refuses ``INFO`` (an ACL without ``+info``):
        the queues are still worth exporting."""
        try:
            info = self.client.info("memory")
        except redis.exceptions.ResponseError as exc:
            if str(exc) != self._memory_refused:
                log.warning("exporter_redis_info_refused", error=str(exc))
            self._memory_refused = str(exc)
            return []
        self._memory_refused = ""
        return memory_families(info)

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
    failing = ""  # warn once per distinct failure, not every interval
    try:
        while True:
            try:
                exporter.sample()
                if failing:
                    log.info("exporter_redis_back")
                failing = ""
            except redis.exceptions.RedisError as exc:
                if str(exc) != failing:
                    log.warning("exporter_sample_failed", error=str(exc))
                failing = str(exc)
            if stop.wait(interval_s):
                break
    finally:
        server.shutdown()
        server.server_close()


# --- drift -----------------------------------------------------------------------------


class DriftGauges:
    """``inferq_drift_psi`` of the :data:`DRIFT_TOP_K` most drifted features of each tensor
    of each profiled version (bounded label cardinality), and ``inferq_drift_psi_max`` per
    tensor, over the last ``window_min`` minutes. Read every ``every_s`` seconds (reading
    an hour of counts each sample would cost Redis for nothing), and only where the window
    holds at least :data:`workers.ops.drift.MIN_ROWS` rows."""

    def __init__(self, client: redis.Redis, window_min: int = 60, every_s: float = 30.0
                 ) -> None:
        self.client, self.window_min, self.every_s = client, window_min, every_s
        self._read_at = float("-inf")
        self._rows: list[tuple[str, int, drift.FeatureDrift]] = []
        self._max: list[tuple[str, int, str, str, float]] = []

    def families(self, now: float | None = None) -> list[Metric]:
        now = time.monotonic() if now is None else now
        if now - self._read_at >= self.every_s:
            self._read()
            self._read_at = now
        psi = GaugeMetricFamily(
            "inferq_drift_psi", f"PSI of a feature against its version's reference over the "
            f"last {self.window_min} min (the {DRIFT_TOP_K} most drifted per tensor).",
            labels=("model", "version", "tensor", "feature"))
        for model, version, f in self._rows:
            psi.add_metric((model, str(version), f.tensor, f.feature), round(f.psi, 6))
        top = GaugeMetricFamily(
            "inferq_drift_psi_max", f"Largest PSI of any feature of a tensor over the last "
            f"{self.window_min} min; role is input or output.",
            labels=("model", "version", "tensor", "role"))
        for model, version, tensor, role, value in self._max:
            top.add_metric((model, str(version), tensor, role), round(value, 6))
        return [psi, top]

    def _read(self) -> None:
        rows: list[tuple[str, int, drift.FeatureDrift]] = []
        tops: list[tuple[str, int, str, str, float]] = []
        for model, version in drift.all_profiled(self.client):
            try:
                window = drift.read_window(self.client, model, version, self.window_min)
            except ValueError as exc:
                log.warning("exporter_drift_unreadable", model=model, version=version,
                            error=str(exc))
                continue
            if window is None:
                continue
            features = [f for f in window.features() if f.rows >= drift.MIN_ROWS]
            rows += [(model, version, f) for f in drift.top_per_tensor(features, DRIFT_TOP_K)]
            best: dict[str, drift.FeatureDrift] = {}
            for f in features:
                best.setdefault(f.tensor, f)  # most drifted first
            tops += [(model, version, f.tensor, f.role, f.psi) for f in best.values()]
        self._rows, self._max = rows, tops

