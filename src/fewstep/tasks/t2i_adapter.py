"""T2I-Adapter (SD1.5 and SDXL), with canny preprocessing built in."""

from __future__ import annotations

import math

from pydantic import Field

from ..errors import InvalidRequest
from .controlnet import ControlRequest
from .img2img import input_size, resized


class T2IAdapterRequest(ControlRequest):
    """Width and height must be multiples of the adapter's own downscale factor."""

    task = "t2i-adapter"
    adapter: str = Field(min_length=1)
    conditioning_factor: float = Field(1.0, ge=0.0, le=1.0)

    def describe(self, model):
        downscale, channels = model.adapter_geometry(self.adapter)
        multiple = math.lcm(8, downscale)
        width, height = input_size(self, self.control_image, multiple)
        if not (self.width or self.height) and model.family.sdxl_like:
            width = height = model.native_size  # the recipe resizes the edges to 1024
        self.check_size(width, height, multiple, model.settings)
        arguments = {
            "image": resized(self.condition(channels), width, height),
            "adapter_conditioning_scale": self.conditioning_scale,
            "width": width,
            "height": height,
        }
        if model.family.sdxl_like:  # only the SDXL adapter pipeline can stop the adapter early
            arguments["adapter_conditioning_factor"] = self.conditioning_factor
        elif self.conditioning_factor != 1.0:
            raise InvalidRequest(
                f"conditioning_factor {self.conditioning_factor}: only SDXL-family adapters "
                "support stopping the adapter early; use 1.0", field="conditioning_factor")
        return self.pipeline_call("t2i-adapter", width, height,
                                  components=(("adapter", self.adapter),), batched=("image",),
                                  arguments=arguments)
