"""What every task shares: the typed request (validated, with limits from Settings) and how it
becomes a plain description of one pipeline call (`fewstep.calls.PipelineCall`)."""

from __future__ import annotations

import os
import random
from typing import Annotated, Any, ClassVar

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, ValidationError,
                      field_validator)

from ..calls import ModelView, PipelineCall
from ..config import Settings
from ..errors import InvalidRequest
from ..lora import MAX_LORA_WEIGHT
from ..images import input_digests

MAX_SEED = 2**63 - 1
MIN_IMAGE_SIDE = 8  # the VAE downscales by 8: smaller inputs have no latent pixel


def _to_image(value):
    """Image fields take a PIL image, encoded image bytes or a `pathlib.Path` (each decoded
    safely), never a path as text: JSON from the network can hold text but never a Path, so
    the service cannot be made to read a file."""
    from PIL import Image

    from ..images import load_image

    if isinstance(value, (bytes, bytearray, os.PathLike)):
        try:
            value = load_image(bytes(value) if isinstance(value, bytearray) else value, "image")
        except InvalidRequest as exc:
            raise ValueError(exc.message.removeprefix("image ").removeprefix("image: ")) \
                from None
    if isinstance(value, str):
        raise ValueError("takes a PIL image, encoded image bytes or a pathlib.Path; a path given "
                         f"as text is not read (Path({value[:40]!r}) reads that file)")
    if not isinstance(value, Image.Image):
        raise ValueError(
            f"must be a PIL image, encoded image bytes or a pathlib.Path, not "
            f"{type(value).__name__}")
    if min(value.size) < MIN_IMAGE_SIDE:
        raise ValueError(f"is {value.width}x{value.height} pixels; images must be at least "
                         f"{MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE}")
    return value if value.mode == "RGB" else value.convert("RGB")


ImageInput = Annotated[Any, BeforeValidator(_to_image)]


class LoraRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    ref: str = Field(min_length=1, max_length=1000)
    weight: float = Field(1.0, ge=-MAX_LORA_WEIGHT, le=MAX_LORA_WEIGHT)


class Request(BaseModel):
    """Fields common to every task. Subclasses set `task` and their own defaults."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, arbitrary_types_allowed=True,
                              validate_assignment=True)
    task: ClassVar[str] = ""

    prompt: str
    negative_prompt: str | None = None
    steps: int = Field(4, ge=1)
    guidance: float = Field(1.0, ge=0.0, le=30.0)
    width: int | None = Field(None, ge=8)
    height: int | None = Field(None, ge=8)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    num_images: int = Field(1, ge=1)
    loras: list[LoraRequest] = Field(default_factory=list)

    @field_validator("prompt", "negative_prompt")
    @classmethod
    def _printable(cls, value):
        if value is not None and "\x00" in value:
            raise ValueError("must not contain NUL characters")
        return value

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, value):
        if value is not None and value % 8:
            raise ValueError(f"must be a multiple of 8, got {value}")
        return value

    @classmethod
    def build(cls, settings: Settings | None = None, **values) -> "Request":
        """Construct, turning pydantic's errors into one InvalidRequest naming the field.
        A `task` key (as in a result's record) must name this request's task. With `settings`,
        the limits are checked too."""
        task = values.pop("task", None)
        if task is not None and task != cls.task:
            raise InvalidRequest(f"task {task!r} does not match {cls.__name__} ({cls.task!r})",
                                 field="task")
        try:
            request = cls(**{k: v for k, v in values.items() if v is not None})
        except ValidationError as exc:
            raise invalid_from_pydantic(exc) from None
        if settings is not None:
            request.check_limits(settings)
        return request

    # -- checks that need Settings or the loaded model -----------------------------------

    def check_limits(self, settings: Settings) -> None:
        if len(self.prompt) > settings.max_prompt_chars:
            raise InvalidRequest(
                f"prompt is {len(self.prompt)} characters, over the limit of "
                f"{settings.max_prompt_chars}", field="prompt")
        if self.negative_prompt and len(self.negative_prompt) > settings.max_prompt_chars:
            raise InvalidRequest(
                f"negative_prompt is over the limit of {settings.max_prompt_chars} characters",
                field="negative_prompt")
        if self.steps > settings.max_steps:
            raise InvalidRequest(f"steps must be at most {settings.max_steps}, got {self.steps}",
                                 field="steps")
        if self.num_images > settings.max_num_images:
            raise InvalidRequest(
                f"num_images must be at most {settings.max_num_images}, got {self.num_images}",
                field="num_images")
        if len(self.loras) > settings.max_loras:
            raise InvalidRequest(f"at most {settings.max_loras} LoRAs per request, "
                                 f"got {len(self.loras)}", field="loras")

    def check_size(self, width: int, height: int, multiple: int, settings: Settings) -> None:
        for name, value in (("width", width), ("height", height)):
            if value % multiple:
                raise InvalidRequest(
                    f"{name} must be a multiple of {multiple}, got {value}", field=name)
            if value > settings.max_side:
                raise InvalidRequest(f"{name} is {value}, over the limit of {settings.max_side} "
                                     "pixels a side", field=name)
        if width * height > settings.max_pixels:
            raise InvalidRequest(
                f"width x height is {width}x{height} = {width * height} pixels, over the limit "
                f"of {settings.max_pixels}", field="width")
        count, field = self.images_per_call()
        if width * height * count > settings.max_step_pixels:
            raise InvalidRequest(
                f"{width}x{height} x {count} {field.removeprefix('num_')} is "
                f"{width * height * count} pixels a step, over the limit of "
                f"{settings.max_step_pixels}", field=field)

    def images_per_call(self) -> tuple[int, str]:
        """(images one pipeline call makes at each step, the field that sets their count)."""
        return self.num_images, "num_images"

    def warnings(self) -> list[str]:
        if self.negative_prompt and self.guidance <= 1.0:
            return [f"guidance {self.guidance} <= 1 disables classifier-free guidance: "
                    "the negative prompt has no effect"]
        return []

    def with_seed(self) -> "Request":
        """A copy with a concrete seed (drawn at random when none was given), for the record."""
        if self.seed is not None:
            return self
        return self.model_copy(update={"seed": random.randrange(2**32)})

    def record(self) -> dict[str, Any]:
        """The request as plain data, images left out (for metadata and logs)."""
        data = self.model_dump(exclude=set(self.image_fields()))
        data["task"] = self.task
        return data

    @classmethod
    def image_fields(cls) -> tuple[str, ...]:
        return ()

    # -- describing the pipeline call ------------------------------------------------------

    def describe(self, model: ModelView) -> PipelineCall:
        """The pipeline call that runs this request on `model`, after every check that needs
        the model (sizes, components). Needs a concrete seed (`with_seed()`)."""
        raise NotImplementedError

    def pipeline_call(self, task: str, width: int, height: int, **details) -> PipelineCall:
        """A call with this request's common fields; `details` are PipelineCall's others."""
        if self.seed is None:
            raise ValueError("describe() needs a concrete seed: call with_seed() first")
        return PipelineCall(
            task=task, prompt=self.prompt, negative_prompt=self.negative_prompt,
            steps=self.steps, guidance=self.guidance, seed=self.seed, count=self.num_images,
            width=width, height=height,
            loras=tuple((lora.ref, lora.weight) for lora in self.loras),
            record=self.record(), inputs=input_digests(self), warnings=tuple(self.warnings()),
            **details)


def invalid_from_pydantic(exc: ValidationError) -> InvalidRequest:
    """pydantic's first error as one InvalidRequest naming the field, in plain words: no
    "Value error," prefix, the value shown once, and objects (images) by their type."""
    first = exc.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or None
    message = first["msg"].removeprefix("Value error, ")
    where = f"{field}: " if field else ""
    value = first.get("input")
    # fewstep's own checks say what they found; pydantic's get the value they refused
    if first["type"] == "value_error" or not isinstance(value, (str, int, float, type(None))):
        return InvalidRequest(f"{where}{message}", field=field)
    return InvalidRequest(f"{where}{message} (got {shown_value(value)})", field=field)


def shown_value(value) -> str:
    """A value as an error message shows it: short, and never an object's repr."""
    if isinstance(value, (str, int, float, bool, type(None))):
        shown = repr(value)
        return shown if len(shown) <= 80 else shown[:77] + "..."
    return f"a {type(value).__name__}"
