"""Inpainting, with 9-channel inpainting checkpoints and with plain ones (latent blending)."""

from __future__ import annotations

from pydantic import Field, model_validator

from ..errors import InvalidRequest
from .base import ImageInput, Request
from .img2img import check_strength, input_size, resized


class InpaintRequest(Request):
    """White in `mask` is repainted. The mask must have the image's size."""

    task = "inpaint"
    image: ImageInput
    mask: ImageInput
    strength: float = Field(1.0, gt=0.0, le=1.0)
    guidance: float = Field(4.0, ge=0.0, le=30.0)  # the recipe's value for inpainting

    @model_validator(mode="after")
    def _consistent(self):
        check_strength(self)
        if self.mask.size != self.image.size:
            raise InvalidRequest(
                f"mask is {self.mask.width}x{self.mask.height} but image is "
                f"{self.image.width}x{self.image.height}; they must have the same size",
                field="mask")
        return self

    @classmethod
    def image_fields(cls):
        return ("image", "mask")

    def describe(self, model):
        width, height = input_size(self, self.image)
        self.check_size(width, height, 8, model.settings)
        return self.pipeline_call("inpaint", width, height, arguments={
            "image": resized(self.image, width, height),
            "mask_image": resized(self.mask, width, height),
            "strength": self.strength,
            "width": width,
            "height": height,
        })
