"""The OpenAI images API's models (`images.generate`, `images.edit`), with fewstep's extensions
(the SDK's `extra_body`)."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, Field, field_validator

from .common import MAX_TIMEOUT_S, ApiModel, LoraName


class ImagesRequest(ApiModel):
    """What generations and edits share."""

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
    stream: Optional[bool] = Field(None, description="only false: streaming is not offered")
    # fewstep extensions (the SDK's extra_body)
    negative_prompt: Optional[str] = None
    seed: Optional[int] = None
    steps: Optional[int] = None
    guidance: Optional[float] = None
    loras: list[LoraName] = Field(default_factory=list)
    timeout_s: Optional[float] = Field(None, gt=0, le=MAX_TIMEOUT_S)

    @field_validator("stream")
    @classmethod
    def _no_streaming(cls, value):
        if value:
            raise ValueError("streaming is not offered; send false or leave it out")
        return value


class GenerationsBody(ImagesRequest):
    pass


class EditsForm(ImagesRequest):
    """The text fields of an edit's multipart form (values arrive as text: "2", "false")."""

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
