"""What wraps every request: the body size limit, Prometheus request metrics, and one
structured access log line (with the API key's name and the job IDs the request touched).

Handlers put ``key`` and ``job_ids`` into ``request.state``; this ASGI middleware reads
them once the response is sent. With several uvicorn processes, ``/metrics`` aggregates
them through ``PROMETHEUS_MULTIPROC_DIR`` (set by ``inferq gateway serve``).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from typing import Any

import structlog
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from workers.gateway.problems import PROBLEM_JSON, Problem

log = structlog.get_logger("inferq.gateway.access")

REQUESTS = Counter("inferq_gateway_requests_total", "HTTP requests answered, by route and "
                   "status", ["method", "route", "status"])
LATENCY = Histogram("inferq_gateway_request_seconds", "Time to answer an HTTP request "
                    "(long polls and :predict include the wait)", ["method", "route"],
                    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5,
                             5, 10, 30, 60))
JOBS = Counter("inferq_gateway_jobs_submitted_total", "Jobs submitted through the gateway",
               ["model"])


def metrics_body() -> tuple[bytes, str]:
    """The exposition of this process, or of all of them in multiprocess mode."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST


class TooLarge(Exception):
    """The request body went over the limit while being read (a 413 from :class:`Observe`,
    which handlers let through)."""


class Observe:
    """ASGI middleware: refuse bodies over ``max_body_bytes`` (413), then count, time and
    log each HTTP request."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = uuid.uuid4().hex[:16]
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        status = 500
        sent = False

        async def send_wrapper(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
                sent = True
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"],
                                      (b"x-request-id", request_id.encode())]
            await send(message)

        length = dict(scope.get("headers") or []).get(b"content-length")
        received = 0

        async def receive_limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise TooLarge
            return message

        try:
            if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
                raise TooLarge
            await self.app(scope, receive_limited, send_wrapper)
        except TooLarge:
            if not sent:
                await self._too_large(scope, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            elapsed = time.perf_counter() - started
            REQUESTS.labels(scope["method"], template, str(status)).inc()
            LATENCY.labels(scope["method"], template).observe(elapsed)
            key = state.get("key")
            client = scope.get("client")
            log.info("request", method=scope["method"], path=scope["path"], route=template,
                     status=status, ms=round(elapsed * 1000, 3), request_id=request_id,
                     key=key, job_ids=state.get("job_ids"), code=state.get("code"),
                     client=client[0] if client else None)

    async def _too_large(self, scope: Scope, send: Send) -> None:
        problem = Problem("INVALID_ARGUMENT", f"request body over {self.max_body_bytes} bytes "
                          "(the gateway's limit); send fewer jobs per request", status=413)
        scope["state"]["code"] = problem.code
        body = json.dumps(problem.document(scope["path"])).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", PROBLEM_JSON.encode()),
                                (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def bind(request: Any, **fields: Any) -> None:
    """Add ``fields`` (key, job_ids, code) to the request's access log line."""
    for name, value in fields.items():
        setattr(request.state, name, value)
