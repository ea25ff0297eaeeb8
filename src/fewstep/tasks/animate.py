"""AnimateDiff (SD1.5 family): a motion adapter plus optional motion LoRAs."""

from __future__ import annotations

from pydantic import Field

from ..errors import InvalidRequest
from .base import Request


class AnimateRequest(Request):
    task = "animate"
    motion_adapter: str = Field(min_length=1)
    num_frames: int = Field(16, ge=1)
    fps: int = Field(8, ge=1, le=60)
    steps: int = Field(5, ge=1)  # the recipe's values for AnimateDiff
    guidance: float = Field(1.25, ge=0.0, le=30.0)

    def check_limits(self, settings):
        super().check_limits(settings)
        if self.num_frames > settings.max_frames:
            raise InvalidRequest(f"num_frames must be at most {settings.max_frames}, got "
                                 f"{self.num_frames}", field="num_frames")

    def images_per_call(self):
        return self.num_images * self.num_frames, "num_frames"

    def describe(self, model):
        width = self.width or model.native_size
        height = self.height or model.native_size
        self.check_size(width, height, 8, model.settings)  # frames too: images_per_call
        return self.pipeline_call(
            "animate", width, height, components=(("motion_adapter", self.motion_adapter),),
            batch_arg="num_videos_per_prompt", output="frames",
            arguments={"num_frames": self.num_frames, "width": width, "height": height})
