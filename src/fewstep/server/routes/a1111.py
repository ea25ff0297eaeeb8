"""An AUTOMATIC1111 API subset, enough for existing clients (for example `webuiapi`):
txt2img, img2img (with `mask` -> inpaint), sd-models, loras, options, progress, interrupt,
samplers, scripts; `<lora:name:weight>` in prompts; the `info` field."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request

from ...errors import FewstepError, InvalidRequest
from ..convert import a1111 as convert
from ..convert.common import build_request, fields_renamed
from ..errors import about_input
from ..hosts import is_json, not_json
from ..json_limits import SCOPE_KEY, ParsedJsonRoute
from ..protocol.a1111 import A1111Response, Img2ImgPayload, Txt2ImgPayload
from ..protocol.common import ERRORS
from .common import converted, counted, json_response, run_job

WARNING_HEADER = "X-Fewstep-Warning"


def header_text(text: str) -> str:
    """Printable ASCII only (the client's own text may be anything); `info` has the rest."""
    return "".join(c if " " <= c <= "~" else "?" for c in text)[:300]


def router(service) -> APIRouter:
    api = APIRouter(prefix="/sdapi/v1", tags=["a1111"], route_class=ParsedJsonRoute)
    backend, catalog, settings = service.backend, service.catalog, service.settings

    async def respond(request: Request, body, build):
        """`build() -> (workflow, core request, warnings)` runs in a worker thread."""
        with fields_renamed(convert.rename_field):
            workflow, core, warnings = await converted(build)
            async with counted(service, workflow) as outcome:
                view = await run_job(service, request, workflow, core, body.timeout_s)
                outcome["status"] = "ok"
        payload = await asyncio.to_thread(convert.response, view, body, warnings,
                                          catalog.model_name)
        headers = {WARNING_HEADER: header_text("; ".join(warnings))} if warnings else None
        return await json_response(payload, headers=headers)

    @api.post("/txt2img", response_model=A1111Response, responses=ERRORS)
    async def txt2img(request: Request, body: Txt2ImgPayload):
        """Text to image; `<lora:name:weight>` in the prompt picks catalogue LoRAs."""
        def build():
            values, warnings = convert.values_from(body, catalog, settings)
            return "txt2img", build_request("txt2img", values, catalog, settings), warnings

        return await respond(request, body, build)

    @api.post("/img2img", response_model=A1111Response, responses=ERRORS)
    async def img2img(request: Request, body: Img2ImgPayload):
        """Image to image; with `mask`, inpainting (white repaints)."""
        def build():
            values, warnings = convert.values_from(body, catalog, settings)
            values["strength"] = body.denoising_strength
            workflow, images = convert.img2img_inputs(body, settings)
            return workflow, build_request(workflow, values, catalog, settings, images), \
                warnings

        return await respond(request, body, build)

    @api.get("/sd-models")
    async def sd_models():
        name = catalog.model_name
        return [{"title": name, "model_name": name, "hash": None, "sha256": None,
                 "filename": name, "config": None}]

    @api.get("/loras")
    async def loras():
        return [{"name": n, "alias": n, "path": n, "metadata": {}} for n in sorted(catalog.loras)]

    @api.get("/samplers")
    async def samplers():
        return [{"name": "LCM", "aliases": ["lcm"], "options": {}}]

    @api.get("/scripts")
    async def scripts():
        return {"txt2img": [], "img2img": []}

    @api.get("/options")
    async def get_options():
        return {"sd_model_checkpoint": catalog.model_name, "sd_checkpoint_hash": None,
                "samples_format": "png"}

    @api.post("/options")
    async def set_options(request: Request):
        """Only the one model can be chosen; other options are accepted and ignored."""
        if not is_json(request.headers.get("content-type")):
            raise not_json(request.headers.get("content-type"))
        if SCOPE_KEY not in request.scope:  # no body: parsed by BodyMiddleware otherwise
            raise InvalidRequest("options must be a JSON object", field="body")
        data = request.scope[SCOPE_KEY]
        if not isinstance(data, dict):
            raise InvalidRequest("options must be a JSON object", field="body")
        if "sd_model_checkpoint" in data:
            try:
                catalog.check_model(data["sd_model_checkpoint"], "sd_model_checkpoint")
            except FewstepError as exc:
                raise about_input(exc) from None
        return None

    @api.get("/progress")
    async def progress():
        queue = await backend.queue_info()
        job = queue.running[0] if queue.running else None
        fraction = job.step / job.total if job is not None and job.total else 0.0
        return {"progress": fraction, "eta_relative": 0.0, "current_image": None,
                "textinfo": None, "state": {
                    "skipped": False, "interrupted": bool(job and job.cancelling),
                    "job": job.id if job else "", "job_count": queue.depth + len(queue.running),
                    "job_timestamp": str(int(job.created)) if job else "0", "job_no": 0,
                    "sampling_step": job.step if job else 0,
                    "sampling_steps": job.total if job else 0}}

    @api.post("/interrupt")
    async def interrupt():
        """Stop the running job at its next step."""
        for job in (await backend.queue_info()).running:
            await backend.cancel(job.id)
        return {}

    @api.post("/skip")
    async def skip():
        return await interrupt()

    return api
