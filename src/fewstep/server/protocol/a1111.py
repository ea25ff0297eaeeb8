"""The AUTOMATIC1111 API subset's models. A1111 clients send many fields fewstep has no use for:
they are ignored."""

from __future__ import annotations

from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from .common import MAX_TIMEOUT_S

Scalar = Union[str, int, float, bool, None]


class A1111Payload(BaseModel):
    """What txt2img and img2img share."""

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
    sampler_name: Optional[str] = Field(None, max_length=64, description=(
        "only LCM runs; another name is answered with a warning"))
    # option values are flat (A1111's are): nothing nested is kept or echoed
    override_settings: Optional[dict[str, Union[Scalar, list[Scalar]]]] = None
    timeout_s: Optional[float] = Field(None, gt=0, le=MAX_TIMEOUT_S)


class Txt2ImgPayload(A1111Payload):
    pass


class Img2ImgPayload(A1111Payload):
    init_images: list[str] = Field(min_length=1, max_length=1)
    mask: Optional[str] = None
    denoising_strength: float = Field(0.75, gt=0.0, le=1.0)
    inpainting_mask_invert: int = Field(0, ge=0, le=1)
    include_init_images: bool = False


class A1111Response(BaseModel):
    images: list[str]
    parameters: dict[str, Any]
    info: str
