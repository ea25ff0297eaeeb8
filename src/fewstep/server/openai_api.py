"""The OpenAI images API: POST /v1/images/generations and /v1/images/edits (image + mask ->
inpaint; without a mask -> img2img), `response_format` b64_json or url (served here), `size`,
`n`. The official `openai` SDK works against it with `base_url` and `api_key`."""

import re
import time
from typing import Literal, Optional

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import InvalidRequest
from ..tasks.base import invalid_from_pydantic
from .convert import LoraName, b64, image_from_bytes
from .errors import BadBody
from .native import ERRORS

_SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    prompt: str
    model: Optional[str] = None
    n: Optional[int] = Field(None, ge=1)
    size: Optional[str] = Field(None, max_length=16, description="WIDTHxHEIGHT or auto")
    response_format: Optional[Literal["b64_json", "url"]] = "b64_json"
    output_format: Optional[Literal["png"]] = None
    user: Optional[str] = Field(None, max_length=256)
    quality: Optional[str] = Field(None, max_length=32, description="accepted, ignored")
    style: Optional[str] = Field(None, max_length=32, description="accepted, ignored")
    background: Optional[str] = Field(None, max_length=32, description="accepted, ignored")
    moderation: Optional[str] = Field(None, max_length=32, description="accepted, ignored")
    stream: Optional[Literal[False]] = None
    # fewstep extensions (the SDK's extra_body)
    negative_prompt: Optional[str] = None
    seed: Optional[int] = None
    steps: Optional[int] = None
    guidance: Optional[float] = None
    loras: list[LoraName] = Field(default_factory=list)
    timeout_s: Optional[float] = Field(None, gt=0, le=3600)


class GenerationsBody(_Common):
    pass


class EditsForm(_Common):
    strength: Optional[float] = None


class ImageData(BaseModel):
    b64_json: Optional[str] = None
    url: Optional[str] = None
    revised_prompt: Optional[str] = None


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    output_format: str = "png"
    size: Optional[str] = None


def parse_size(size: Optional[str]) -> tuple[Optional[int], Optional[int]]:
    if size in (None, "auto"):
        return None, None
    match = _SIZE.match(size)
    if not match:
        raise InvalidRequest(f"size must be WIDTHxHEIGHT (like 512x512) or auto, got {size!r}",
                             field="size")
    return int(match[1]), int(match[2])


def router(service) -> APIRouter:
    api = APIRouter(tags=["openai"])

    def values_from(body: _Common) -> dict:
        if body.model is not None:
            service.catalog.check_model(body.model)
        width, height = parse_size(body.size)
        values = {"prompt": body.prompt, "negative_prompt": body.negative_prompt,
                  "seed": body.seed, "steps": body.steps, "guidance": body.guidance,
                  "num_images": body.n, "width": width, "height": height,
                  "loras": [lo.model_dump() for lo in body.loras]}
        return values

    async def respond(request: Request, workflow: str, body: _Common, values: dict, images=None):
        core = service.build(workflow, values, images)
        job = await service.run_counted(request, workflow, core, body.timeout_s)
        data = []
        for payload, media in job.outputs:
            if body.response_format == "url":
                token = service.store_file(payload, media)
                data.append({"url": str(request.url_for("get_file", token=token + ".png"))})
            else:
                data.append({"b64_json": b64(payload)})
        first = job.params["request"]
        size = f"{job.params.get('width', first.get('width'))}x" \
               f"{job.params.get('height', first.get('height'))}"
        return {"created": int(time.time()), "data": data, "output_format": "png",
                "size": size if "None" not in size else None}

    @api.post("/v1/images/generations", response_model=ImagesResponse,
              response_model_exclude_none=True, responses=ERRORS)
    async def generations(request: Request, body: GenerationsBody):
        """Text to image (OpenAI `images.generate`)."""
        return await respond(request, "txt2img", body, values_from(body))

    edit_schema = {"type": "object", "required": ["image", "prompt"], "properties": {
        "image": {"type": "string", "format": "binary"},
        "mask": {"type": "string", "format": "binary", "description": (
            "transparent (alpha 0) marks what to repaint; without alpha, white does")},
        **{name: {"type": "string"} for name in EditsForm.model_fields
           if name not in ("loras",)},
        "loras": {"type": "string", "description": "JSON list of {name, weight}"},
    }}

    @api.post("/v1/images/edits", response_model=ImagesResponse,
              response_model_exclude_none=True, responses=ERRORS,
              openapi_extra={"requestBody": {"required": True, "content": {
                  "multipart/form-data": {"schema": edit_schema}}}})
    async def edits(request: Request):
        """Image + mask -> inpaint; image alone -> img2img (OpenAI `images.edit`)."""
        try:
            form = await request.form(max_files=4, max_fields=32,
                                      max_part_size=service.options.max_body_bytes)
        except Exception as exc:  # noqa: BLE001
            raise BadBody(f"the multipart body could not be parsed ({type(exc).__name__})",
                          field="body") from None
        try:
            fields, files = {}, {}
            for key, value in form.multi_items():
                name = "image" if key == "image[]" else key
                if isinstance(value, str):
                    fields[name] = value
                elif name in files:
                    raise InvalidRequest(f"{name}: one file only", field=name)
                else:
                    files[name] = await value.read()
            if "loras" in fields:
                import json

                try:
                    fields["loras"] = json.loads(fields["loras"])
                except ValueError:
                    raise InvalidRequest("loras must be JSON", field="loras") from None
            for name in list(files):
                if name not in ("image", "mask"):
                    raise InvalidRequest(f"{name}: unknown file field", field=name)
            try:
                body = EditsForm.model_validate(fields)
            except ValidationError as exc:
                raise invalid_from_pydantic(exc) from None
            if "image" not in files:
                raise InvalidRequest("image: a file upload is required", field="image")
            image = image_from_bytes(files["image"], "image", service.settings, mode="RGBA")
        finally:
            await form.close()
        values = values_from(body)
        values["strength"] = body.strength
        if "mask" in files:
            mask_rgba = image_from_bytes(files["mask"], "mask", service.settings, mode="RGBA")
            mask = edit_mask(mask_rgba)
        elif image.getextrema()[3][0] < 255:  # the image's own transparency
            mask = edit_mask(image)
        else:
            mask = None
        images = {"image": image.convert("RGB")}
        if mask is None:
            return await respond(request, "img2img", body, values, images)
        images["mask"] = mask
        return await respond(request, "inpaint", body, values, images)

    return api


def edit_mask(rgba):
    """OpenAI's convention (transparent = repaint) -> fewstep's (white = repaint). A mask
    without transparency is read as fewstep's: white repaints."""
    alpha = rgba.getchannel("A")
    if alpha.getextrema()[0] < 255:
        return alpha.point(lambda a: 255 if a == 0 else 0).convert("RGB")
    return rgba.convert("L").convert("RGB")
