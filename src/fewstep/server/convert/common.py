"""Shared conversion: base64 and image decoding, JSON text parsing, the core request built from
plain values, and an engine Result encoded into what a finished job keeps."""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import re
from typing import Any, Callable

from pydantic import ValidationError

from ...errors import FewstepError, InvalidRequest
from ...images import load_image
from ...tasks import REQUESTS, LoraRequest
from ...tasks.base import invalid_from_pydantic
from ..backend import JobOutput
from ..protocol.native import COMPONENT_FIELDS

_DATA_URL = re.compile(r"^data:[\w/+.-]*(;[\w=-]+)*;base64,", re.I)


# characters decoded per call: each call holds the interpreter lock, so tens of megabytes of
# base64 are decoded in short steps between which the event loop runs
B64_CHUNK = 1 << 20


def decode_base64(text: str, field: str) -> bytes:
    if not isinstance(text, str):
        raise InvalidRequest(f"{field} must be a base64 string", field=field)
    match = _DATA_URL.match(text[:200])
    start = match.end() if match else 0
    decoded, carry = bytearray(), ""
    try:
        for i in range(start, len(text), B64_CHUNK):
            # line breaks are common in base64 from tools
            piece = carry + "".join(text[i:i + B64_CHUNK].split())
            whole = len(piece) - len(piece) % 4
            if "=" in piece[:whole] and i + B64_CHUNK < len(text):
                raise ValueError("padding before the end")
            decoded += base64.b64decode(piece[:whole], validate=True)
            carry = piece[whole:]
        if carry:
            raise ValueError("a truncated last group")
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"{field} is not valid base64", field=field) from None
    return bytes(decoded)


def image_from_bytes(data: bytes, field: str, settings, mode: str = "RGB"):
    if not data:
        raise InvalidRequest(f"{field} is empty", field=field)
    return load_image(data, field, settings.max_input_pixels, mode=mode)


def decode_image(text: str, field: str, settings, mode: str = "RGB"):
    return image_from_bytes(decode_base64(text, field), field, settings, mode)


def parse_json(text: str | bytes, field: str):
    """JSON text from a form field or a raw body; malformed or absurdly nested -> BadBody,
    holding more values than any request needs -> PayloadTooLarge (see `json_limits`)."""
    from ..json_limits import parse_bounded

    return parse_bounded(text, field)


def check_text(value: str | None, field: str) -> None:
    if value is None:
        return
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequest(f"{field} contains characters that are not valid Unicode "
                             "(lone surrogates)", field=field) from None


def check_prompt_length(value: str | None, field: str, settings) -> None:
    """The prompt limit, checked before anything parses the text."""
    if value is not None and len(value) > settings.max_prompt_chars:
        raise InvalidRequest(f"{field} is {len(value)} characters, over the limit of "
                             f"{settings.max_prompt_chars}", field=field)


def build_request(workflow: str, values: dict[str, Any], catalog, settings,
                  images: dict[str, Any] | None = None):
    """A core request from plain values (names, not refs). `images` are already-decoded PIL
    images keyed by field; base64 text in `values` is decoded otherwise."""
    cls = REQUESTS[workflow]
    values = dict(values)
    values.pop("timeout_s", None)
    check_prompt_length(values.get("prompt"), "prompt", settings)
    check_prompt_length(values.get("negative_prompt"), "negative_prompt", settings)
    check_text(values.get("prompt"), "prompt")
    check_text(values.get("negative_prompt"), "negative_prompt")
    images = dict(images or {})
    for name in cls.image_fields():
        if name in images:
            values[name] = images[name]
        elif isinstance(values.get(name), str):
            values[name] = decode_image(values[name], name, settings)
    loras = []
    for i, entry in enumerate(values.get("loras") or []):
        entry = entry if isinstance(entry, dict) else dict(entry)
        ref = catalog.resolve("lora", entry.get("name"), f"loras.{i}.name")
        try:
            loras.append(LoraRequest(ref=ref, weight=entry.get("weight", 1.0)))
        except ValidationError as exc:
            error = invalid_from_pydantic(exc)
            error.field = f"loras.{i}.{error.field}" if error.field else f"loras.{i}"
            raise error from None
    values["loras"] = loras
    for name, kind in COMPONENT_FIELDS.items():
        if name in cls.model_fields and values.get(name) is not None:
            values[name] = catalog.resolve(kind, values[name], name)
    return cls.build(**values).with_seed()


@contextlib.contextmanager
def fields_renamed(rename: Callable[[str], str]):
    """Errors raised inside name the client's field (`init_images.0`), not the core's."""
    try:
        yield
    except FewstepError as exc:
        if exc.field:
            exc.field = rename(exc.field)
        raise


# -- results ------------------------------------------------------------------------------

def encode_result(result, catalog) -> JobOutput:
    """Runs in the worker: the redacted record and encoded files (PNG with generation
    parameters, or GIF animations), ready to send."""
    from ...outputs import encode_animation, encode_image

    record = catalog.redact_record(result.record)
    files = []
    if result.is_animation:
        fps = int(record.request.get("fps") or 8)
        for i in range(result.images.shape[0]):
            files.append((encode_animation(result.pil_frames(i), ".gif", fps, record, i),
                          "image/gif"))
    else:
        for i, image in enumerate(result.pil_images()):
            files.append((encode_image(image, ".png", record, i), "image/png"))
    return JobOutput(files=tuple(files), record=record,
                     warnings=tuple(catalog.redact(w) for w in result.warnings),
                     seconds=result.seconds)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def json_bytes(payload) -> bytes:
    return json.dumps(payload, ensure_ascii=False, allow_nan=False,
                      separators=(",", ":")).encode("utf-8")
