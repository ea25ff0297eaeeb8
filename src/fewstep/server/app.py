"""The app factory: `create_app(engine, catalog, options)` -> FastAPI. No global state: the
engine, queue, metrics and catalogue belong to the app (`app.state.service`)."""

from __future__ import annotations

import contextlib
import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..errors import FewstepError
from .auth import AuthMiddleware
from .catalog import Catalog
from .errors import (
    BadBody,
    InternalError,
    PayloadTooLarge,
    QueueFull,
    ShuttingDown,
    error_body,
    error_payload,
    from_validation_errors,
)
from .service import ClientGone, ServerOptions, Service

log = logging.getLogger("fewstep.server")

__all__ = ["create_app", "ServerOptions", "Catalog"]


class BodyLimitMiddleware:
    """Pure ASGI: refuse bodies over `limit` bytes with 413 before anything decodes them --
    at once from Content-Length, or while streaming (chunked uploads). The body is buffered
    (it is bounded) and replayed; later `receive` calls pass through, so a disconnect is
    still seen by the handler."""

    def __init__(self, app, limit: int, on_reject=None):
        self.app = app
        self.limit = limit
        self.on_reject = on_reject

    async def _reject(self, send):
        if self.on_reject is not None:
            self.on_reject()
        exc = PayloadTooLarge(f"the body is over the limit of {self.limit} bytes",
                              field="body")
        body = json.dumps(error_body(exc)).encode()
        await send({"type": "http.response.start", "status": 413, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared > self.limit:
                    return await self._reject(send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                return await self._reject(send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def create_app(engine, catalog: Catalog | None = None,
               options: ServerOptions | None = None) -> FastAPI:
    """The service over `engine`. `catalog` maps the names clients may use to references."""
    catalog = catalog or Catalog()
    options = options or ServerOptions()
    service = Service(engine, catalog, options)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.queue.start()
        try:
            yield
        finally:
            service.queue.stop()

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
    )
    app.state.service = service
    service.queue.start()  # also without a lifespan (some test clients skip it)

    def rejected(kind):
        return lambda: service.metrics.errors.labels(kind).inc()

    # outermost first: auth, then the body limit (no body is read for a rejected key)
    app.add_middleware(BodyLimitMiddleware, limit=options.max_body_bytes,
                       on_reject=rejected(PayloadTooLarge.kind))
    app.add_middleware(AuthMiddleware, api_key=options.api_key, on_reject=rejected("unauthorized"))

    _install_error_handlers(app, service)

    from . import a1111, native, openai_api, studio

    app.include_router(native.router(service))
    app.include_router(openai_api.router(service))
    app.include_router(a1111.router(service))
    app.include_router(studio.router(service))
    return app


def typed_response(service: Service, exc: FewstepError) -> JSONResponse:
    service.count_error(exc)
    headers = dict(getattr(exc, "headers", None) or {})
    if isinstance(exc, QueueFull):
        headers.setdefault("Retry-After", str(service.queue.retry_after()))
    if isinstance(exc, ShuttingDown):
        headers.setdefault("Retry-After", "30")
    return JSONResponse(error_body(exc, service.redact), status_code=exc.http_status,
                        headers=headers or None)


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
        return typed_response(service, from_validation_errors(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        kinds = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}
        if exc.status_code == 400:
            error = BadBody("the body could not be parsed (malformed JSON, form or encoding)",
                            field="body")
            return typed_response(service, error)
        service.metrics.errors.labels(kinds.get(exc.status_code, "http_error")).inc()
        message = {404: "no such endpoint", 405: "method not allowed"}.get(
            exc.status_code, "request refused")
        return JSONResponse(error_payload(kinds.get(exc.status_code, "http_error"), message),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, exc: ClientGone):
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        error = InternalError()
        service.count_error(error)
        return JSONResponse(error_body(error), status_code=500)
