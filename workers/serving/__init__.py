"""The serving path of a worker, in the order a job travels it.

:mod:`~workers.serving.reader` (drain the queue) → :mod:`~workers.serving.intake` (parse,
fetch by-reference data, dedupe redeliveries, check each job with
:mod:`~workers.serving.validation`) → :mod:`~workers.serving.batching` (when to flush, what
to combine) → :mod:`~workers.serving.runtime` (ONNX Runtime) → :mod:`~workers.serving.loop`
(the loop that ties them) → :mod:`~workers.serving.writer` (store results, then ack, using
:mod:`~workers.serving.inflight`). :mod:`~workers.serving.observers` is the seam for
metrics, :mod:`~workers.serving.events` (Flower) and logs; :mod:`~workers.serving.poison`
isolates jobs that crash their worker; :mod:`~workers.serving.service` assembles it all in
a Celery worker.
"""
