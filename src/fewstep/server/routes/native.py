"""The native API: one endpoint per workflow, JSON with base64 images or multipart uploads;
`wait=false` answers 202 with a job to follow at /v1/jobs/{id}."""

from fastapi import APIRouter, Query, Request

from ...errors import InvalidRequest
from ...tasks import REQUESTS
from ..convert.common import build_request
from ..convert.native import generation_result, job_info, upload_values
from ..json_limits import ParsedJsonRoute
from ..protocol.common import ERRORS
from ..protocol.native import (
    BODY_MODELS,
    UPLOAD_MODELS,
    WORKFLOW_HELP,
    WORKFLOWS,
    GenerationResponse,
    JobInfo,
)
from .common import converted, counted, json_response, read_form, run_job

WAIT = Query(True, description=(
    "false: return 202 with a job at once; follow it at /v1/jobs/{id} and "
    "/v1/jobs/{id}/events"))


def router(service) -> APIRouter:
    api = APIRouter(tags=["native"], route_class=ParsedJsonRoute)
    backend, catalog, settings = service.backend, service.catalog, service.settings

    async def generate(http_request: Request, workflow: str, build, wait: bool):
        """`build() -> (core request, timeout_s)` runs in a worker thread."""
        async with counted(service, workflow) as outcome:
            core, timeout_s = await converted(build)
            if not wait:
                view = await backend.submit(workflow, core, timeout_s=service.timeout(timeout_s))
                outcome["status"] = "accepted"
                return await json_response(
                    job_info(view, service.redact, False), status_code=202,
                    headers={"X-Job-Id": view.id, "Location": f"/v1/jobs/{view.id}"})
            view = await run_job(service, http_request, workflow, core, timeout_s)
            outcome["status"] = "ok"
            return await json_response(generation_result(view), headers={"X-Job-Id": view.id})

    def add_json_route(workflow: str):
        Body = BODY_MODELS[workflow]

        async def endpoint(request: Request, body: Body,  # type: ignore[valid-type]
                           wait: bool = WAIT):
            values = body.model_dump()

            def build():
                return (build_request(workflow, values, catalog, settings),
                        values.get("timeout_s"))

            return await generate(request, workflow, build, wait)

        endpoint.__name__ = f"{workflow.replace('-', '_')}"
        api.add_api_route(f"/v1/{workflow}", endpoint, methods=["POST"],
                          summary=WORKFLOW_HELP[workflow], response_model=GenerationResponse,
                          responses={**ERRORS, 202: {"model": JobInfo}})

    def add_upload_route(workflow: str):
        Params = UPLOAD_MODELS[workflow]
        image_fields = REQUESTS[workflow].image_fields()
        schema = {
            "type": "object",
            "required": ["params", *image_fields],
            "properties": {
                "params": {"type": "string", "contentMediaType": "application/json",
                           "description": (f"JSON text: the fields of /v1/{workflow} without "
                                           "the images")},
                **{f: {"type": "string", "format": "binary"} for f in image_fields},
            },
        }

        async def endpoint(request: Request, wait: bool = WAIT):
            fields, files = await read_form(request, len(image_fields), 8,
                                            service.options.max_body_bytes)
            for name, parts in files.items():
                if len(parts) > 1:
                    raise InvalidRequest(f"{name}: one file only", field=name)

            def build():
                values, images = upload_values(Params, image_fields, fields,
                                               {k: v[0] for k, v in files.items()}, settings)
                return (build_request(workflow, values, catalog, settings, images),
                        values.get("timeout_s"))

            return await generate(request, workflow, build, wait)

        endpoint.__name__ = f"{workflow.replace('-', '_')}_upload"
        api.add_api_route(f"/v1/{workflow}/upload", endpoint, methods=["POST"],
                          summary=f"{WORKFLOW_HELP[workflow]} Multipart upload.",
                          response_model=GenerationResponse,
                          responses={**ERRORS, 202: {"model": JobInfo}},
                          openapi_extra={"requestBody": {"required": True, "content": {
                              "multipart/form-data": {"schema": schema}}}})

    for workflow in WORKFLOWS:
        add_json_route(workflow)
        if workflow in UPLOAD_MODELS:
            add_upload_route(workflow)
    return api
