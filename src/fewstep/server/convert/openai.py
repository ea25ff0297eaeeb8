"""The OpenAI images API: bodies and edit forms -> core values and images; finished jobs ->
`ImagesResponse`."""

from __future__ import annotations

import re
import time
from typing import Optional

from pydantic import ValidationError

from ...errors import InvalidRequest
from ..backend import JobView
from ..errors import from_validation_errors
from ..protocol.openai import EditsForm, ImagesRequest
from .common import b64, image_from_bytes, parse_json

_SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")

# core field -> the OpenAI field a client sent it in
FIELDS = {"num_images": "n", "width": "size", "height": "size"}


def rename_field(field: str) -> str:
    return FIELDS.get(field, field)


def parse_size(size: Optional[str]) -> tuple[Optional[int], Optional[int]]:
    if size in (None, "auto"):
        return None, None
    match = _SIZE.match(size)
    if not match:
        raise InvalidRequest(f"size must be WIDTHxHEIGHT (like 512x512) or auto, got {size!r}",
                             field="size")
    return int(match[1]), int(match[2])


def values_from(body: ImagesRequest, catalog) -> dict:
    if body.model is not None:
        catalog.check_model(body.model)
    width, height = parse_size(body.size)
    return {"prompt": body.prompt, "negative_prompt": body.negative_prompt,
            "seed": body.seed, "steps": body.steps, "guidance": body.guidance,
            "num_images": body.n, "width": width, "height": height,
            "loras": [lo.model_dump() for lo in body.loras]}


def edit_request(fields: dict, files: dict, catalog, settings):
    """An edit's form -> (body, workflow, values, images): image + mask -> inpaint, image alone
    (or with its own transparency) -> img2img."""
    for name in files:
        if name not in ("image", "mask"):
            raise InvalidRequest(f"{name}: unknown file field", field=name)
    fields = dict(fields)
    if "loras" in fields:
        fields["loras"] = parse_json(fields["loras"], "loras")
    try:
        body = EditsForm.model_validate(fields)
    except ValidationError as exc:
        raise from_validation_errors(exc.errors(), "body", fields) from None
    if "image" not in files:
        raise InvalidRequest("image: a file upload is required", field="image")
    values = values_from(body, catalog)
    values["strength"] = body.strength
    image = image_from_bytes(files["image"], "image", settings, mode="RGBA")
    if "mask" in files:
        mask = edit_mask(image_from_bytes(files["mask"], "mask", settings, mode="RGBA"))
    elif image.getextrema()[3][0] < 255:  # the image's own transparency
        mask = edit_mask(image)
    else:
        mask = None
    images = {"image": image.convert("RGB")}
    if mask is None:
        return body, "img2img", values, images
    images["mask"] = mask
    return body, "inpaint", values, images


def edit_mask(rgba):
    """OpenAI's convention (transparent = repaint) -> fewstep's (white = repaint). A mask
    without transparency is read as fewstep's: white repaints."""
    alpha = rgba.getchannel("A")
    if alpha.getextrema()[0] < 255:
        return alpha.point(lambda a: 255 if a == 0 else 0).convert("RGB")
    return rgba.convert("L").convert("RGB")


def images_response(view: JobView, body: ImagesRequest, store_file, public_url: str | None) -> dict:
    """`store_file(bytes, media type) -> token` keeps a file for a `url` response. URLs are the
    configured public URL's, or relative: never built from the client's Host header."""
    output = view.output
    base = (public_url or "").rstrip("/")
    data = []
    for payload, media in output.files:
        if body.response_format == "url":
            token = store_file(payload, media)
            data.append({"url": f"{base}/v1/files/{token}.png"})
        else:
            data.append({"b64_json": b64(payload)})
    request = output.record.request
    width = output.record.width or request.get("width")
    height = output.record.height or request.get("height")
    return {"created": int(time.time()), "data": data, "output_format": "png",
            "size": f"{width}x{height}" if width and height else None}
