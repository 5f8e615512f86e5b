"""The operator's side of a worker: metrics, GPU gauges, the queue exporter, health and
liveness, the dead-letter list, and log formatting."""
