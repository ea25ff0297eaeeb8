"""Image-to-image."""

from __future__ import annotations

from pydantic import Field, model_validator

from ..errors import InvalidRequest
from .base import ImageInput, Request


def input_size(request, image, multiple: int = 8) -> tuple[int, int]:
    """Output size: the request's, else the input image's rounded down to `multiple`
    (diffusers' own default)."""
    width = request.width or image.width // multiple * multiple
    height = request.height or image.height // multiple * multiple
    return width, height


def resized(image, width: int, height: int):
    from PIL import Image

    if image.size == (width, height):
        return image
    return image.resize((width, height), Image.Resampling.LANCZOS)


def check_strength(request) -> None:
    if int(request.steps * request.strength) < 1:
        raise InvalidRequest(
            f"strength x steps must be at least 1 (strength {request.strength} x steps "
            f"{request.steps} runs no denoising step)", field="strength")


class Img2ImgRequest(Request):
    """The input image is resized to width x height when they are given; otherwise its size,
    rounded down to a multiple of 8, is the output size."""

    task = "img2img"
    image: ImageInput
    strength: float = Field(0.6, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _enough_steps(self):
        check_strength(self)
        return self

    @classmethod
    def image_fields(cls):
        return ("image",)

    def describe(self, model):
        width, height = input_size(self, self.image)
        self.check_size(width, height, 8, model.settings)
        return self.pipeline_call(
            "img2img", width, height, batched=("image",),
            arguments={"image": resized(self.image, width, height), "strength": self.strength})
