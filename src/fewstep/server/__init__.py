"""The HTTP service: a thin shell over the Engine (native /v1 API, OpenAI images API and an
AUTOMATIC1111 API subset), with one worker draining a bounded job queue.

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
