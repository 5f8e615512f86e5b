"""The HTTP API: FastAPI routes on the asyncio client.

Every ``/v1`` call authenticates (``Authorization: Bearer <key>``), counts against the
key's rate, and is checked against the key's models and scopes; jobs are readable only with
the key that submitted them. Routes, in a job's order::

    POST /v1/models/{model}/jobs          202 {job_id, status_url} + Location
    POST /v1/models/{model}/jobs:batch    202 {jobs: [{job_id, status_url}, ...]}
    GET  /v1/jobs/{job_id}?wait=S         200 SUCCESS | FAILURE, 202 PENDING, 404
    POST /v1/models/{model}:predict       200 the result (submit and wait)
    GET  /v1/models, /v1/models/{model}   served models and signatures
    GET  /healthz /readyz /metrics /docs /openapi.json   (no key)
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
from collections.abc import AsyncIterator, Sequence
from typing import Annotated, Any

import orjson
import redis
import redis.asyncio as aioredis
import structlog
from fastapi import FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from producer.aio import AsyncInferenceClient, AsyncJobHandle
from producer.errors import InferqError, JobFailed, JobTimeout, UnknownJob
from producer.jobs import JobResult
from producer.submission import ModelInfo, pin
from producer.waiting import redis_failure
from producer.wire.connect import require_verified_tls
from producer.wire.routes import Route, route_key
from workers.gateway import keys, limits, openapi, payloads, schemas
from workers.gateway.admission import Admission, Admitted
from workers.gateway.observe import JOBS, Observe, TooLarge, bind, metrics_body
from workers.gateway.problems import PROBLEM_JSON, Problem, failure, from_error
from workers.gateway.settings import GatewaySettings

log = structlog.get_logger("inferq.gateway")
_bearer = HTTPBearer(auto_error=False, description="An API key from `inferq gateway keys "
                     "create`: `Authorization: Bearer iq_...`")
Bearer = HTTPAuthorizationCredentials | None
Creds = Annotated[Bearer, Security(_bearer)]
JSON = "application/json"


class Gateway:
    """What the routes share: settings, the asyncio client, Redis for keys and limits, and
    the served models the OpenAPI document is built from."""

    def __init__(self, settings: GatewaySettings, client: AsyncInferenceClient,
                 r: aioredis.Redis) -> None:
        self.settings = settings
        self.client = client
        self.redis = r
        self.admission = Admission(r, settings.rate_limit)
        self.models: dict[str, ModelInfo] = {}

    # --- who is calling ----------------------------------------------------------------

    async def authorize(self, request: Request, creds: Bearer, scope: str,
                        model: str | None = None, job_id: str | None = None) -> Admitted:
        """The caller's key, allowed ``scope`` (and ``model``), within its rate, and the
        owner of ``job_id`` when given (at most one Redis round trip); 401, 403 or 429
        otherwise."""
        token = keys.bearer(f"{creds.scheme} {creds.credentials}" if creds else None)
        admitted: Admitted | None = (await _redis(self.admission.admit(token, job_id))
                                     if token else None)
        if admitted is None:
            raise Problem("UNAUTHENTICATED", "send a valid API key: Authorization: Bearer "
                          "<key> (inferq gateway keys create NAME --models ...)")
        key = admitted.key
        bind(request, key=key.name)
        if scope not in key.scopes:
            raise Problem("PERMISSION_DENIED", f"key {key.name!r} lacks the {scope!r} scope "
                          f"(it has {sorted(key.scopes)})")
        if model is not None and not key.allows_model(model):
            raise Problem("PERMISSION_DENIED", f"key {key.name!r} may not use model {model!r}")
        if admitted.over:
            raise limits.exhausted(self.settings.rate_limit)
        return admitted

    # --- submitting ----------------------------------------------------------------------

    async def submit(self, request: Request, key: keys.ApiKey, model: str, body: bytes,
                     jobs: list[dict[str, Any]], options: payloads.JobInputs
                     ) -> tuple[list[str], list[AsyncJobHandle]]:
        """Submit ``jobs`` (one: ``submit``, more: ``submit_many``) once per Idempotency-Key,
        each job's owner recorded in the same transaction; returns the job IDs, and their
        handles ([] when an earlier request submitted them)."""
        reservation = None
        idempotency = request.headers.get("idempotency-key")
        if idempotency is not None:
            route = str(request.scope.get("route") and request.scope["route"].path)
            mark = limits.fingerprint(model, body, route)
            found = await _redis(limits.reserve(self.redis, key.id, idempotency, mark,
                                                self.settings.idempotency_ttl_s))
            if isinstance(found, list):
                bind(request, job_ids=found, replayed=True)
                return found, []
            reservation = found
        try:
            handles = await self._submit(key, model, jobs, options)
        except BaseException:
            if reservation is not None:
                with contextlib.suppress(Exception):
                    await reservation.release(self.redis)
            raise
        ids = [h.id for h in handles]
        if reservation is not None:
            await _redis(reservation.record(self.redis, ids))
        JOBS.labels(model).inc(len(ids))
        bind(request, job_ids=ids)
        return ids, handles

    async def _submit(self, key: keys.ApiKey, model: str, jobs: list[dict[str, Any]],
                      options: payloads.JobInputs) -> list[AsyncJobHandle]:
        version = await self.version(model, options.version)
        owner = (keys.JOB_OWNER_PREFIX, key.id, self.settings.idempotency_ttl_s)
        if len(jobs) == 1:
            handle = await self.client.submit(model, jobs[0], version=version,
                                              deadline=options.deadline_s,
                                              priority=options.priority, mark=owner)
            return [handle]
        handles = await self.client.submit_many(model, jobs, version=version,
                                                deadline=options.deadline_s,
                                                priority=options.priority, mark=owner)
        return handles

    async def version(self, model: str, version: int | str | None) -> int | None:
        """The version to pin: a number as it is, ``latest`` the highest served, an alias
        the version its route names (``inferq alias``); None leaves it to the route."""
        if not isinstance(version, str):
            return version
        # The clients' resolution, on the route as it is now (a client's is up to 1 s old).
        latest = version == "latest"
        info = await self.client.model(model) if latest else None
        route = Route() if latest else Route.from_json(
            await _redis(self.redis.get(route_key(model))))
        pinned, _ = pin(model, route, version, "", info)
        return pinned

    @staticmethod
    def owned(request: Request, caller: Admitted, job_id: str) -> None:
        """404 unless ``job_id`` was submitted with the caller's key (another key's job does
        not exist for this one)."""
        bind(request, job_ids=[job_id])
        if caller.owner != caller.key.id:
            raise Problem("NOT_FOUND", f"no job {job_id} for this API key", job_id=job_id)

    # --- served models -----------------------------------------------------------------

    async def refresh(self, app: FastAPI) -> None:
        """Re-read the served models; rebuild the OpenAPI document when they changed."""
        models = dict(await self.client.models())
        if _signatures(models) != _signatures(self.models):
            self.models = models
            app.openapi_schema = None

    async def refresh_forever(self, app: FastAPI) -> None:
        while True:
            try:
                await self.refresh(app)
            except Exception as exc:  # Redis away: keep the last document
                log.warning("models refresh failed", error=str(exc))
            await asyncio.sleep(self.settings.refresh_s)


def _signatures(models: dict[str, ModelInfo]) -> list[tuple[str, Any]]:
    return sorted((n, (i.versions, [s.to_json() for s in i.inputs],
                       [s.to_json() for s in i.outputs])) for n, i in models.items())


async def _redis(awaitable: Any) -> Any:
    """Redis failures of the gateway's own calls as inferq errors (503, 429)."""
    try:
        return await awaitable
    except redis.exceptions.RedisError as exc:
        error = redis_failure(exc)
        if error is None:
            raise
        raise error from exc


# --- bodies and answers ----------------------------------------------------------------


def _content_type(request: Request) -> str:
    kind = request.headers.get("content-type", JSON).split(";")[0].strip().lower()
    if kind in ("application/msgpack", payloads.MSGPACK):
        return payloads.MSGPACK
    if kind == JSON:
        return JSON
    raise Problem("INVALID_ARGUMENT", f"content type {kind!r} is not accepted: send "
                  f"{JSON} or {payloads.MSGPACK}", status=415)


async def _body(request: Request) -> tuple[bytes, Any, str]:
    kind = _content_type(request)
    raw = await request.body()
    if kind == payloads.MSGPACK:
        return raw, payloads.unpack(raw), kind
    try:
        return raw, orjson.loads(raw), kind
    except orjson.JSONDecodeError as exc:
        raise Problem("INVALID_ARGUMENT", f"the body is not valid JSON: {exc}") from None


def _wants_msgpack(request: Request) -> bool:
    accept = request.headers.get("accept", "")
    return payloads.MSGPACK in accept or "application/msgpack" in accept


def _status_url(request: Request, job_id: str) -> str:
    # The path of read_job, without url_for's walk over every route.
    return f"{request.scope.get('root_path', '')}/v1/jobs/{job_id}"


def _accepted(request: Request, job_id: str) -> dict[str, str]:
    return {"job_id": job_id, "status_url": _status_url(request, job_id)}


def _wait(value: float | None, default: float, settings: GatewaySettings) -> float:
    if value is None:
        return default
    if not math.isfinite(value) or value < 0:
        raise Problem("INVALID_ARGUMENT", f"wait must be a number of seconds >= 0, got {value}")
    return min(value, settings.max_wait_s)


def _done(request: Request, result: JobResult) -> Response:
    doc: dict[str, Any] = {"job_id": result.id, "status": "SUCCESS", "model": result.model,
                           "version": result.version, "worker": result.worker,
                           "batch_size": result.batch_size, "timings_ms": result.timings_ms}
    if _wants_msgpack(request):
        doc["outputs"] = payloads.msgpack_outputs(result)
        return Response(payloads.pack(doc), media_type=payloads.MSGPACK)
    doc["outputs"] = payloads.json_outputs(result)
    return Response(orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY), media_type=JSON)


def _problem(request: Request, problem: Problem) -> JSONResponse:
    request.state.code = problem.code
    return JSONResponse(problem.document(request.url.path), status_code=problem.status,
                        headers=problem.headers, media_type=PROBLEM_JSON)


def _responses(*codes: int, ok: tuple[int, type[Any]] | None = None) -> dict[int | str, Any]:
    out: dict[int | str, Any] = {}
    if ok is not None:
        out[ok[0]] = {"model": ok[1]}
    for code in codes:
        out[code] = {"model": schemas.ProblemDoc, "content": {PROBLEM_JSON: {}}}
    return out


# --- the app ---------------------------------------------------------------------------


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    """The gateway's ASGI app; the asyncio client starts with it (lifespan)."""
    settings = settings or GatewaySettings.from_env()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        require_verified_tls(settings.broker_url)
        client = AsyncInferenceClient(settings.broker_url, settings.result_url,
                                      queue_without_workers=settings.queue_without_workers)
        r = aioredis.Redis.from_url(settings.broker_url, socket_timeout=2.0,
                                    socket_connect_timeout=2.0)
        gateway = app.state.gateway = Gateway(settings, client, r)
        with contextlib.suppress(Exception):
            await gateway.refresh(app)
        refresher = asyncio.create_task(gateway.refresh_forever(app))
        revocations = asyncio.create_task(gateway.admission.listen())
        try:
            yield
        finally:
            for task in (refresher, revocations):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await client.close()
            await r.aclose()

    app = _App(
        title="inferq gateway",
        version="1",
        description="Asynchronous ONNX inference over HTTP: submit jobs, read their results. "
                    "Errors are RFC 9457 problem details with inferq's stable `code`.",
        docs_url=None, redoc_url=None, lifespan=lifespan,
        openapi_tags=[{"name": "jobs"}, {"name": "models"}, {"name": "operations"}],
    )
    app.add_middleware(Observe, max_body_bytes=settings.max_body_bytes)
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins),
                           allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "Idempotency-Key"],
                           expose_headers=["Location", "Retry-After", "X-Request-ID"])
    _errors(app)
    _routes(app)
    _docs(app)
    if not settings.cors_origins:
        app.fast = _FastPath(app, settings.max_body_bytes)
    return app


class _App(FastAPI):
    """FastAPI, with the job routes' usual requests taken by :class:`_FastPath`."""

    fast: _FastPath | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.fast is not None and scope["type"] == "http" and self.fast.take(scope):
            await self.fast.observed(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


#: The routes the fast path takes: (method, route name).
_FAST_ROUTES = (("POST", "predict"), ("POST", "submit_job"), ("GET", "read_job"))


class _FastPath:
    """The job routes' endpoints called straight from the ASGI scope, for the requests
    that need nothing of the framework's: Starlette's middleware stack, route search and
    FastAPI's dependency solving cost more than the rest of a ``:predict``.

    The same endpoint functions, the same route matching (each route's own regex), the
    same bearer parsing and the same error answers; a request with anything else in its
    query than a valid ``wait`` takes the framework's path (and its validation errors).
    """

    def __init__(self, app: FastAPI, max_body_bytes: int) -> None:
        self.app = app
        self.routes: list[tuple[str, APIRoute]] = [
            (method, route) for method, name in _FAST_ROUTES for route in app.routes
            if isinstance(route, APIRoute) and route.name == name]
        self.observed = Observe(self._serve, max_body_bytes=max_body_bytes)

    def take(self, scope: Scope) -> bool:
        """Whether this request is one the fast path answers (it records the route)."""
        method, path = scope["method"], scope["path"]
        for want, route in self.routes:
            if method != want:
                continue
            match = route.path_regex.match(path)
            if match is None:
                continue
            wait = _query_wait(scope.get("query_string", b""))
            if wait is False:
                return False
            scope["route"] = route
            scope["path_params"] = match.groupdict()
            scope["inferq.wait"] = wait
            return True
        return False

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope["app"] = self.app
        request = Request(scope, receive, send)
        route: APIRoute = scope["route"]
        kwargs: dict[str, Any] = dict(scope["path_params"])
        if route.name != "submit_job":
            kwargs["wait"] = scope["inferq.wait"]
        try:
            response = await route.endpoint(request=request, creds=await _bearer(request),
                                            **kwargs)
        except Problem as exc:
            response = _problem(request, exc)
        except InferqError as exc:
            response = _problem(request, from_error(exc))
        except TooLarge:
            raise  # Observe answers 413
        except Exception as exc:
            log.exception("unexpected error", path=scope["path"])
            response = _problem(request, Problem("INTERNAL", f"{type(exc).__name__}: {exc}"))
        await response(scope, receive, send)


_WAIT = re.compile(rb"wait=([0-9]{1,9}(?:\.[0-9]{1,9})?)")


def _query_wait(query: bytes) -> float | bool | None:
    """``?wait=S`` as a float, None without it; False for anything else (another
    parameter, a value in another form), which the framework's path answers."""
    if not query:
        return None
    match = _WAIT.fullmatch(query)
    return False if match is None else float(match.group(1))


def _errors(app: FastAPI) -> None:
    @app.exception_handler(Problem)
    async def problem(request: Request, exc: Problem) -> JSONResponse:
        return _problem(request, exc)

    @app.exception_handler(InferqError)
    async def inferq_error(request: Request, exc: InferqError) -> JSONResponse:
        return _problem(request, from_error(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        where = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                          for e in exc.errors())
        return _problem(request, Problem("INVALID_ARGUMENT", where))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "NOT_FOUND", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED"}.get(
            exc.status_code, "INVALID_ARGUMENT" if exc.status_code < 500 else "INTERNAL")
        return _problem(request, Problem(code, str(exc.detail), status=exc.status_code))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error", path=request.url.path)
        return _problem(request, Problem("INTERNAL", f"{type(exc).__name__}: {exc}"))


def _gateway(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


def _routes(app: FastAPI) -> None:
    job_errors = _responses(400, 401, 403, 404, 409, 413, 415, 429, 503)

    @app.post("/v1/models/{model}/jobs", status_code=202, tags=["jobs"],
              summary="Submit a job", response_model=schemas.JobAccepted,
              responses=job_errors, openapi_extra=openapi.request_body("JobRequest"))
    async def submit_job(model: str, request: Request, creds: Creds) -> Response:
        """Queue one job; answer at once with its ID and where to read it. With an
        `Idempotency-Key` header, a repeat within a day returns the same job."""
        gw = _gateway(request)
        key = (await gw.authorize(request, creds, "submit", model)).key
        raw, body, kind = await _body(request)
        job = payloads.job(body, kind)
        [job_id], _ = await gw.submit(request, key, model, raw, [job.inputs], job)
        doc = _accepted(request, job_id)
        return JSONResponse(doc, status_code=202, headers={"Location": doc["status_url"]})

    @app.post("/v1/models/{model}/jobs:batch", status_code=202, tags=["jobs"],
              summary="Submit many jobs", response_model=schemas.BatchAccepted,
              responses=job_errors, openapi_extra=openapi.request_body("BatchRequest"))
    async def submit_batch(model: str, request: Request, creds: Creds) -> Response:
        """Queue many jobs of one model in one request (one transaction); each gets its own
        ID, in the order given."""
        gw = _gateway(request)
        key = (await gw.authorize(request, creds, "submit", model)).key
        raw, body, kind = await _body(request)
        jobs, options = payloads.batch(body, kind)
        ids, _ = await gw.submit(request, key, model, raw, jobs, options)
        return JSONResponse({"jobs": [_accepted(request, i) for i in ids]}, status_code=202)

    @app.get("/v1/jobs/{job_id}", name="read_job", tags=["jobs"], summary="Read a job",
             responses={200: {"model": schemas.JobDone | schemas.JobFailedDoc,
                              "description": "SUCCESS with outputs, or FAILURE with error"},
                        202: {"model": schemas.JobPending, "description": "still pending"},
                        **_responses(400, 401, 403, 404, 429, 503)})
    async def read_job(job_id: str, request: Request, creds: Creds,
                       wait: float | None = None) -> Response:
        """The job's status and, once done, its outputs. `?wait=S` waits up to S seconds
        (at most the gateway's limit) for a pending job before answering 202."""
        gw = _gateway(request)
        gw.owned(request, await gw.authorize(request, creds, "read", job_id=job_id), job_id)
        timeout = _wait(wait, 0.0, gw.settings)
        try:
            [outcome] = await gw.client.outcomes([job_id], timeout=timeout)
        except JobTimeout:
            return JSONResponse({"job_id": job_id, "status": "PENDING"}, status_code=202,
                                headers={"Retry-After": "1"})
        if isinstance(outcome, UnknownJob):
            raise Problem("NOT_FOUND", f"no job {job_id} (its result expired, or Redis lost "
                          "it)", job_id=job_id)
        if isinstance(outcome, JobFailed):
            return JSONResponse({"job_id": job_id, "status": "FAILURE", "model": outcome.model,
                                 "error": failure(outcome)})
        return _done(request, outcome)

    @app.post("/v1/models/{model}:predict", tags=["jobs"], summary="Submit and wait",
              responses={200: {"model": schemas.JobDone},
                         **_responses(400, 401, 403, 404, 409, 413, 415, 429, 500, 503, 504)},
              openapi_extra=openapi.request_body("JobRequest"))
    async def predict(model: str, request: Request, creds: Creds,
                      wait: float | None = None) -> Response:
        """Submit one job and wait for its result (`?wait=S`, default 30 s): 200 with the
        outputs, the job's error as a problem, or 504 WAIT_TIMEOUT with the job ID to read
        later."""
        gw = _gateway(request)
        key = (await gw.authorize(request, creds, "submit", model)).key
        timeout = _wait(wait, gw.settings.predict_wait_s, gw.settings)
        raw, body, kind = await _body(request)
        job = payloads.job(body, kind)
        [job_id], handles = await gw.submit(request, key, model, raw, [job.inputs], job)
        try:
            # A fresh handle waits for its notification without a first read.
            result = await (handles[0].result(timeout) if handles
                            else gw.client.result(job_id, timeout=timeout))
        except JobTimeout:
            status_url = _status_url(request, job_id)
            raise Problem("WAIT_TIMEOUT", f"no result within {timeout} s; the job may still "
                          f"finish: GET {status_url}", job_id=job_id, model=model,
                          headers={"Location": status_url}) from None
        except JobFailed as exc:
            if exc.model is None:
                exc.model = model
            raise from_error(exc) from None
        return _done(request, result)

    @app.get("/v1/models", tags=["models"], summary="Served models",
             response_model=schemas.ModelsDoc, responses=_responses(401, 403, 429, 503))
    async def list_models(request: Request, creds: Creds) -> Response:
        """Models live workers serve now (those this key may use), with their versions and
        signatures."""
        gw = _gateway(request)
        key = (await gw.authorize(request, creds, "read")).key
        models = await gw.client.models(refresh=False)
        return JSONResponse({"models": [_model_doc(i) for n, i in sorted(models.items())
                                        if key.allows_model(n)]})

    @app.get("/v1/models/{model}", tags=["models"], summary="One served model",
             response_model=schemas.ModelDoc, responses=_responses(401, 403, 404, 429, 503))
    async def get_model(model: str, request: Request, creds: Creds) -> Response:
        gw = _gateway(request)
        await gw.authorize(request, creds, "read", model)
        info = (await gw.client.models(refresh=False)).get(model)
        if info is None:
            raise Problem("NOT_FOUND", f"model {model!r} is not served")
        return JSONResponse(_model_doc(info))

    @app.get("/healthz", tags=["operations"], summary="The process answers")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["operations"], summary="Redis answers and a model is served",
             responses=_responses(503))
    async def readyz(request: Request) -> Response:
        gw = _gateway(request)
        try:
            await _redis(gw.redis.ping())
            models = await gw.client.models()
        except InferqError as exc:
            raise Problem("UNAVAILABLE", f"Redis does not answer: {exc.message}") from None
        if not models:
            raise Problem("UNAVAILABLE", "no live worker serves any model yet")
        return JSONResponse({"status": "ready", "models": sorted(models)})

    @app.get("/metrics", tags=["operations"], summary="Prometheus metrics",
             include_in_schema=True)
    async def metrics() -> Response:
        body, kind = metrics_body()
        return Response(body, media_type=kind)


def _model_doc(info: ModelInfo) -> dict[str, Any]:
    def specs(items: Sequence[Any]) -> list[dict[str, Any]]:
        return [{"name": s.name, "datatype": payloads.datatype(s.dtype),
                 "shape": list(s.shape)} for s in items]

    return {"name": info.name, "description": info.description, "versions": info.versions,
            "inputs": specs(info.inputs), "outputs": specs(info.outputs),
            "max_batch_rows": info.max_batch_rows}


def _docs(app: FastAPI) -> None:
    app.mount(openapi.STATIC_PATH, StaticFiles(directory=openapi.static_dir()), name="docs")

    def document() -> dict[str, Any]:
        if app.openapi_schema is None:
            gateway: Gateway | None = getattr(app.state, "gateway", None)
            app.openapi_schema = openapi.build(app, gateway.models if gateway else {})
        return app.openapi_schema

    app.openapi = document  # type: ignore[method-assign]

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json", title="inferq gateway",
            swagger_js_url=f"{openapi.STATIC_PATH}/swagger-ui-bundle.js",
            swagger_css_url=f"{openapi.STATIC_PATH}/swagger-ui.css",
            swagger_favicon_url=f"{openapi.STATIC_PATH}/favicon.png")
