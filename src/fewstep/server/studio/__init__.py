"""fewstep studio: the web page at `/`, served by the service itself.

Plain HTML, CSS and JavaScript modules from `static/` (no build step, nothing loaded from another
origin), which use only the public API: the native `/v1` endpoints, jobs and their server-sent
events, plus `POST /v1/control/canny`, defined here, for the edge-map preview of ControlNet and
T2I-Adapter inputs (the same code as the engine)."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from importlib import resources

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from ...errors import InvalidRequest, NotFound
from ..errors import QueueFull
from ..json_limits import ParsedJsonRoute

STATIC_PREFIX = "/studio/"

_MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}

# Everything the page needs comes from this origin; images are data: or blob: URLs.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data: blob:; media-src 'self' data: blob:; "
    "style-src 'self'; script-src 'self'; connect-src 'self'; object-src 'none'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


class CannyBody(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    image: str = Field(..., description="base64-encoded image (PNG, JPEG or WebP); a data: URL "
                                        "prefix is accepted")
    low: int = Field(100, ge=0, le=255, description="lower hysteresis threshold")
    high: int = Field(200, ge=0, le=255, description="upper hysteresis threshold")


class CannyResponse(BaseModel):
    image: str  # base64 PNG


def _static_files() -> dict[str, tuple[bytes, str, str]]:
    """name -> (bytes, media type, ETag) for every file the page may load. Only these names are
    ever served: a request can never name a path."""
    files = {}
    for entry in resources.files(__name__).joinpath("static").iterdir():
        suffix = "." + entry.name.rsplit(".", 1)[-1] if "." in entry.name else ""
        if not entry.is_file() or suffix not in _MEDIA_TYPES:
            continue
        data = entry.read_bytes()
        etag = '"' + hashlib.sha256(data).hexdigest()[:16] + '"'
        files[entry.name] = (data, _MEDIA_TYPES[suffix], etag)
    return files


def _edge_map(text: str, low: int, high: int, settings) -> bytes:
    """Decode (bounded by the input-pixel limit), run the engine's canny, encode as PNG: the
    whole JSON answer. The edges are the engine's, as one grey channel (the engine's three
    are equal): a third of the bytes to encode and send."""
    from ...control import canny
    from ..convert.common import b64, decode_image, json_bytes

    image = decode_image(text, "image", settings)
    buffer = io.BytesIO()
    canny(image, low, high, channels=1).save(buffer, format="PNG")
    return json_bytes({"image": b64(buffer.getvalue())})


class PreviewSlots:
    """Edge maps of large images take seconds and hundreds of megabytes each: at most
    `running` are made at once (in this pool of threads) and `waiting` more wait their turn;
    beyond that a typed 429. A thread-safe count, so no event loop is bound."""

    def __init__(self, running: int | None = None, waiting: int = 4):
        if running is None:  # a core stays free for the event loop and the engine
            running = max(1, min(2, (os.cpu_count() or 1) - 1))
        self.pool = ThreadPoolExecutor(running, thread_name_prefix="fewstep-preview")
        self.limit = running + waiting
        self.admitted = 0
        self._lock = threading.Lock()

    async def run(self, fn, *args):
        with self._lock:
            if self.admitted >= self.limit:
                raise QueueFull(f"the edge-map preview is busy ({self.limit} at once at most); "
                                "try again shortly")
            self.admitted += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)
        finally:
            with self._lock:
                self.admitted -= 1


def router(service) -> APIRouter:
    api = APIRouter(route_class=ParsedJsonRoute)
    files = _static_files()
    security = {"Content-Security-Policy": CONTENT_SECURITY_POLICY,
                "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}

    def serve(name: str, request: Request) -> Response:
        entry = files.get(name)
        if entry is None:
            raise NotFound(f"no studio file {name[:64]!r}", field="name")
        data, media_type, etag = entry
        headers = {**security, "ETag": etag, "Cache-Control": "no-cache"}
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        return Response(data, media_type=media_type, headers=headers)

    @api.get("/", include_in_schema=False)
    async def page(request: Request):
        return serve("index.html", request)

    @api.get(STATIC_PREFIX + "{name}", include_in_schema=False)
    async def static(name: str, request: Request):
        return serve(name, request)

    previews = PreviewSlots()

    @api.post("/v1/control/canny", tags=["control"], response_model=CannyResponse)
    async def canny_preview(body: CannyBody):
        """The canny edge map ControlNet and T2I-Adapter requests would use for this image and
        these thresholds (the engine's own preprocessing), as a base64 PNG."""
        if body.low > body.high:
            raise InvalidRequest(f"low ({body.low}) must not exceed high ({body.high})",
                                 field="low")
        answer = await previews.run(_edge_map, body.image, body.low, body.high,
                                    service.settings)
        return Response(answer, media_type="application/json")

    return api
