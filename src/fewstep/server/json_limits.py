"""JSON bodies parsed without stalling the event loop: bounded in what they hold, and parsed in
short steps in a worker thread.

Parsing and validation hold the interpreter lock for the whole of each call (json's scanner
and pydantic-core are C and Rust without a pause), so a thread alone does not spare the event
loop: one call on a 35 MB body, or on 100,000 keys, kept /healthz waiting for as long as it
ran. So no call here runs long:

* Values are bounded: no request of any API needs more than MAX_VALUES (keys, items,
  scalars). The body's `,` `:` `[` `"` bytes, counted a few megabytes at a time, bound them
  from above (and the steps of the string walk below): a body with more than MAX_SEPARATORS
  is refused unparsed, one with more than MAX_VALUES is parsed and its values counted
  exactly, stopping at the limit.
* Long strings (base64 images) are cut out before the parse and decoded a megabyte at a time;
  what is left, the body's structure, is small. A long string may hold JSON's short escapes
  (line breaks in base64 from tools), not `\\u` escapes: no field takes megabytes of text.

`BodyMiddleware` parses every JSON body this way, one at a time, and leaves the value in the
request's scope, where the routes (`ParsedJsonRoute`) take it instead of parsing again."""

from __future__ import annotations

import asyncio
import json
import secrets

from fastapi import Request
from fastapi.routing import APIRoute

from .errors import BadBody, PayloadTooLarge
from .per_loop import PerLoop

MAX_VALUES = 4096  # keys, array items and scalars of one JSON document
MAX_SEPARATORS = 16 * MAX_VALUES  # beyond this the body is not parsed at all
LONG_STRING = 64 * 1024  # bytes: longer strings are decoded apart, in steps
SCOPE_KEY = "fewstep.json"  # where the middleware leaves a parsed body for the route ...
BODY_KEY = "fewstep.body"  # ... and its bytes
_COUNT_STEP = 1 << 22  # bytes counted per call
_NOT_SEPARATORS = bytes(b for b in range(256) if b not in b',:["')  # deleted to count the rest
_DECODE_STEP = 1 << 20  # bytes of a long string decoded per call


def parse_bounded(data: bytes | bytearray | str, field: str = "body"):
    """The JSON value of `data`. PayloadTooLarge when it holds more than MAX_VALUES values or a
    long string with `\\u` escapes, BadBody when it is not JSON."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    separators = sum(len(raw[i:i + _COUNT_STEP].translate(None, _NOT_SEPARATORS))
                     for i in range(0, len(raw), _COUNT_STEP))
    if separators > MAX_SEPARATORS:
        raise too_many(field)
    token = secrets.token_hex(8)
    skeleton, strings = _cut_long_strings(raw, token, field)
    try:
        value = json.loads(skeleton)
    except (ValueError, RecursionError):
        raise BadBody(f"{field} is not valid JSON (or is nested too deeply)",
                      field=field) from None
    if separators >= MAX_VALUES:
        where = over_limit(value)
        if where is not None:  # the container at fault, named as the client's fields are
            raise too_many(field if not where else where if field == "body"
                           else f"{field}.{where}")
    return _put_back(value, token, strings) if strings else value


def _cut_long_strings(raw: bytes, token: str, field: str) -> tuple[bytes, list[str]]:
    """(the body with each long string replaced by a short placeholder, those strings decoded).
    Walks the quotes only: as many steps as the body has `"` (bounded by the count above)."""
    pieces, strings, pos, end = [], [], 0, 0
    while True:
        start = raw.find(b'"', end)
        if start < 0:
            break
        end = start + 1
        while True:  # the closing quote: one not escaped by an odd run of backslashes
            end = raw.find(b'"', end)
            if end < 0:
                raise BadBody(f"{field} is not valid JSON (an unclosed string)", field=field)
            run = end - 1
            while raw[run] == 0x5C:
                run -= 1
            if (end - 1 - run) % 2 == 0:
                break
            end += 1
        end += 1
        if end - start - 2 >= LONG_STRING:
            pieces.append(raw[pos:start])
            pieces.append(f'"\\u0000{token}-{len(strings)}"'.encode())
            strings.append(_decode_long(raw, start + 1, end - 1, field))
            pos = end
    if not strings:
        return raw, []
    pieces.append(raw[pos:])
    return b"".join(pieces), strings


def _decode_long(raw: bytes, start: int, stop: int, field: str) -> str:
    if raw.find(b"\\u", start, stop) >= 0:
        raise PayloadTooLarge(f"{field}: a string of more than {LONG_STRING // 1024} KiB may "
                              "hold base64 or plain text, not \\u escapes", field=field)
    parts, i = [], start
    while i < stop:
        cut = min(i + _DECODE_STEP, stop)
        while cut < stop and raw[cut] & 0xC0 == 0x80:  # never inside a UTF-8 character ...
            cut -= 1
        run = cut - 1
        while cut < stop and raw[run] == 0x5C:  # ... nor between a backslash and its escape
            run -= 1
        if cut < stop and (cut - 1 - run) % 2:
            cut -= 1
        try:
            parts.append(json.loads(b'"' + raw[i:cut] + b'"'))
        except ValueError:
            raise BadBody(f"{field} is not valid JSON (a string holds control characters or "
                          "bad escapes)", field=field) from None
        i = cut
    return "".join(parts)


def _put_back(value, token: str, strings: list[str]):
    """The long strings in place of their placeholders (as values or as keys)."""
    prefix = f"\x00{token}-"

    def restored(item):
        if isinstance(item, str) and item.startswith(prefix):
            return strings[int(item[len(prefix):])]
        return item

    value = restored(value)
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key in [k for k in item if k.startswith(prefix)]:
                item[restored(key)] = item.pop(key)
            for key, child in item.items():
                item[key] = restored(child)
                stack.append(item[key])
        elif isinstance(item, list):
            for i, child in enumerate(item):
                item[i] = restored(child)
                stack.append(item[i])
    return value


def over_limit(value, limit: int = MAX_VALUES) -> str | None:
    """None when `value` holds at most `limit` values; else the dotted path of the container
    where the count passed it ("" for the top level). Iterative: no depth is too deep."""
    count = 0
    stack = [((), value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, dict):
            count += 2 * len(item)  # keys and values
            children = item.items()
        elif isinstance(item, list):
            count += len(item)
            children = enumerate(item)
        else:
            continue
        if count > limit:
            return ".".join(str(p) for p in path[:4])
        stack.extend(((*path, key), child) for key, child in children
                     if isinstance(child, (dict, list)))
    return None


def too_many(field: str) -> PayloadTooLarge:
    return PayloadTooLarge(f"{field}: the JSON holds more than {MAX_VALUES} values (keys, items "
                           "and scalars); no request needs that many", field=field)


class BodyParser:
    """Parses JSON bodies for the routes (see the module's docstring), one at a time."""

    def __init__(self):
        self._turn = PerLoop(asyncio.Lock)

    async def parse_into(self, scope, chunks: list[bytes]) -> None:
        """Leaves the value of the body in `chunks` in the scope, and the body itself; raises
        PayloadTooLarge or BadBody."""
        async with self._turn.get():
            body, value = await asyncio.to_thread(_assemble_and_parse, chunks)
        scope[BODY_KEY], scope[SCOPE_KEY] = body, value


def _assemble_and_parse(chunks: list[bytes]):
    body = bytearray()
    for chunk in chunks:  # a chunk at a time: no one copy of the whole body
        body += chunk
    return body, parse_bounded(body)


class ParsedJsonRequest(Request):
    """The body and its value as `BodyMiddleware` left them (Starlette would join the body's
    chunks again, and FastAPI parse it again, each in one call on the event loop)."""

    async def body(self):
        if BODY_KEY in self.scope:
            return self.scope[BODY_KEY]
        return await super().body()

    async def json(self):
        if SCOPE_KEY in self.scope:
            return self.scope[SCOPE_KEY]
        return await super().json()


class ParsedJsonRoute(APIRoute):
    """A route whose JSON body is the one `BodyMiddleware` parsed (FastAPI would parse it again,
    in one call on the event loop)."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def parsed_body_handler(request: Request):
            return await handler(ParsedJsonRequest(request.scope, request.receive))

        return parsed_body_handler
