"""The native API: one endpoint per workflow (JSON with base64 images, or multipart uploads),
jobs with progress events and cancellation, the catalogue, health, readiness and metrics."""

import asyncio
import json
import time
from typing import Any, Optional

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from ..errors import InvalidRequest
from ..tasks import REQUESTS
from ..tasks.base import invalid_from_pydantic
from .catalog import KINDS
from .convert import BODY_MODELS, UPLOAD_MODELS, WORKFLOWS, image_from_bytes
from .errors import BadBody, JobNotFound
from .jobs import DONE, FINAL, Job

WORKFLOW_HELP = {
    "txt2img": "Text to image.",
    "img2img": "Image to image: `image` is repainted with `strength`.",
    "inpaint": "Inpainting: white in `mask` is repainted.",
    "controlnet": "ControlNet (canny edges by default) with a catalogue `controlnet`.",
    "t2i-adapter": "T2I-Adapter (canny edges by default) with a catalogue `adapter`.",
    "animate": "AnimateDiff animation (GIF) with a catalogue `motion_adapter`.",
}


class ErrorDetail(BaseModel):
    type: str
    message: str
    field: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class OutputImage(BaseModel):
    b64: str
    media_type: str


class GenerationResponse(BaseModel):
    id: str
    workflow: str
    seed: int
    images: list[OutputImage]
    params: dict[str, Any]
    warnings: list[str]
    seconds: float


class JobInfo(BaseModel):
    id: str
    workflow: str
    state: str
    step: int
    total: int
    created: float
    started: Optional[float] = None
    finished: Optional[float] = None
    error: Optional[ErrorDetail] = None
    result: Optional[GenerationResponse] = None
    events: Optional[str] = None


ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 422, 429, 499, 503,
                                                      504)}


def job_info(service, job: Job, with_result: bool = True) -> dict:
    info = job.summary()
    info["error"] = None if job.error is None else {
        "type": job.error.kind, "message": service.redact(job.error.message),
        "field": job.error.field}
    info["result"] = service.job_result(job) if with_result and job.state == DONE else None
    info["events"] = f"/v1/jobs/{job.id}/events"
    return info


def router(service) -> APIRouter:
    api = APIRouter()

    async def generate(request: Request, workflow: str, values: dict, images=None,
                       wait: bool = True):
        started = time.perf_counter()
        status = "error"
        try:
            core = service.build(workflow, values, images)
            timeout_s = values.get("timeout_s")
            if not wait:
                job = service.submit(workflow, core, timeout_s)
                status = "accepted"
                return JSONResponse(job_info(service, job, False), status_code=202,
                                    headers={"X-Job-Id": job.id,
                                             "Location": f"/v1/jobs/{job.id}"})
            job = await service.run(request, workflow, core, timeout_s)
            status = "ok"
            return JSONResponse(service.job_result(job), headers={"X-Job-Id": job.id})
        finally:
            service.metrics.requests.labels(workflow, status).inc()
            service.metrics.request_seconds.labels(workflow).observe(
                time.perf_counter() - started)

    def add_json_route(workflow: str):
        Body = BODY_MODELS[workflow]

        async def endpoint(request: Request, body: Body,  # type: ignore[valid-type]
                           wait: bool = Query(True, description=(
                               "false: return 202 with a job at once; follow it at "
                               "/v1/jobs/{id} and /v1/jobs/{id}/events"))):
            return await generate(request, workflow, body.model_dump(), wait=wait)

        endpoint.__name__ = f"{workflow.replace('-', '_')}"
        api.add_api_route(f"/v1/{workflow}", endpoint, methods=["POST"], tags=["native"],
                          summary=WORKFLOW_HELP[workflow], response_model=GenerationResponse,
                          responses={**ERRORS, 202: {"model": JobInfo}})

    def add_upload_route(workflow: str):
        Params = UPLOAD_MODELS[workflow]
        image_fields = REQUESTS[workflow].image_fields()
        schema = {
            "type": "object",
            "required": ["params", *image_fields],
            "properties": {
                "params": {"type": "string", "description": (
                    f"JSON text: the fields of /v1/{workflow} without the images "
                    f"({Params.__name__} in the schemas)")},
                **{f: {"type": "string", "format": "binary"} for f in image_fields},
            },
        }

        async def endpoint(request: Request, wait: bool = Query(True)):
            try:
                form = await request.form(max_files=len(image_fields), max_fields=8,
                                          max_part_size=service.options.max_body_bytes)
            except Exception as exc:  # noqa: BLE001 - python-multipart's many parse errors
                raise BadBody(f"the multipart body could not be parsed ({type(exc).__name__})",
                              field="body") from None
            try:
                unknown = [k for k in form.keys() if k not in ("params", *image_fields)]
                if unknown:
                    raise InvalidRequest(f"{unknown[0]}: unknown form field", field=unknown[0])
                text = form.get("params")
                if not isinstance(text, str):
                    raise InvalidRequest("params: a JSON text form field is required",
                                         field="params")
                try:
                    data = json.loads(text)
                except ValueError:
                    raise BadBody("params is not valid JSON", field="params") from None
                try:
                    values = Params.model_validate(data).model_dump()
                except ValidationError as exc:
                    raise invalid_from_pydantic(exc) from None
                images = {}
                for name in image_fields:
                    upload = form.get(name)
                    if upload is None or isinstance(upload, str):
                        raise InvalidRequest(f"{name}: a file upload is required", field=name)
                    images[name] = image_from_bytes(await upload.read(), name, service.settings)
            finally:
                await form.close()
            return await generate(request, workflow, values, images, wait=wait)

        endpoint.__name__ = f"{workflow.replace('-', '_')}_upload"
        api.add_api_route(f"/v1/{workflow}/upload", endpoint, methods=["POST"], tags=["native"],
                          summary=f"{WORKFLOW_HELP[workflow]} Multipart upload.",
                          response_model=GenerationResponse,
                          responses={**ERRORS, 202: {"model": JobInfo}},
                          openapi_extra={"requestBody": {"required": True, "content": {
                              "multipart/form-data": {"schema": schema}}}})

    for workflow in WORKFLOWS:
        add_json_route(workflow)
        if workflow in UPLOAD_MODELS:
            add_upload_route(workflow)

    # -- jobs --------------------------------------------------------------------------

    @api.get("/v1/jobs", tags=["jobs"], response_model=list[JobInfo])
    async def list_jobs():
        """Recent jobs, oldest first (results left out)."""
        return [job_info(service, job, False) for job in service.queue.jobs()]

    @api.get("/v1/jobs/{job_id}", tags=["jobs"], response_model=JobInfo, responses=ERRORS)
    async def get_job(job_id: str):
        """A job's state, with its result once done."""
        return job_info(service, service.job(job_id))

    @api.delete("/v1/jobs/{job_id}", tags=["jobs"], response_model=JobInfo, responses=ERRORS)
    async def cancel_job(job_id: str):
        """Cancel: a queued job never runs; a running one stops at its next step."""
        job = service.job(job_id)
        service.queue.cancel(job)
        return job_info(service, job, False)

    @api.post("/v1/jobs/{job_id}/cancel", tags=["jobs"], response_model=JobInfo,
              responses=ERRORS)
    async def cancel_job_post(job_id: str):
        """The same as DELETE /v1/jobs/{job_id}."""
        return await cancel_job(job_id)

    @api.get("/v1/jobs/{job_id}/events", tags=["jobs"], responses={
        200: {"content": {"text/event-stream": {}}, "description": (
            "Server-sent events: `state` (at once), `started`, `progress` {step, total} after "
            "every denoising step, then one of `done`, `failed`, `cancelled`, `expired`.")},
        **ERRORS})
    async def job_events(request: Request, job_id: str):
        job = service.job(job_id)
        queue = job.watch()

        def sse(event: dict) -> bytes:
            return f"event: {event['event']}\ndata: {json.dumps(event)}\n\n".encode()

        async def stream():
            try:
                yield sse({"event": "state", **job_info(service, job, False)})
                if job.state in FINAL:
                    return
                while True:
                    try:
                        event = await asyncio.wait_for(queue.get(), timeout=15)
                    except asyncio.TimeoutError:
                        yield b": keep-alive\n\n"
                        continue
                    if event["event"] in FINAL:
                        yield sse({"event": event["event"], **job_info(service, job, False)})
                        return
                    yield sse(event)
            finally:
                job.unwatch(queue)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    @api.get("/v1/files/{token}", tags=["files"], responses={
        200: {"content": {"image/png": {}, "image/gif": {}}}, 404: {"model": ErrorResponse}})
    async def get_file(token: str):
        """An image produced for an OpenAI `url` response (kept for a while, then dropped)."""
        entry = service.load_file(token.removesuffix(".png").removesuffix(".gif"))
        if entry is None:
            raise JobNotFound("no such file (or it has expired)", field="token")
        return Response(entry[0], media_type=entry[1])

    # -- catalogue, health -------------------------------------------------------------

    @api.get("/v1/models", tags=["catalogue"])
    async def models():
        """The model, and the components requests may name (OpenAI list format, plus the
        catalogue by kind)."""
        engine = service.engine
        return {
            "object": "list",
            "data": [{"id": service.catalog.model_name, "object": "model", "created": 0,
                      "owned_by": "fewstep", "family": engine.family.name,
                      "native_size": engine.native_size,
                      "inpaint_only": bool(getattr(engine, "inpaint_only", False))}],
            "workflows": list(WORKFLOWS),
            "controlnets": sorted(service.catalog.controlnets),
            "adapters": sorted(service.catalog.adapters),
            "motion_adapters": sorted(service.catalog.motion_adapters),
            "loras": sorted(service.catalog.loras),
        }

    @api.get("/v1/loras", tags=["catalogue"])
    async def loras():
        """LoRA names requests may use, in `loras: [{name, weight}]`."""
        return {"data": [{"name": name, "kind": KINDS["lora"]}
                         for name in sorted(service.catalog.loras)]}

    @api.get("/v1/status", tags=["health"])
    async def status():
        """Queue limit and depth, the running job, readiness."""
        running = service.queue.running
        return {"queue_limit": service.queue.max_size, "queue_depth": service.queue.depth,
                "running": running.summary() if running else None,
                "ready": service.queue.alive and not service.queue.draining}

    @api.get("/healthz", tags=["health"])
    async def healthz():
        """Liveness: the worker thread is alive."""
        ok = service.queue.alive
        return JSONResponse({"status": "ok" if ok else "worker stopped"},
                            status_code=200 if ok else 503)

    @api.get("/readyz", tags=["health"])
    async def readyz():
        """Readiness: false while shutting down or when the worker has stopped."""
        ready = service.queue.alive and not service.queue.draining
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    @api.get("/metrics", tags=["health"], response_class=Response)
    async def metrics():
        """Prometheus metrics."""
        return Response(service.metrics.render(), media_type=service.metrics.content_type)

    return api
