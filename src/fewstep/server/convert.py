"""From what clients send to the engine's typed requests, and from results to what they get.

The API body models are derived from the core request models (same fields, same limits), with
images as base64 text and LoRAs and components as catalogue names, so the OpenAPI schema says
what the server checks."""

from __future__ import annotations

import base64
import binascii
import io
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, create_model

from ..errors import InvalidRequest
from ..images import load_image
from ..lora import MAX_LORA_WEIGHT
from ..tasks import REQUESTS, LoraRequest
from .catalog import KINDS, NAME_PATTERN

WORKFLOWS = tuple(REQUESTS)  # txt2img, img2img, inpaint, controlnet, t2i-adapter, animate
COMPONENT_FIELDS = {"controlnet": "controlnet", "adapter": "adapter",
                    "motion_adapter": "motion_adapter"}
MAX_TIMEOUT_S = 3600.0
_DATA_URL = re.compile(r"^data:[\w/+.-]*(;[\w=-]+)*;base64,", re.I)


class ApiModel(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class LoraName(ApiModel):
    name: str = Field(min_length=1, max_length=64, pattern=NAME_PATTERN,
                      description="a LoRA name from GET /v1/loras")
    weight: float = Field(1.0, ge=-MAX_LORA_WEIGHT, le=MAX_LORA_WEIGHT)


def _body_model(workflow: str, with_images: bool = True) -> type[BaseModel]:
    cls = REQUESTS[workflow]
    fields: dict[str, Any] = {}
    for name, info in cls.model_fields.items():
        if name in cls.image_fields() and not with_images:
            continue
        if name in cls.image_fields():
            fields[name] = (str, Field(..., description=(
                "base64-encoded image (PNG, JPEG or WebP); a data: URL prefix is accepted")))
        elif name == "loras":
            fields[name] = (list[LoraName], Field(default_factory=list, description=(
                "LoRA stack: catalogue names with weights")))
        elif name in COMPONENT_FIELDS:
            fields[name] = (str, Field(..., min_length=1, max_length=64, pattern=NAME_PATTERN,
                                       description=f"a {KINDS[name]} name from GET /v1/models"))
        else:
            fields[name] = (info.annotation, info)
    fields["timeout_s"] = (float | None, Field(None, gt=0, le=MAX_TIMEOUT_S, description=(
        "deadline in seconds for the job to start; passed while queued -> 504, never run")))
    title = "".join(p.capitalize() for p in re.split(r"[-_]", workflow))
    suffix = "Body" if with_images else "UploadParams"
    model = create_model(f"{title}{suffix}", __base__=ApiModel, **fields)
    model.__doc__ = f"A {workflow} request. {cls.__doc__ or ''}".strip()
    return model


BODY_MODELS: dict[str, type[BaseModel]] = {w: _body_model(w) for w in WORKFLOWS}
UPLOAD_MODELS: dict[str, type[BaseModel]] = {
    w: _body_model(w, with_images=False) for w in WORKFLOWS if REQUESTS[w].image_fields()}


def decode_base64(text: str, field: str) -> bytes:
    if not isinstance(text, str):
        raise InvalidRequest(f"{field} must be a base64 string", field=field)
    match = _DATA_URL.match(text[:200])
    if match:
        text = text[match.end():]
    text = "".join(text.split())  # line breaks are common in base64 from tools
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"{field} is not valid base64", field=field) from None


def decode_image(text: str, field: str, settings, mode: str = "RGB"):
    data = decode_base64(text, field)
    if not data:
        raise InvalidRequest(f"{field} is empty", field=field)
    return load_image(data, field, settings.max_input_pixels, mode=mode)


def image_from_bytes(data: bytes, field: str, settings, mode: str = "RGB"):
    if not data:
        raise InvalidRequest(f"{field} is empty", field=field)
    return load_image(data, field, settings.max_input_pixels, mode=mode)


def check_text(value: str | None, field: str) -> None:
    if value is None:
        return
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequest(f"{field} contains characters that are not valid Unicode "
                             "(lone surrogates)", field=field) from None


def build_request(workflow: str, values: dict[str, Any], catalog, settings,
                  images: dict[str, Any] | None = None):
    """A core request from plain values (names, not refs). `images` are already-decoded PIL
    images keyed by field; base64 text in `values` is decoded otherwise. Limits are checked
    here, before anything is queued."""
    cls = REQUESTS[workflow]
    values = dict(values)
    values.pop("timeout_s", None)
    images = dict(images or {})
    for name in cls.image_fields():
        if name in images:
            values[name] = images[name]
        elif isinstance(values.get(name), str):
            values[name] = decode_image(values[name], name, settings)
    loras = []
    for i, entry in enumerate(values.get("loras") or []):
        entry = entry if isinstance(entry, dict) else dict(entry)
        ref = catalog.resolve("lora", entry.get("name"), f"loras.{i}.name")
        loras.append(LoraRequest(ref=ref, weight=entry.get("weight", 1.0)))
    values["loras"] = loras
    for name, kind in COMPONENT_FIELDS.items():
        if name in cls.model_fields and values.get(name) is not None:
            values[name] = catalog.resolve(kind, values[name], name)
    check_text(values.get("prompt"), "prompt")
    check_text(values.get("negative_prompt"), "negative_prompt")
    request = cls.build(**values)
    request.check_limits(settings)
    return request.with_seed()


# -- results ------------------------------------------------------------------------------

def encode_outputs(result, params: dict) -> list[tuple[bytes, str]]:
    """(bytes, media type) per output: PNG with generation parameters, or GIF animations."""
    from ..outputs import encode_animation, encode_image

    outputs = []
    if result.is_animation:
        fps = int(params.get("request", {}).get("fps") or 8)
        for i in range(result.images.shape[0]):
            outputs.append((encode_animation(result.pil_frames(i), ".gif", fps), "image/gif"))
    else:
        height, width = result.images.shape[1:3]
        params = {**params, "width": width, "height": height}
        for i, image in enumerate(result.pil_images()):
            outputs.append((encode_image(image, ".png", params, i), "image/png"))
    return outputs


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def png_size(data: bytes) -> tuple[int, int]:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return im.size
