"""An AUTOMATIC1111 API subset, enough for existing clients (for example `webuiapi`):
txt2img, img2img (with `mask` -> inpaint), sd-models, loras, options, progress, interrupt,
samplers, scripts; `<lora:name:weight>` in prompts; the `info` field."""

import json
import math
import re
from typing import Any, Optional

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from ..errors import InvalidRequest
from .catalog import check_name
from .convert import b64, decode_image
from .native import ERRORS

_LORA_TAG = re.compile(r"<lora:([^:>]*)(?::([^:>]*))?(?::[^>]*)?>", re.I)


class _A1111(BaseModel):
    # A1111 clients send many fields fewstep has no use for: they are ignored
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    prompt: str = ""
    negative_prompt: Optional[str] = ""
    seed: int = Field(-1, ge=-1)
    steps: int = Field(4, ge=1)
    cfg_scale: float = Field(1.0, ge=0.0, le=30.0)
    width: Optional[int] = Field(None, ge=8)
    height: Optional[int] = Field(None, ge=8)
    batch_size: int = Field(1, ge=1)
    n_iter: int = Field(1, ge=1)
    sampler_name: Optional[str] = None
    override_settings: Optional[dict[str, Any]] = None
    timeout_s: Optional[float] = Field(None, gt=0, le=3600)


class Txt2ImgPayload(_A1111):
    pass


class Img2ImgPayload(_A1111):
    init_images: list[str] = Field(min_length=1, max_length=1)
    mask: Optional[str] = None
    denoising_strength: float = Field(0.75, gt=0.0, le=1.0)
    inpainting_mask_invert: int = Field(0, ge=0, le=1)
    include_init_images: bool = False


class A1111Response(BaseModel):
    images: list[str]
    parameters: dict[str, Any]
    info: str


def split_loras(prompt: str, catalog) -> tuple[str, list[dict]]:
    """`<lora:name:weight>` tags -> a LoRA stack; the tags leave the prompt."""
    loras = []
    for match in _LORA_TAG.finditer(prompt):
        name = check_name(match[1].strip(), "prompt")
        text = (match[2] or "1").strip()
        try:
            weight = float(text)
        except ValueError:
            weight = math.nan
        if not math.isfinite(weight):
            raise InvalidRequest(f"prompt: <lora:{name}:{text}> needs a finite number as weight",
                                 field="prompt")
        catalog.resolve("lora", name, "prompt")
        loras.append({"name": name, "weight": weight})
    cleaned = " ".join(_LORA_TAG.sub(" ", prompt).split())
    return cleaned, loras


def router(service) -> APIRouter:
    api = APIRouter(prefix="/sdapi/v1", tags=["a1111"])
    catalog = service.catalog

    def values_from(body: _A1111) -> dict:
        prompt, loras = split_loras(body.prompt, catalog)
        negative, _ = split_loras(body.negative_prompt or "", catalog)
        checkpoint = (body.override_settings or {}).get("sd_model_checkpoint")
        if checkpoint is not None:
            catalog.check_model(checkpoint, "override_settings.sd_model_checkpoint")
        return {"prompt": prompt, "negative_prompt": negative or None,
                "seed": None if body.seed == -1 else body.seed, "steps": body.steps,
                "guidance": body.cfg_scale, "width": body.width, "height": body.height,
                "num_images": body.batch_size * body.n_iter, "loras": loras}

    async def respond(request: Request, workflow: str, body: _A1111, values: dict, images=None):
        if body.batch_size * body.n_iter > service.settings.max_num_images:
            raise InvalidRequest(f"batch_size x n_iter must be at most "
                                 f"{service.settings.max_num_images}", field="batch_size")
        core = service.build(workflow, values, images)
        job = await service.run_counted(request, workflow, core, body.timeout_s)
        record = job.params["request"]
        from ..outputs import a1111_parameters

        count = len(job.outputs)
        infotexts = [a1111_parameters(job.params, i) for i in range(count)]
        info = {
            "prompt": record["prompt"], "all_prompts": [record["prompt"]] * count,
            "negative_prompt": record.get("negative_prompt") or "",
            "seed": record["seed"], "all_seeds": [record["seed"]] * count,
            "steps": record["steps"], "cfg_scale": record["guidance"],
            "width": job.params.get("width"), "height": job.params.get("height"),
            "sampler_name": "LCM", "batch_size": count,
            "sd_model_name": catalog.model_name, "loras": record.get("loras", []),
            "infotexts": infotexts, "job_id": job.id, "fewstep": job.params,
        }
        parameters = body.model_dump(exclude={"init_images", "mask"})
        return {"images": [b64(data) for data, _ in job.outputs], "parameters": parameters,
                "info": json.dumps(info)}

    @api.post("/txt2img", response_model=A1111Response, responses=ERRORS)
    async def txt2img(request: Request, body: Txt2ImgPayload):
        """Text to image; `<lora:name:weight>` in the prompt picks catalogue LoRAs."""
        return await respond(request, "txt2img", body, values_from(body))

    @api.post("/img2img", response_model=A1111Response, responses=ERRORS)
    async def img2img(request: Request, body: Img2ImgPayload):
        """Image to image; with `mask`, inpainting (white repaints)."""
        values = values_from(body)
        values["strength"] = body.denoising_strength
        images = {"image": decode_image(body.init_images[0], "init_images.0", service.settings)}
        if body.mask is None:
            return await respond(request, "img2img", body, values, images)
        mask = decode_image(body.mask, "mask", service.settings, mode="L")
        if body.inpainting_mask_invert:
            mask = mask.point(lambda v: 255 - v)
        images["mask"] = mask.convert("RGB")
        return await respond(request, "inpaint", body, values, images)

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
        try:
            data = await request.json()
        except ValueError:
            raise InvalidRequest("the body is not valid JSON", field="body") from None
        if not isinstance(data, dict):
            raise InvalidRequest("options must be a JSON object", field="body")
        if "sd_model_checkpoint" in data:
            catalog.check_model(data["sd_model_checkpoint"], "sd_model_checkpoint")
        return None

    @api.get("/progress")
    async def progress():
        job = service.queue.running
        depth = service.queue.depth
        fraction = job.step / job.total if job is not None and job.total else 0.0
        return {"progress": fraction, "eta_relative": 0.0, "current_image": None,
                "textinfo": None, "state": {
                    "skipped": False, "interrupted": bool(job and job.cancel.is_set()),
                    "job": job.id if job else "", "job_count": depth + (1 if job else 0),
                    "job_timestamp": str(int(job.created)) if job else "0", "job_no": 0,
                    "sampling_step": job.step if job else 0,
                    "sampling_steps": job.total if job else 0}}

    @api.post("/interrupt")
    async def interrupt():
        """Stop the running job at its next step."""
        job = service.queue.running
        if job is not None:
            service.queue.cancel(job)
        return {}

    @api.post("/skip")
    async def skip():
        return await interrupt()

    return api
