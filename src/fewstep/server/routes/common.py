"""What the routes share: running a job for a waiting client (a disconnect cancels it), request
metrics, and JSON answers rendered off the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import time

from fastapi import Request
from fastapi.responses import Response

from ...errors import FewstepError
from ..backend import JobView
from ..convert.common import json_bytes
from ..errors import BadBody, about_input


class ClientGone(Exception):
    """The client disconnected while its job waited or ran."""


async def run_job(service, http_request, workflow: str, request,
                  timeout_s: float | None = None) -> JobView:
    """Submit and wait; a disconnect cancels the job. Raises the job's error, if any."""
    backend = service.backend
    view = await backend.submit(workflow, request, timeout_s=service.timeout(timeout_s))
    http_request.state.job_id = view.id
    finished = asyncio.ensure_future(backend.wait(view.id))
    gone = asyncio.ensure_future(_disconnected(http_request))
    try:
        done, _ = await asyncio.wait({finished, gone}, return_when=asyncio.FIRST_COMPLETED)
        if finished not in done:
            await backend.cancel(view.id)
            raise ClientGone(view.id)
        view = finished.result()
    finally:
        finished.cancel()
        gone.cancel()
    if view.error is not None:
        # a copy: raising the kept error itself would tie this request's frames to the job
        raise copy.copy(view.error)
    return view


async def _disconnected(http_request) -> None:
    """Returns when the client has gone (the body was read already, so the next ASGI message
    is the disconnect)."""
    while True:
        message = await http_request.receive()
        if message["type"] == "http.disconnect":
            return


@contextlib.asynccontextmanager
async def counted(service, workflow: str):
    """Counts a generation request by workflow and outcome; the body sets `outcome["status"]`
    ("ok", "accepted") when it gets that far."""
    started = time.perf_counter()
    outcome = {"status": "error"}
    try:
        yield outcome
    finally:
        service.metrics.requests.labels(workflow, outcome["status"]).inc()
        service.metrics.request_seconds.labels(workflow).observe(time.perf_counter() - started)


async def converted(convert, *args):
    """`convert(*args)` -- a request's parsing, checks and conversion -- in a worker thread.
    Its errors are about the client's own values (see `errors.about_input`)."""
    try:
        return await asyncio.to_thread(convert, *args)
    except FewstepError as exc:
        raise about_input(exc) from None


async def json_response(payload, status_code: int = 200, headers: dict | None = None,
                        ) -> Response:
    """A JSON answer rendered in a worker thread (results carry megabytes of base64)."""
    body = await asyncio.to_thread(json_bytes, payload)
    return Response(body, status_code=status_code, headers=headers,
                    media_type="application/json")


async def read_form(request: Request, max_files: int, max_fields: int, max_part_size: int):
    """(text fields, file bytes) of a multipart body; unparseable -> a typed 400."""
    try:
        form = await request.form(max_files=max_files, max_fields=max_fields,
                                  max_part_size=max_part_size)
    except Exception as exc:  # noqa: BLE001 - python-multipart's many parse errors
        raise BadBody(f"the multipart body could not be parsed ({type(exc).__name__})",
                      field="body") from None
    try:
        fields, files = {}, {}
        for key, value in form.multi_items():
            if isinstance(value, str):
                fields[key] = value
            else:
                files.setdefault(key, [])
                files[key].append(await value.read())
        return fields, files
    finally:
        await form.close()
