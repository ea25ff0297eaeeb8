"""Every route, every method, generated bad bodies: never a 5xx, always a typed error that names
a field.

The routes, their fields and their body kinds come from the app itself (its routes and OpenAPI
schema), so a new route or field is swept without touching this file. The app runs the real
checks (the tiny engine's `validate`, the real queue); only the generation is replaced by an
instant grey picture, since bodies that happen to be valid are not what is tested here."""

from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from helpers.server import assert_typed_error, make_catalog, sample_image, tiny_env


class QuickEngine:
    """The tiny engine's settings, model facts and plans; `run` returns grey images of the
    planned size at once."""

    def __init__(self, engine):
        self._engine = engine

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def run(self, jobs):
        from fewstep.engine import Result

        results = []
        for job in jobs:
            call = job.call
            frames = call.arguments.get("num_frames")
            shape = (call.count, *((frames,) if frames else ()), call.height, call.width, 3)
            record = self._engine.record(call, width=call.width, height=call.height)
            results.append(Result(task=call.task, images=np.full(shape, 0.5, np.float32),
                                  record=record))
        return results


@pytest.fixture(scope="module")
def swept():
    from fewstep.server.app import create_app
    from fewstep.server.service import ServerOptions

    models, engine = tiny_env()
    app = create_app(QuickEngine(engine), make_catalog(models),
                     ServerOptions(queue_size=64, max_body_bytes=4 * 1024 * 1024,
                                   max_batch=1))
    with TestClient(app, raise_server_exceptions=False,
                    base_url="http://127.0.0.1") as client:  # a loopback Host
        yield app, client


def route_table(app) -> list[tuple[str, str]]:
    """(path, method) for every route the app serves."""
    from fastapi import routing

    iterate = getattr(routing, "iter_route_contexts", None)
    routes = iterate(app.routes) if iterate is not None else app.routes
    table = set()
    for route in routes:
        for method in getattr(route, "methods", None) or ():
            if route.path is not None:
                table.add((route.path, method))
    return sorted(table)


def encoded(image: Image.Image, format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


PNG = encoded(sample_image(64))
B64 = base64.b64encode(PNG).decode()
BAD_FILES = {
    "text": b"just some text",
    "empty": b"",
    "tiny": encoded(sample_image(4)),
    "bmp": encoded(sample_image(64), "BMP"),
    "truncated": PNG[:-300],
}
NAN = object()  # written as a bare NaN token
NESTED = object()  # a list nested 990 deep
TINY_B64 = base64.b64encode(BAD_FILES["tiny"]).decode()
# bad values by the JSON type a field expects: each wrong type once, and the hostile values of
# the expected type
ANY_TYPE = [None, [], {}, NAN, NESTED, True]
BAD_BY_TYPE = {
    "number": [-1, 0, 10**40, 1e308, 1.5, "x"],
    "string": ["", "x" * 20_000, "../../etc/passwd", "/etc/passwd", "nope", 5,
               "https://example.com/x.safetensors", "!!! not base64", TINY_B64,
               base64.b64encode(BAD_FILES["bmp"]).decode(),
               base64.b64encode(b"not an image").decode(), "a\x00b", "\ud800",
               "<lora:style:100>", "<lora:../x:1>", "<lora:" * 500],
    "array": [[None], ["x"] * 100, [TINY_B64], [{"name": "../x"}], [{"name": "nope"}],
              [{"name": "style", "weight": 1e308}], [{"name": "style", "weight": -100}]],
    "object": [{"a": {"b": 1}}, {"sd_model_checkpoint": "../x"}],
    "boolean": ["maybe", 2],
}
BAD_BY_TYPE["integer"] = BAD_BY_TYPE["number"]
ALL_VALUES = ANY_TYPE + [v for values in BAD_BY_TYPE.values() for v in values]


def types_of(prop: dict) -> set[str]:
    options = prop.get("anyOf", [prop])
    return {o.get("type") for o in options if o.get("type") not in (None, "null")} or {"string"}


def bad_values(prop: dict) -> list:
    values = list(ANY_TYPE)
    for kind in sorted(types_of(prop)):
        values += [v for v in BAD_BY_TYPE.get(kind, []) if v not in values]
    return values


GENERIC_BODIES = [
    b"", b"not json", b"{", b"[]", b'"text"', b"null", b"1e999", b"9" * 5000,
    b"[" * 100_000, b"[" * 990 + b"]" * 990, b'{"prompt": NaN}', b"\xff\xfe\x00\x01",
    b'{"prompt": "\\ud800"}', b"{" + b'"a": 1, ' * 1000 + b'"prompt": "x"}',
]
PATH_VALUES = ["nope", "..%2F..%2Fetc%2Fpasswd", "x" * 300, "%00", "..", "a.png"]


def dumps(value) -> str:
    text = json.dumps(value, allow_nan=True)
    return text.replace('"__NAN__"', "NaN").replace(
        '"__NESTED__"', "[" * 990 + "]" * 990)


def marked(value):
    return "__NAN__" if value is NAN else "__NESTED__" if value is NESTED else value


def resolve(schema: dict, spec: dict) -> dict:
    while "$ref" in schema:
        schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]]
    return schema


def base_value(name: str, schema: dict):
    """A plausible value per field name, so that one wrong field at a time is what fails."""
    kinds = {"controlnet": "canny", "adapter": "canny", "motion_adapter": "motion",
             "model": "tiny-sd15", "size": "64x64", "response_format": "b64_json"}
    if name in kinds:
        return kinds[name]
    if name in ("image", "mask", "control_image"):
        return B64
    if name == "init_images":
        return [B64]
    if name in ("width", "height"):
        return 64
    if name == "steps":
        return 2
    if name == "num_frames":
        return 2
    return "x" if name in ("prompt",) or "string" in json.dumps(schema)[:80] else None


def json_bodies(schema: dict, spec: dict) -> list[str]:
    schema = resolve(schema, spec)
    properties = schema.get("properties", {})
    base = {}
    for name, prop in properties.items():
        value = base_value(name, prop)
        if value is not None and (name in schema.get("required", ()) or name in (
                "width", "height", "steps", "num_frames", "size", "init_images")):
            base[name] = value
    bodies = [dumps({**base, "surprise": 1}), dumps({k: v for k, v in base.items()
                                                      if k != "prompt"})]
    for name, prop in properties.items():
        for value in bad_values(prop):
            bodies.append(dumps({**base, name: marked(value)}))
    return bodies


def check(response, what: str, failures: list) -> None:
    if response.status_code >= 500:
        failures.append(f"{what}: {response.status_code} {response.text[:200]}")
        return
    if response.status_code >= 400:
        try:
            error = assert_typed_error(response)
        except AssertionError as exc:
            failures.append(f"{what}: untyped {response.status_code}: {exc}"[:300])
            return
        if error["field"] is None:
            failures.append(f"{what}: {response.status_code} names no field: {error}")


def test_every_route_refuses_bad_input_with_a_typed_4xx(swept):
    app, client = swept
    spec = app.openapi()
    failures: list[str] = []
    table = route_table(app)
    assert len(table) > 30  # the sweep does reach the routes
    for path, method in table:
        params = re.findall(r"{(\w+)}", path)
        for value in PATH_VALUES if params else [None]:
            url = path
            for name in params:
                url = url.replace("{" + name + "}", value)
            what = f"{method} {url[:80]}"
            check(client.request(method, url), what, failures)
            if method not in ("POST", "PUT", "PATCH", "DELETE"):
                continue
            for body in GENERIC_BODIES:
                check(client.request(method, url, content=body,
                                     headers={"content-type": "application/json"}),
                      f"{what} {body[:30]!r}", failures)
            check(client.request(method, url, content=b"--x\r\nbroken",
                                 headers={"content-type": "multipart/form-data; boundary=x"}),
                  f"{what} broken multipart", failures)
            operation = spec["paths"].get(path, {}).get(method.lower(), {})
            content = operation.get("requestBody", {}).get("content", {})
            if "application/json" in content:
                for body in json_bodies(content["application/json"]["schema"], spec):
                    check(client.request(method, url, content=body.encode(
                        "utf-8", "surrogatepass"), headers={"content-type": "application/json"}),
                          f"{what} {body[:120]}", failures)
            if "multipart/form-data" in content:
                sweep_multipart(client, url, content["multipart/form-data"]["schema"], spec,
                                failures)
    shown = {}
    for failure in failures:  # one line per route and kind of failure
        shown.setdefault(failure.split(" ", 2)[1] + failure.rsplit(": ", 1)[0][-12:], failure)
    assert not failures, f"{len(failures)} failures, such as:\n" + "\n".join(shown.values())


def sweep_multipart(client, url, schema, spec, failures) -> None:
    properties = resolve(schema, spec).get("properties", {})
    file_fields = [n for n, p in properties.items() if p.get("format") == "binary"]
    text_fields = [n for n in properties if n not in file_fields]
    good_files = {n: (f"{n}.png", PNG, "image/png") for n in file_fields if n != "mask"}
    base = {"prompt": "x", "size": "64x64", "steps": "2"} if "params" not in properties else {
        "params": json.dumps({"prompt": "x", "width": 64, "height": 64, "steps": 2})}
    base = {k: v for k, v in base.items() if k in text_fields}
    for name in file_fields:
        for kind, data in BAD_FILES.items():
            files = {**good_files, name: (f"{name}.png", data, "image/png")}
            check(client.post(url, data=base, files=files), f"POST {url} {name}={kind}",
                  failures)
    check(client.post(url, data=base), f"POST {url} without files", failures)
    check(client.post(url, data={**base, "image": "text instead of a file"}, files={
        k: v for k, v in good_files.items() if k != "image"}), f"POST {url} image as text",
        failures)
    params_schema = None
    if "params" in text_fields:  # the native upload: params is the JSON body less the images
        params_schema = spec["paths"][url.removesuffix("/upload")]["post"]["requestBody"][
            "content"]["application/json"]["schema"]
    for name in text_fields:
        if name == "params" and params_schema is not None:
            # the JSON route sweeps these fields one by one; here: the text and a sample
            values = [b.decode("utf-8", "replace") for b in GENERIC_BODIES]
            values += json_bodies(params_schema, spec)[::7]
        else:
            values = [dumps(marked(v)) if not isinstance(v, str) else v for v in ALL_VALUES]
        for value in values:
            if "\ud800" in value:  # not encodable as form text at all
                continue
            data = {**base, name: value}
            check(client.post(url, data=data, files=good_files),
                  f"POST {url} {name}={value[:60]!r}", failures)
