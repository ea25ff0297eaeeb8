"""The app factory: `create_app(engine, catalog, options)` -> FastAPI. No global state: the
backend, metrics, catalogue and kept files belong to the app (`app.state.service`)."""

from __future__ import annotations

import contextlib
import functools
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from ..version import __version__
from ..errors import FewstepError
from .auth import AuthMiddleware, check_api_key
from .backend import Backend
from .catalog import Catalog
from .errors import (
    BadBody,
    error_body,
    error_headers,
    error_payload,
    from_validation_errors,
    status_for,
)
from .hosts import HostAndOriginMiddleware
from .metrics import Metrics
from .middleware import BodyMiddleware, CatchAllMiddleware
from .routes.common import ClientGone
from .service import ServerOptions, Service

log = logging.getLogger("fewstep.server")

__all__ = ["create_app", "ServerOptions", "Catalog"]


def create_app(engine=None, catalog: Catalog | None = None,
               options: ServerOptions | None = None, *, backend: Backend | None = None
               ) -> FastAPI:
    """The service over `engine` (run by the local queue and worker), or over any other
    `backend`. `catalog` maps the names clients may use to references."""
    from .convert.common import encode_result
    from .local import LocalBackend

    catalog = catalog or Catalog()
    options = options or ServerOptions()
    check_api_key(options.api_key)
    metrics = Metrics()
    if backend is None:
        from .service import default_max_batch

        max_batch = options.max_batch or default_max_batch(getattr(engine, "device", "cpu"))
        backend = LocalBackend(engine, functools.partial(encode_result, catalog=catalog),
                               max_size=options.queue_size, metrics=metrics,
                               retention=options.job_retention,
                               retention_bytes=options.job_retention_bytes,
                               max_batch=max_batch, batch_wait_s=options.batch_wait_ms / 1000)
    metrics.queue_limit.set(options.queue_size)
    service = Service(backend, catalog, options, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        backend.start()
        try:
            yield
        finally:
            backend.stop()

    app = FastAPI(
        title="fewstep",
        version=__version__,
        summary="Few-step image and animation generation with LCM-LoRA",
        description=(
            "Native API under /v1/ (one endpoint per workflow; jobs with progress events), "
            "the OpenAI images API (/v1/images/generations, /v1/images/edits) and an "
            "AUTOMATIC1111 API subset (/sdapi/v1/...). Errors are "
            '`{"error": {"type", "message", "field"}}`.'),
        lifespan=lifespan,
        docs_url=None,  # /docs is api_docs' page, with its assets from the package (offline)
        redoc_url=None,  # ReDoc would load from a CDN: blank offline
        # Starlette's redirect is built from the client's Host header: ours is relative
        redirect_slashes=False,
    )
    app.state.service = service
    backend.start()  # also without a lifespan (some test clients skip it)

    def count(kind):
        service.metrics.errors.labels(kind).inc()

    # outermost first: the catch-all, Host and Origin, auth, then the body (no body is read for
    # a refused request)
    app.add_middleware(BodyMiddleware, limit=options.max_body_bytes,
                       timeout_s=options.body_timeout_s, on_reject=count)
    app.add_middleware(AuthMiddleware, api_key=options.api_key,
                       on_reject=lambda: count("unauthorized"))
    app.add_middleware(HostAndOriginMiddleware, allowed_hosts=options.allowed_hosts,
                       api_key=options.api_key, on_reject=count)
    app.add_middleware(CatchAllMiddleware, on_error=service.count_error)

    _install_error_handlers(app, service)

    from .api_docs import router as api_docs_router
    from .studio import router as studio_router
    from .routes import a1111, catalogue, health, jobs, native, openai

    app.include_router(native.router(service))
    app.include_router(jobs.router(service))
    app.include_router(openai.router(service))
    app.include_router(a1111.router(service))
    app.include_router(catalogue.router(service))
    app.include_router(health.router(service))
    app.include_router(studio_router(service))
    app.include_router(api_docs_router(title=app.title, openapi_url=app.openapi_url))
    return app


def typed_response(service: Service, exc: FewstepError) -> JSONResponse:
    """The one place a typed error becomes an HTTP answer."""
    service.count_error(exc)
    return JSONResponse(error_body(exc, service.redact), status_code=status_for(exc),
                        headers=error_headers(exc) or None)


def _install_error_handlers(app: FastAPI, service: Service) -> None:
    @app.exception_handler(FewstepError)
    async def fewstep_error(request: Request, exc: FewstepError):
        response = typed_response(service, exc)
        job_id = getattr(request.state, "job_id", None)
        if job_id:
            response.headers["X-Job-Id"] = job_id
        return response

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return typed_response(service, from_validation_errors(
            exc.errors(), value=getattr(exc, "body", None), located=True))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            target = _without_trailing_slash(app, request.scope)
            if target is not None:
                return RedirectResponse(target, status_code=307)
        if exc.status_code == 400:
            return typed_response(service, BadBody(
                "the body could not be parsed (malformed JSON, form or encoding)", field="body"))
        kinds = {404: "not_found", 405: "method_not_allowed"}
        kind = kinds.get(exc.status_code, "http_error")
        service.metrics.errors.labels(kind).inc()
        message = {404: "no such endpoint", 405: "method not allowed"}.get(
            exc.status_code, "request refused")
        field = "path" if exc.status_code == 404 else "method" if exc.status_code == 405 \
            else None
        return JSONResponse(error_payload(kind, message, field), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, exc: ClientGone):
        return Response(status_code=499)


def _without_trailing_slash(app: FastAPI, scope) -> str | None:
    """`/v1/jobs/` -> `/v1/jobs` (with the query) when that path is a route: a relative
    Location, never one built from the client's Host header."""
    path = scope.get("path", "")
    if len(path) < 2 or not path.endswith("/"):
        return None
    trimmed = {**scope, "path": path.rstrip("/") or "/"}
    if not any(route.matches(trimmed)[0] != Match.NONE for route in app.router.routes):
        return None
    query = scope.get("query_string", b"").decode("latin-1")
    return trimmed["path"] + (f"?{query}" if query else "")
