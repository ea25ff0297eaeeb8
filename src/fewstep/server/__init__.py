"""The HTTP service: a thin shell over the Engine (native /v1 API, OpenAI images API and an
AUTOMATIC1111 API subset).

    protocol/   request and response models per API
    convert/    protocol -> core requests, finished jobs -> answers (run in worker threads)
    routes/     thin routers: parse, convert, hand to the backend, shape the answer
    backend.py  what the routes ask of whatever runs the work (submit, wait, events, cancel...)
    local.py    that interface over one Engine: a bounded queue and one worker thread
    errors.py   service errors and the one table from error classes to HTTP statuses
    middleware.py, auth.py, metrics.py, catalog.py, service.py (options and app state)

`create_app(engine, catalog, options)` builds the FastAPI application; `fewstep serve` (see
`fewstep.server.cli`) builds the engine from flags or a config file and runs it with uvicorn."""

from __future__ import annotations

__all__ = ["create_app", "Catalog", "ServerOptions"]


def __getattr__(name):
    if name in ("create_app", "ServerOptions"):
        from . import app

        return getattr(app, name)
    if name == "Catalog":
        from .catalog import Catalog

        return Catalog
    raise AttributeError(name)
