"""Queue depth and the age of the oldest waiting message, per model, in one round trip.

Read by the queue exporter, the one owner of these series (workers do not export them).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

import redis
from prometheus_client.core import GaugeMetricFamily, Metric

from producer import wire


def _enqueued_at(raw: bytes | str | None) -> float | None:
    """The ``inferq_enqueued_at`` header of a stored message (epoch seconds), if any."""
    if raw is None:
        return None
    try:
        value = json.loads(raw).get("headers", {}).get(wire.HEADER_ENQUEUED_AT)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            moment = datetime.fromisoformat(value)
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=timezone.utc)
            return moment.timestamp()
    except (ValueError, TypeError, AttributeError, RecursionError):
        pass
    return None


def queue_stats(client: redis.Redis, models: Sequence[str],
                now: float | None = None) -> dict[str, tuple[int, float]]:
    """Per model: messages waiting (all priority lists) and the oldest one's age in seconds
    (0 when empty or unstamped), in one round trip."""
    pipe = client.pipeline(transaction=False)
    for model in models:
        queue = wire.queue_name(model)
        for key in wire.priority_queues(queue):
            pipe.llen(key)
            pipe.lindex(key, -1)  # workers pop from the right: the oldest message
    replies: list[Any] = pipe.execute()
    now = wire.now() if now is None else now
    stats = {}
    per_model = 2 * (1 + len(wire.PRIORITY_STEPS))
    for i, model in enumerate(models):
        part = replies[i * per_model:(i + 1) * per_model]
        stamps = [t for t in map(_enqueued_at, part[1::2]) if t is not None]
        stats[model] = (sum(int(n) for n in part[0::2]),
                        max(0.0, now - min(stamps)) if stamps else 0.0)
    return stats


def queue_families(stats: Mapping[str, tuple[int, float]]) -> list[Metric]:
    depth = GaugeMetricFamily("inferq_queue_depth", "Messages waiting in the model's queue.",
                              labels=("model",))
    age = GaugeMetricFamily("inferq_queue_oldest_age_seconds",
                            "Age of the oldest waiting message (0 when empty or unknown).",
                            labels=("model",))
    for model, (waiting, oldest) in sorted(stats.items()):
        depth.add_metric((model,), waiting)
        age.add_metric((model,), oldest)
    return [depth, age]

