"""The native API: upload forms -> values and images; job views -> job info and results."""

from __future__ import annotations

from pydantic import ValidationError

from ...errors import InvalidRequest
from ..backend import DONE, JobView
from ..errors import from_validation_errors
from .common import b64, image_from_bytes, parse_json


def upload_values(params_model, image_fields, fields: dict, files: dict, settings):
    """A multipart upload's `params` JSON text and image files -> (values, decoded images)."""
    unknown = [k for k in (*fields, *files) if k not in ("params", *image_fields)]
    hint = (f"an upload has the form fields params (the request's other fields as JSON text, "
            f"e.g. {{\"prompt\": \"a cat\"}}) and {', '.join(image_fields)} (image files)")
    if unknown:
        raise InvalidRequest(f"{unknown[0]}: unknown form field; {hint}", field=unknown[0])
    text = fields.get("params")
    if not isinstance(text, str):
        raise InvalidRequest(f"params: a JSON text form field is required; {hint}",
                             field="params")
    params = parse_json(text, "params")
    try:
        values = params_model.model_validate(params).model_dump()
    except ValidationError as exc:
        raise from_validation_errors(exc.errors(), "params", params) from None
    images = {}
    for name in image_fields:
        if name not in files:
            raise InvalidRequest(f"{name}: a file upload is required", field=name)
        images[name] = image_from_bytes(files[name], name, settings)
    return values, images


def generation_result(view: JobView) -> dict:
    output = view.output
    return {
        "id": view.id,
        "workflow": view.workflow,
        "seed": output.record.request["seed"],
        "images": [{"b64": b64(data), "media_type": media} for data, media in output.files],
        "params": output.record.to_dict(),
        "warnings": list(output.warnings),
        "seconds": round(output.seconds, 4),
    }


def job_info(view: JobView, redact, with_result: bool = True) -> dict:
    info = view.summary()
    error = view.error
    info["error"] = None if error is None else {
        "type": error.kind, "message": redact(error.message), "field": error.field}
    info["result"] = generation_result(view) if with_result and view.state == DONE \
        and view.output is not None else None
    info["events"] = f"/v1/jobs/{view.id}/events"
    return info
