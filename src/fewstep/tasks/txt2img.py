"""Text-to-image."""

from __future__ import annotations

from .base import Request


class Txt2ImgRequest(Request):
    task = "txt2img"

    def run(self, engine, progress, cancel):
        pipe = engine.pipeline("txt2img")
        width = self.width or engine.native_size
        height = self.height or engine.native_size
        self.check_size(width, height, 8, engine.settings)
        return engine.call(pipe, self, {"width": width, "height": height}, progress, cancel)
