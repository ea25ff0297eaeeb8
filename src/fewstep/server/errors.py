"""Errors of the service and their one mapping to HTTP: every failure becomes a typed JSON body
`{"error": {"type", "message", "field"}}`. Messages of the unexpected are never sent."""

from __future__ import annotations

import json
import logging

from ..errors import FewstepError, InvalidRequest

log = logging.getLogger("fewstep.server")


class PayloadTooLarge(InvalidRequest):
    kind = "payload_too_large"
    http_status = 413


class BadBody(InvalidRequest):
    """A body that is not parseable at all (malformed JSON, not UTF-8, broken multipart)."""

    kind = "malformed_body"
    http_status = 400


class QueueFull(FewstepError):
    kind = "queue_full"
    http_status = 429


class DeadlineExceeded(FewstepError):
    kind = "deadline_exceeded"
    http_status = 504


class ShuttingDown(FewstepError):
    kind = "shutting_down"
    http_status = 503


class Unauthorized(FewstepError):
    kind = "unauthorized"
    http_status = 401


class JobNotFound(FewstepError):
    kind = "not_found"
    http_status = 404


class InternalError(FewstepError):
    """Anything unexpected: the client sees only this generic text; the log has the rest."""

    kind = "internal_error"
    http_status = 500

    def __init__(self, message: str = "internal error; the server log has the details"):
        super().__init__(message)


def error_payload(kind: str, message: str, field: str | None = None) -> dict:
    return {"error": {"type": kind, "message": message, "field": field}}


def error_body(exc: FewstepError, redact=None) -> dict:
    message = exc.message if redact is None else redact(exc.message)
    return error_payload(exc.kind, message, exc.field)


def error_bytes(exc: FewstepError, redact=None) -> bytes:
    return json.dumps(error_body(exc, redact)).encode()


def field_from_loc(loc) -> str | None:
    """pydantic/FastAPI error location -> dotted field name (without the 'body' prefix)."""
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header", "form")]
    return ".".join(parts) or None


def from_validation_errors(errors) -> FewstepError:
    """FastAPI's RequestValidationError list -> one typed error naming the first field."""
    errors = list(errors)
    if not errors:
        return InvalidRequest("invalid request")
    first = errors[0]
    if first.get("type") == "json_invalid":
        return BadBody("the body is not valid JSON", field="body")
    field = field_from_loc(first.get("loc", ())) or "body"
    value = first.get("input")
    shown = repr(value) if isinstance(value, (int, float, bool)) or value is None else \
        type(value).__name__
    if isinstance(value, str):
        shown = repr(value if len(value) <= 40 else value[:37] + "...")
    if first.get("type") == "missing":
        return InvalidRequest(f"{field}: field required", field=field)
    return InvalidRequest(f"{field}: {first.get('msg', 'invalid value')} (got {shown})",
                          field=field)
