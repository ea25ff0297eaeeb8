"""Jobs: state, result, server-sent events, cancellation; and the files kept for OpenAI `url`
responses."""

from __future__ import annotations

import asyncio
import contextlib
import json

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from ..backend import FINAL
from ..convert.native import job_info
from ..errors import JobNotFound
from ..protocol.common import ERRORS, ErrorResponse
from ..protocol.native import JobInfo
from .common import json_response

KEEP_ALIVE_S = 15.0


def sse(event: dict) -> bytes:
    return f"event: {event['event']}\ndata: {json.dumps(event)}\n\n".encode()


def router(service) -> APIRouter:
    api = APIRouter(tags=["jobs"])
    backend = service.backend

    @api.get("/v1/jobs", response_model=list[JobInfo])
    async def list_jobs():
        """Recent jobs, oldest first (results left out)."""
        return [job_info(view, service.redact, False) for view in await backend.jobs()]

    @api.get("/v1/jobs/{job_id}", response_model=JobInfo, responses=ERRORS)
    async def get_job(job_id: str):
        """A job's state, with its result once done."""
        return await json_response(job_info(await backend.get(job_id), service.redact))

    @api.delete("/v1/jobs/{job_id}", response_model=JobInfo, responses=ERRORS)
    async def cancel_job(job_id: str):
        """Cancel: a queued job never runs; a running one stops at its next step."""
        return job_info(await backend.cancel(job_id), service.redact, False)

    @api.post("/v1/jobs/{job_id}/cancel", response_model=JobInfo, responses=ERRORS)
    async def cancel_job_post(job_id: str):
        """The same as DELETE /v1/jobs/{job_id}."""
        return await cancel_job(job_id)

    @api.get("/v1/jobs/{job_id}/events", responses={
        200: {"content": {"text/event-stream": {}}, "description": (
            "Server-sent events: `state` (at once), `started`, `progress` {step, total} after "
            "every denoising step, `preview` {step, image} (a small PNG of the latents), then "
            "one of `done`, `failed`, `cancelled`, `expired`.")},
        **ERRORS})
    async def job_events(request: Request, job_id: str):
        await backend.get(job_id)  # an unknown id is a typed 404, before the stream starts
        return StreamingResponse(_stream(job_id), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    async def _stream(job_id: str):
        events = backend.events(job_id).__aiter__()
        upcoming = asyncio.ensure_future(events.__anext__())
        try:
            while True:
                done, _ = await asyncio.wait({upcoming}, timeout=KEEP_ALIVE_S)
                if not done:
                    yield b": keep-alive\n\n"
                    continue
                try:
                    event = upcoming.result()
                except StopAsyncIteration:
                    return
                if event["event"] == "state" or event["event"] in FINAL:
                    with contextlib.suppress(JobNotFound):  # forgotten meanwhile: as it came
                        event = {"event": event["event"],
                                 **job_info(await backend.get(job_id), service.redact, False)}
                yield sse(event)
                if event["event"] in FINAL:
                    return
                upcoming = asyncio.ensure_future(events.__anext__())
        finally:
            upcoming.cancel()  # ends the backend's iterator too (it stops watching the job)
            with contextlib.suppress(BaseException):
                await upcoming
            await events.aclose()

    @api.get("/v1/files/{token}", tags=["files"], responses={
        200: {"content": {"image/png": {}, "image/gif": {}}}, 404: {"model": ErrorResponse}})
    async def get_file(token: str):
        """An image produced for an OpenAI `url` response (kept for a while, then dropped)."""
        entry = service.files.get(token.removesuffix(".png").removesuffix(".gif"))
        if entry is None:
            raise JobNotFound("no such file (or it has expired)", field="token")
        return Response(entry[0], media_type=entry[1])

    return api
