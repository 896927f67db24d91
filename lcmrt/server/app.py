"""The ASGI app of `lcmrt serve`: `/health`, Prometheus `/metrics`, the web UI API subset (`sdapi`) and lcmrt's own
API (`lcmrt_api`), in front of one job queue (`scheduler`).

Errors are JSON `{"detail": message}`: 422 for a bad request (lcmrt's InputError, GenerationError, AdapterError and
pydantic's validation), 429 with Retry-After when the queue is full, 503 when a request waited past the timeout,
401 without the API key, 500 when the engine folder or backend fails (its message, no traceback).
"""
from __future__ import annotations

import hmac
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from ..errors import AdapterError, GenerationError, InputError, LcmrtError
from ..pipeline import Pipeline
from . import lcmrt_api, sdapi
from .metrics import ServerMetrics
from .scheduler import JobExpired, QueueFull, Scheduler
from .state import ServerState

OPEN_PATHS = ("/health",)  # answered without the API key: load balancers probe it
# prompts and settings are small; a larger body is refused (413) before it is read into memory
MAX_BODY_BYTES = 1 << 20
BAD_REQUEST = (InputError, GenerationError, AdapterError)


def create_app(pipelines: dict[str, Pipeline], queue_size: int = 16, timeout: float = 300.0,
               api_key: str | None = None) -> FastAPI:
    """The server for `pipelines` ({model name: pipeline}; the first is the default model): at most `queue_size`
    requests wait, none longer than `timeout` seconds; with `api_key`, every endpoint but /health needs the header
    `Authorization: Bearer <api_key>`."""
    if not pipelines:
        raise InputError("The server needs at least one model: pass one or more engine folders.")
    if queue_size < 1 or not timeout > 0:
        raise InputError(f"queue_size={queue_size!r} and timeout={timeout!r} must be positive: the queue must hold "
                         "a request, and a request must be allowed to wait.")
    if api_key is not None and not api_key:
        raise InputError("The API key is empty; give a non-empty key, or none to serve without one.")
    metrics = ServerMetrics(list(pipelines))
    state = ServerState(pipelines, Scheduler(pipelines, queue_size, timeout, metrics), metrics, next(iter(pipelines)))

    @asynccontextmanager
    async def lifespan(app):
        state.scheduler.start()
        try:
            yield
        finally:
            state.scheduler.stop()

    app = FastAPI(title="lcmrt", lifespan=lifespan, max_body_size=MAX_BODY_BYTES)
    app.state.lcmrt = state
    app.include_router(sdapi.router)
    app.include_router(lcmrt_api.router)
    _add_error_handlers(app)

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": list(pipelines), "queue_depth": state.scheduler.depth}

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(metrics.exposition(), media_type=metrics.content_type)

    if api_key is not None:
        _require_key(app, api_key)
    _count_requests(app, metrics)  # added last: the outermost middleware, so it counts the 401s too
    return app


def _add_error_handlers(app: FastAPI) -> None:
    def answer(status: int, message: str, headers: dict | None = None) -> JSONResponse:
        return JSONResponse({"detail": message}, status_code=status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request, error: RequestValidationError):
        return answer(422, f"Invalid request: {'; '.join(map(_problem, error.errors()))}. The request schema is at "
                           "/docs.")

    @app.exception_handler(LcmrtError)
    async def lcmrt_error(request, error: LcmrtError):
        return answer(422 if isinstance(error, BAD_REQUEST) else 500, str(error))

    @app.exception_handler(QueueFull)
    async def queue_full(request, error: QueueFull):
        return answer(429, str(error), {"Retry-After": str(error.retry_after)})

    @app.exception_handler(JobExpired)
    async def job_expired(request, error: JobExpired):
        return answer(503, str(error))


def _problem(error: dict) -> str:
    """One of pydantic's validation errors as `field: message`."""
    if error["type"] == "json_invalid":
        return f"the body is not valid JSON ({error.get('ctx', {}).get('error', error['msg'])})"
    return f"{'.'.join(str(part) for part in error['loc'][1:] or error['loc'])}: {error['msg']}"


def _require_key(app: FastAPI, api_key: str) -> None:
    expected = f"Bearer {api_key}".encode()

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        given = request.headers.get("authorization", "").encode()
        if request.url.path in OPEN_PATHS or hmac.compare_digest(given, expected):
            return await call_next(request)
        return JSONResponse({"detail": "Missing or wrong API key: send the header `Authorization: Bearer KEY` "
                                       "with the key the server was started with (--api-key)."},
                            status_code=401, headers={"WWW-Authenticate": "Bearer"})


def _count_requests(app: FastAPI, metrics: ServerMetrics) -> None:
    # requests refused before routing (401) are counted under their path where it is an endpoint's; unknown paths
    # all count as "unmatched", so that scanners cannot create a series per URL
    endpoints = set(app.openapi()["paths"])

    def endpoint(request: Request) -> str:
        route = request.scope.get("route")  # set by the router once it matched
        if route is not None:
            return route.path
        return request.url.path if request.url.path in endpoints else "unmatched"

    @app.middleware("http")
    async def count(request: Request, call_next):
        try:
            response = await call_next(request)
        except Exception:
            metrics.requests.labels(endpoint(request), "500").inc()
            raise
        metrics.requests.labels(endpoint(request), str(response.status_code)).inc()
        return response
