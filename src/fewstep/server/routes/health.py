"""Liveness, readiness, the queue's status and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response


def router(service) -> APIRouter:
    api = APIRouter(tags=["health"])
    backend = service.backend

    @api.get("/healthz")
    async def healthz():
        """Liveness: work can still be done (the worker is alive)."""
        health = await backend.health()
        return JSONResponse({"status": "ok" if health.alive else health.detail},
                            status_code=200 if health.alive else 503)

    @api.get("/readyz")
    async def readyz():
        """Readiness: false while shutting down or when the worker has stopped."""
        health = await backend.health()
        return JSONResponse({"ready": health.ready}, status_code=200 if health.ready else 503)

    @api.get("/v1/status")
    async def status():
        """Queue limit and depth, the running job, readiness."""
        queue, health = await backend.queue_info(), await backend.health()
        return {"queue_limit": queue.limit, "queue_depth": queue.depth,
                "running": queue.running[0].summary() if queue.running else None,
                "ready": health.ready}

    @api.get("/metrics", response_class=Response)
    async def metrics():
        """Prometheus metrics."""
        return Response(service.metrics.render(), media_type=service.metrics.content_type)

    return api
