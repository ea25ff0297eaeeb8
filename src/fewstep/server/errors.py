"""Errors of the service and their one mapping to HTTP. Every failure becomes a typed JSON body
`{"error": {"type", "message", "field"}}` built here; core errors carry no status: `STATUS` maps
their classes. Messages of the unexpected are never sent."""

from __future__ import annotations

import json

from ..errors import (
    Cancelled,
    FewstepError,
    InvalidRequest,
    LoraError,
    ModelError,
    NotFound,
    OfflineError,
    OutOfMemory,
)


class PayloadTooLarge(InvalidRequest):
    kind = "payload_too_large"


class BadBody(InvalidRequest):
    """A body that is not parseable at all (malformed JSON, not UTF-8, broken multipart)."""

    kind = "malformed_body"


class BodyTimeout(InvalidRequest):
    """The body did not arrive in time (a stalled or trickling upload)."""

    kind = "request_timeout"


class HostNotAllowed(InvalidRequest):
    """A Host header naming neither loopback nor a configured name (DNS rebinding)."""

    kind = "host_not_allowed"


class CrossOrigin(InvalidRequest):
    """A write sent by a page of another origin."""

    kind = "cross_origin"


class UnsupportedMediaType(InvalidRequest):
    """A body of a type no route reads (JSON must say application/json)."""

    kind = "unsupported_media_type"


class QueueFull(FewstepError):
    kind = "queue_full"

    def __init__(self, message: str, *, retry_after: int = 1):
        super().__init__(message)
        self.headers = {"Retry-After": str(retry_after)}


class DeadlineExceeded(FewstepError):
    kind = "deadline_exceeded"


class ShuttingDown(FewstepError):
    kind = "shutting_down"

    def __init__(self, message: str = "the server is shutting down; not taking new work"):
        super().__init__(message)
        self.headers = {"Retry-After": "30"}


class Unauthorized(FewstepError):
    kind = "unauthorized"

    def __init__(self, message: str = "missing or wrong API key (send 'Authorization: Bearer "
                                      "KEY')"):
        super().__init__(message, field="authorization")
        self.headers = {"WWW-Authenticate": 'Bearer realm="fewstep", Basic realm="fewstep"'}


class JobNotFound(NotFound):
    pass


class ReplicaUnavailable(FewstepError):
    """No replica could run the job (Ray Serve): the one running it died, or none is ready."""

    kind = "replica_unavailable"

    def __init__(self, message: str, *, retry_after: int = 5):
        super().__init__(message)
        self.headers = {"Retry-After": str(retry_after)}


class InternalError(FewstepError):
    """Anything unexpected: the client sees only this generic text; the log has the rest."""

    kind = "internal_error"

    def __init__(self, message: str = "internal error; the server log has the details"):
        super().__init__(message)


# The one table from error classes to statuses: the most specific class in an error's MRO wins.
STATUS: dict[type, int] = {
    # core errors
    InvalidRequest: 422,
    NotFound: 404,
    ModelError: 422,
    LoraError: 422,
    OfflineError: 503,
    Cancelled: 499,
    OutOfMemory: 503,
    # the service's own
    BadBody: 400,
    HostNotAllowed: 400,
    Unauthorized: 401,
    CrossOrigin: 403,
    BodyTimeout: 408,
    PayloadTooLarge: 413,
    UnsupportedMediaType: 415,
    QueueFull: 429,
    InternalError: 500,
    ShuttingDown: 503,
    ReplicaUnavailable: 503,
    DeadlineExceeded: 504,
}


def status_for(exc: FewstepError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


def error_payload(kind: str, message: str, field: str | None = None) -> dict:
    return {"error": {"type": kind, "message": message, "field": field}}


def about_input(exc: FewstepError) -> FewstepError:
    """Marks an error raised while reading a request (before any work): its message holds only
    the client's own values and catalogue names, and is sent as it is. Redacting it would
    turn a guessed server path that is a catalogue reference into that entry's name, and so
    answer differently when the guess exists."""
    exc.about_input = True
    return exc


def error_body(exc: FewstepError, redact=None) -> dict:
    if getattr(exc, "about_input", False):
        redact = None
    message = exc.message if redact is None else redact(exc.message)
    return error_payload(exc.kind, message, exc.field)


def error_headers(exc: FewstepError) -> dict[str, str]:
    return dict(getattr(exc, "headers", None) or {})


async def send_error(send, exc: FewstepError, *, close: bool = False, redact=None) -> None:
    """Send `exc` as a complete typed response from pure ASGI code (the middlewares)."""
    body = json.dumps(error_body(exc, redact)).encode()
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode("latin-1"), v.encode("latin-1"))
                for k, v in error_headers(exc).items()]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status_for(exc), "headers": headers})
    await send({"type": "http.response.body", "body": body})


_UNKNOWN = object()


def field_from_loc(loc, value=_UNKNOWN, *, located: bool = False,
                   missing: bool = False) -> str | None:
    """pydantic's error location -> the dotted name of the client's field, as sent.

    `located`: the first element is FastAPI's location (`body`, `query`, ...), dropped; only
    that one, so fields called `path` or `body` keep their names. With the input `value`
    (the body), elements that are not a key or an index of it are dropped: they name a
    union's branch (`str`, `list[...]`) or a key's validator, not anything the client sent.
    `missing`: the last element is a required field the input lacks (kept)."""
    parts = list(loc)
    if located and parts:
        if parts.pop(0) != "body":
            value = _UNKNOWN  # a query or header parameter: its name is all there is
    names = []
    for i, part in enumerate(parts):
        if value is not _UNKNOWN:
            if isinstance(value, dict) and part in value:
                value = value[part]
            elif isinstance(value, list) and isinstance(part, int) \
                    and 0 <= part < len(value):
                value = value[part]
            elif not (missing and i == len(parts) - 1):
                continue  # a branch or validator name
        names.append(str(part))
    return ".".join(names) or None


def from_validation_errors(errors, root: str = "body", value=_UNKNOWN, *,
                           located: bool = False) -> FewstepError:
    """pydantic's (or FastAPI's RequestValidationError's) error list -> one typed error naming
    the first field; `root` names the whole value (the body, or a form field's JSON), `value`
    is that input (to tell its fields from pydantic's branch names), `located` says the
    locations start with FastAPI's `body`/`query`/... element."""
    errors = list(errors)
    if not errors:
        return about_input(InvalidRequest("invalid request", field=root))
    first = errors[0]
    if first.get("type") == "json_invalid":
        return about_input(BadBody(f"{root} is not valid JSON", field=root))
    missing = first.get("type") == "missing"
    field = field_from_loc(first.get("loc", ()), value, located=located,
                           missing=missing) or root
    if missing:
        return about_input(InvalidRequest(f"{field}: field required", field=field))
    return about_input(InvalidRequest(
        f"{field}: {first.get('msg', 'invalid value')} (got {shown(first.get('input'))})",
        field=field))


def shown(value) -> str:
    """A short, safe rendering of a client's value for an error message."""
    if isinstance(value, str):
        return repr(value if len(value) <= 40 else value[:37] + "...")
    if isinstance(value, bool) or value is None or isinstance(value, float):
        return repr(value)
    if isinstance(value, int):
        return repr(value) if abs(value) < 10**30 else "a very large integer"
    return type(value).__name__
