"""The native API's models. The body models are derived from the core request models (same
fields, same limits), with images as base64 text and LoRAs and components as catalogue names,
so the schema says what the server checks."""

from __future__ import annotations

import re
from typing import Any, Optional

from pydantic import BaseModel, Field, create_model

from ...tasks import REQUESTS
from ...names import NAME_PATTERN
from ..catalog import KINDS
from .common import MAX_TIMEOUT_S, ApiModel, ErrorDetail, LoraName

WORKFLOWS = tuple(REQUESTS)  # txt2img, img2img, inpaint, controlnet, t2i-adapter, animate
COMPONENT_FIELDS = {"controlnet": "controlnet", "adapter": "adapter",
                    "motion_adapter": "motion_adapter"}

WORKFLOW_HELP = {
    "txt2img": "Text to image.",
    "img2img": "Image to image: `image` is repainted with `strength`.",
    "inpaint": "Inpainting: white in `mask` is repainted.",
    "controlnet": "ControlNet (canny edges by default) with a catalogue `controlnet`.",
    "t2i-adapter": "T2I-Adapter (canny edges by default) with a catalogue `adapter`.",
    "animate": "AnimateDiff animation (GIF) with a catalogue `motion_adapter`.",
}


def _body_model(workflow: str, with_images: bool = True) -> type[BaseModel]:
    cls = REQUESTS[workflow]
    fields: dict[str, Any] = {}
    for name, info in cls.model_fields.items():
        if name in cls.image_fields():
            if with_images:
                fields[name] = (str, Field(..., description=(
                    "base64-encoded image (PNG, JPEG, WebP or GIF: its first frame); a data: "
                    "URL prefix is accepted")))
        elif name == "loras":
            fields[name] = (list[LoraName], Field(default_factory=list, description=(
                "LoRA stack: catalogue names with weights")))
        elif name in COMPONENT_FIELDS:
            fields[name] = (str, Field(..., min_length=1, max_length=64, pattern=NAME_PATTERN,
                                       description=f"a {KINDS[name]} name from GET /v1/models"))
        else:
            fields[name] = (info.annotation, info)
    fields["timeout_s"] = (Optional[float], Field(None, gt=0, le=MAX_TIMEOUT_S, description=(
        "deadline in seconds for the job to start; passed while queued -> 504, never run")))
    title = "".join(p.capitalize() for p in re.split(r"[-_]", workflow))
    suffix = "Body" if with_images else "UploadParams"
    model = create_model(f"{title}{suffix}", __base__=ApiModel, **fields)
    model.__doc__ = f"A {workflow} request. {cls.__doc__ or ''}".strip()
    return model


BODY_MODELS: dict[str, type[BaseModel]] = {w: _body_model(w) for w in WORKFLOWS}
UPLOAD_MODELS: dict[str, type[BaseModel]] = {
    w: _body_model(w, with_images=False) for w in WORKFLOWS if REQUESTS[w].image_fields()}


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
