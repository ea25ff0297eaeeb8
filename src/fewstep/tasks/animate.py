"""AnimateDiff (SD1.5 family): a motion adapter plus optional motion LoRAs."""

from __future__ import annotations

from pydantic import Field

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
        from ..errors import InvalidRequest

        if self.num_frames > settings.max_frames:
            raise InvalidRequest(f"num_frames must be at most {settings.max_frames}, got "
                                 f"{self.num_frames}", field="num_frames")

    def run(self, engine, progress, cancel):
        width = self.width or engine.native_size
        height = self.height or engine.native_size
        self.check_size(width, height, 8, engine.settings)
        if width * height * self.num_frames * self.num_images > engine.settings.max_pixels * 16:
            from ..errors import InvalidRequest

            raise InvalidRequest("num_frames x num_images x width x height is over the limit",
                                 field="num_frames")
        pipe = engine.pipeline("animate", motion_adapter=self.motion_adapter)
        kwargs = {"num_frames": self.num_frames, "width": width, "height": height}
        return engine.call(pipe, self, kwargs, progress, cancel,
                           batch_arg="num_videos_per_prompt")
