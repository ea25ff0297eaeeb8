"""ControlNet, with canny preprocessing built in."""

from __future__ import annotations

from pydantic import Field, model_validator

from ..control import canny
from ..errors import InvalidRequest
from .base import ImageInput, Request
from .img2img import input_size, resized


class ControlRequest(Request):
    """Shared by ControlNet and T2I-Adapter: a control image, optionally turned into canny
    edges first (the recipe's thresholds by default)."""

    control_image: ImageInput
    canny: bool = True
    canny_low: int = Field(100, ge=0, le=255)
    canny_high: int = Field(200, ge=0, le=255)
    conditioning_scale: float = Field(0.8, ge=0.0, le=5.0)
    guidance: float = Field(1.5, ge=0.0, le=30.0)  # the recipe's value for control tasks

    @model_validator(mode="after")
    def _thresholds(self):
        if self.canny_low > self.canny_high:
            raise InvalidRequest(f"canny_low ({self.canny_low}) must not exceed canny_high "
                                 f"({self.canny_high})", field="canny_low")
        return self

    @classmethod
    def image_fields(cls):
        return ("control_image",)

    def condition(self, channels: int = 3):
        if not self.canny:
            return self.control_image.convert("L" if channels == 1 else "RGB")
        return canny(self.control_image, self.canny_low, self.canny_high, channels)


class ControlNetRequest(ControlRequest):
    task = "controlnet"
    controlnet: str = Field(min_length=1)

    def describe(self, model):
        width, height = input_size(self, self.control_image)
        self.check_size(width, height, 8, model.settings)
        return self.pipeline_call(
            "controlnet", width, height, components=(("controlnet", self.controlnet),),
            batched=("image",), arguments={
                "image": resized(self.condition(), width, height),
                "controlnet_conditioning_scale": self.conditioning_scale,
                "width": width,
                "height": height,
            })
