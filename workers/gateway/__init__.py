"""``inferq gateway``: an HTTP API over the queue for services that don't speak Celery.

Read in the order a request flows: :mod:`~workers.gateway.settings` (one validated settings
object) → :mod:`~workers.gateway.keys` (API keys, scopes, who owns a job) →
:mod:`~workers.gateway.limits` (per-key rate limit, idempotency keys) →
:mod:`~workers.gateway.payloads` (KServe v2 JSON and msgpack tensors, to arrays and back) →
:mod:`~workers.gateway.app` (the FastAPI routes on the asyncio client) →
:mod:`~workers.gateway.problems` (RFC 9457 errors with inferq's codes) →
:mod:`~workers.gateway.openapi` (per-model schemas and examples, Swagger UI served locally)
→ :mod:`~workers.gateway.serve` (uvicorn, TLS, processes) and
:mod:`~workers.gateway.cli` (``inferq gateway serve|keys``).

It imports the producer and never the workers' serving code or onnxruntime.
"""
