"""One module per task: a typed request and how it runs on the engine."""

from .animate import AnimateRequest
from .base import LoraRequest, Request
from .controlnet import ControlNetRequest
from .img2img import Img2ImgRequest
from .inpaint import InpaintRequest
from .t2i_adapter import T2IAdapterRequest
from .txt2img import Txt2ImgRequest

REQUESTS: dict[str, type[Request]] = {
    cls.task: cls
    for cls in (Txt2ImgRequest, Img2ImgRequest, InpaintRequest, ControlNetRequest,
                T2IAdapterRequest, AnimateRequest)
}

__all__ = ["REQUESTS", "LoraRequest", "Request", "Txt2ImgRequest", "Img2ImgRequest",
           "InpaintRequest", "ControlNetRequest", "T2IAdapterRequest", "AnimateRequest"]
