"""The OpenAI images API: POST /v1/images/generations and /v1/images/edits (image + mask ->
inpaint; without a mask -> img2img), `response_format` b64_json or url (served here), `size`,
`n`. The official `openai` SDK works against it with `base_url` and `api_key`."""

from __future__ import annotations

from fastapi import APIRouter, Request

from ...errors import InvalidRequest
from ..convert import openai as convert
from ..convert.common import build_request, fields_renamed
from ..json_limits import ParsedJsonRoute
from ..protocol.common import ERRORS
from ..protocol.openai import EditsForm, GenerationsBody, ImagesResponse
from .common import converted, counted, json_response, read_form, run_job


def router(service) -> APIRouter:
    api = APIRouter(tags=["openai"], route_class=ParsedJsonRoute)
    catalog, settings = service.catalog, service.settings

    async def respond(request: Request, workflow: str, body, build):
        """`build() -> core request` runs in a worker thread."""
        async with counted(service, workflow) as outcome:
            with fields_renamed(convert.rename_field):
                core = await converted(build)
                view = await run_job(service, request, workflow, core, body.timeout_s)
            outcome["status"] = "ok"
            payload = convert.images_response(view, body, service.files.put,
                                              service.options.public_url)
            return await json_response({k: v for k, v in payload.items() if v is not None})

    @api.post("/v1/images/generations", response_model=ImagesResponse,
              response_model_exclude_none=True, responses=ERRORS)
    async def generations(request: Request, body: GenerationsBody):
        """Text to image (OpenAI `images.generate`)."""
        def build():
            return build_request("txt2img", convert.values_from(body, catalog), catalog,
                                 settings)

        return await respond(request, "txt2img", body, build)

    edit_schema = {"type": "object", "required": ["image", "prompt"], "properties": {
        "image": {"type": "string", "format": "binary"},
        "mask": {"type": "string", "format": "binary", "description": (
            "transparent (alpha 0) marks what to repaint; without alpha, white does")},
        **{name: {"type": "string"} for name in EditsForm.model_fields
           if name not in ("loras",)},
        "loras": {"type": "string", "description": "JSON list of {name, weight}"},
    }}

    @api.post("/v1/images/edits", response_model=ImagesResponse,
              response_model_exclude_none=True, responses=ERRORS,
              openapi_extra={"requestBody": {"required": True, "content": {
                  "multipart/form-data": {"schema": edit_schema}}}})
    async def edits(request: Request):
        """Image + mask -> inpaint; image alone -> img2img (OpenAI `images.edit`)."""
        fields, files = await read_form(request, 4, 32, service.options.max_body_bytes)
        merged: dict[str, list] = {}
        for key, parts in files.items():  # the SDK sends several images as image[]
            merged.setdefault("image" if key == "image[]" else key, []).extend(parts)
        files = merged
        for name, parts in files.items():
            if len(parts) > 1:
                raise InvalidRequest(f"{name}: one file only", field=name)
        body, workflow, values, images = await converted(
            convert.edit_request, fields, {k: v[0] for k, v in files.items()}, catalog,
            settings)
        return await respond(request, workflow, body, lambda: build_request(
            workflow, values, catalog, settings, images))

    return api
