"""Text-to-image."""

from __future__ import annotations

from .base import Request


class Txt2ImgRequest(Request):
    task = "txt2img"

    def describe(self, model):
        width = self.width or model.native_size
        height = self.height or model.native_size
        self.check_size(width, height, 8, model.settings)
        return self.pipeline_call("txt2img", width, height,
                                  arguments={"width": width, "height": height})
