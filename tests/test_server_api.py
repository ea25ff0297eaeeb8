"""The native API on the real app over tiny models (fastapi's TestClient, httpx underneath):
every workflow, results equal to the engine's own, and every kind of bad input -> a typed 4xx
naming the field."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from helpers.server import (
    assert_typed_error,
    decode,
    make_app,
    png_b64,
    sample_image,
    tiny_env,
    unet_raises,
)

SMALL = {"width": 64, "height": 64, "steps": 2}


@pytest.fixture(scope="module")
def client():
    with TestClient(make_app(queue_size=4, max_body_bytes=1024 * 1024),
                    raise_server_exceptions=False) as c:
        yield c


def test_health_catalogue_and_metrics(client):
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").json() == {"ready": True}
    models = client.get("/v1/models").json()
    assert models["data"][0]["id"] == "tiny-sd15"
    assert models["controlnets"] == ["canny"] and models["motion_adapters"] == ["motion"]
    assert [lo["name"] for lo in client.get("/v1/loras").json()["data"]] == [
        "motion", "style", "style-peft"]
    assert client.get("/v1/status").json()["queue_limit"] == 4
    text = client.get("/metrics").text
    for name in ("fewstep_queue_depth", "fewstep_request_seconds", "fewstep_errors_total"):
        assert name in text
    listing = client.get("/v1/models").text + client.get("/v1/loras").text
    assert "/" not in listing.replace("https://", "")  # names only, never paths


def test_txt2img_equals_the_engine_alone(client):
    from fewstep.engine import to_uint8
    from fewstep.tasks import LoraRequest, Txt2ImgRequest

    models, engine = tiny_env()
    body = {"prompt": "a lighthouse", "seed": 7, **SMALL, "loras": [{"name": "style",
                                                                    "weight": 0.8}]}
    response = client.post("/v1/txt2img", json=body)
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["seed"] == 7 and len(data["images"]) == 1
    assert data["images"][0]["media_type"] == "image/png"
    served = decode(data["images"][0]["b64"])
    direct = engine.generate(Txt2ImgRequest(
        prompt="a lighthouse", seed=7, width=64, height=64, steps=2,
        loras=[LoraRequest(ref=str(models.style_sd15), weight=0.8)]))
    assert np.array_equal(served, to_uint8(direct.images[0]))
    # the reproduction record names catalogue entries, never paths
    assert data["params"]["request"]["loras"] == [{"ref": "style", "weight": 0.8}]
    assert data["params"]["model"] == "tiny-sd15"
    assert str(models.root) not in response.text
    assert "fewstep_request_seconds_count{workflow=\"txt2img\"}" in client.get("/metrics").text


@pytest.mark.parametrize("workflow,extra", [
    ("img2img", {"image": "IMG", "strength": 0.5}),
    ("inpaint", {"image": "IMG", "mask": "MASK"}),
    ("controlnet", {"control_image": "IMG", "controlnet": "canny"}),
    ("t2i-adapter", {"control_image": "IMG", "adapter": "canny"}),
    ("animate", {"motion_adapter": "motion", "num_frames": 2, "loras": [{"name": "motion"}]}),
])
def test_every_workflow(client, workflow, extra):
    image = png_b64(sample_image(64, 1))
    mask = Image.new("RGB", (64, 64))
    mask.paste((255, 255, 255), (16, 16, 48, 48))
    values = {k: {"IMG": image, "MASK": png_b64(mask)}.get(v, v) if isinstance(v, str) else v
              for k, v in extra.items()}
    response = client.post(f"/v1/{workflow}", json={"prompt": "x", "seed": 3, **SMALL,
                                                     **values})
    assert response.status_code == 200, response.text
    item = response.json()["images"][0]
    raw = base64.b64decode(item["b64"])
    with Image.open(io.BytesIO(raw)) as im:
        assert im.size == (64, 64)
        if workflow == "animate":
            assert item["media_type"] == "image/gif" and im.n_frames == 2


def test_multipart_upload_equals_json(client):
    image = sample_image(64, 2)
    params = {"prompt": "y", "seed": 5, "strength": 0.5, **SMALL}
    as_json = client.post("/v1/img2img", json={**params, "image": png_b64(image)})
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    import json

    upload = client.post("/v1/img2img/upload", data={"params": json.dumps(params)},
                         files={"image": ("in.png", buffer.getvalue(), "image/png")})
    assert as_json.status_code == upload.status_code == 200, upload.text
    assert np.array_equal(decode(as_json.json()["images"][0]["b64"]),
                          decode(upload.json()["images"][0]["b64"]))
    fields_as_form = client.post("/v1/img2img/upload", data={"prompt": "x"},
                                 files={"image": ("a.png", buffer.getvalue(), "image/png")})
    assert fields_as_form.status_code == 422
    assert "params (the request's other fields as JSON text" in \
        fields_as_form.json()["error"]["message"]
    bad = client.post("/v1/img2img/upload", data={"params": "{nope"},
                      files={"image": ("in.png", buffer.getvalue(), "image/png")})
    assert_typed_error(bad, 400, field="params")
    missing = client.post("/v1/img2img/upload", data={"params": json.dumps(params)})
    assert_typed_error(missing, 422, field="image")


def _png_claiming(width: int, height: int) -> bytes:
    """A valid-looking PNG header claiming width x height, with a tiny body."""
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 10)) + chunk(b"IEND", b""))


def _truncated_png() -> bytes:
    buffer = io.BytesIO()
    sample_image(64).save(buffer, format="PNG")
    return buffer.getvalue()[:-200]


B64 = lambda data: base64.b64encode(data).decode()  # noqa: E731

BAD_JSON = [
    # (raw body, expected status, expected field)
    (b'{"prompt": "x", ', 400, "body"),
    (b'\xff\xfe\x00{"prompt": "\xc3\x28"}', 400, "body"),
    (b'{"prompt": "\xc3\x28"}', 400, "body"),
    (b'[1, 2]', 422, "body"),
    (b'{"prompt": "x", "guidance": NaN}', 422, "guidance"),
    (b'{"prompt": "x", "guidance": Infinity}', 422, "guidance"),
    (b'{"prompt": "x", "steps": -Infinity}', 422, "steps"),
    (b'{"prompt": "x", "width": 1e999}', 422, "width"),
    (b'{"prompt": "x", "loras": [{"name": "style", "weight": NaN}]}', 422, "loras.0.weight"),
    (b'{"prompt": "x", "timeout_s": NaN}', 422, "timeout_s"),
]


@pytest.mark.parametrize("raw,status,field", BAD_JSON)
def test_malformed_bodies(client, raw, status, field):
    response = client.post("/v1/txt2img", content=raw,
                           headers={"content-type": "application/json"})
    assert_typed_error(response, status, field=field)


BAD_VALUES = [
    ("txt2img", {}, 422, "prompt"),
    ("txt2img", {"prompt": "x" * 100_000}, 422, "prompt"),
    ("txt2img", {"prompt": "x", "steps": 0}, 422, "steps"),
    ("txt2img", {"prompt": "x", "steps": 10_000}, 422, "steps"),
    ("txt2img", {"prompt": "x", "width": 65, "height": 64}, 422, "width"),
    ("txt2img", {"prompt": "x", "width": 100_000, "height": 100_000}, 422, "width"),
    ("txt2img", {"prompt": "x", "num_images": 1000}, 422, "num_images"),
    ("txt2img", {"prompt": "x", "seed": -1}, 422, "seed"),
    ("txt2img", {"prompt": "x", "surprise": 1}, 422, "surprise"),
    ("txt2img", {"prompt": 5}, 422, "prompt"),
    ("txt2img", {"prompt": "a\x00b"}, 422, "prompt"),
    ("txt2img", {"prompt": "x", "loras": [{"name": "nope"}]}, 404, "loras.0.name"),
    ("txt2img", {"prompt": "x", "loras": [{"name": "../style"}]}, 422, "loras.0.name"),
    ("txt2img", {"prompt": "x", "loras": [{"name": "/etc/passwd"}]}, 422, "loras.0.name"),
    ("txt2img", {"prompt": "x", "loras": [{"name": "http://evil/x.safetensors"}]}, 422,
     "loras.0.name"),
    ("txt2img", {"prompt": "x", "loras": [{"name": "style", "weight": 100}]}, 422,
     "loras.0.weight"),
    ("txt2img", {"prompt": "x", "loras": [{"name": "style"}] * 9}, 422, "loras"),
    ("controlnet", {"prompt": "x", "control_image": "IMG", "controlnet": "../controlnet"}, 422,
     "controlnet"),
    ("controlnet", {"prompt": "x", "control_image": "IMG", "controlnet": "missing"}, 404,
     "controlnet"),
    ("t2i-adapter", {"prompt": "x", "control_image": "IMG", "adapter": "/abs/path"}, 422,
     "adapter"),
    ("animate", {"prompt": "x", "motion_adapter": "https://x.y/z"}, 422, "motion_adapter"),
    ("img2img", {"prompt": "x", "image": "not base64 !!!"}, 422, "image"),
    ("img2img", {"prompt": "x", "image": B64(b"just some text, not an image")}, 422, "image"),
    ("img2img", {"prompt": "x", "image": B64(_truncated_png())}, 422, "image"),
    ("img2img", {"prompt": "x", "image": B64(_png_claiming(60_000, 60_000))}, 422, "image"),
    ("img2img", {"prompt": "x", "image": ""}, 422, "image"),
    ("img2img", {"prompt": "x", "image": "IMG", "strength": 0}, 422, "strength"),
    ("inpaint", {"prompt": "x", "image": "IMG", "mask": "SMALL"}, 422, "mask"),
]


@pytest.mark.parametrize("workflow,body,status,field", BAD_VALUES)
def test_bad_values(client, workflow, body, status, field):
    images = {"IMG": png_b64(sample_image(64)), "SMALL": png_b64(sample_image(32))}
    body = {k: images.get(v, v) if isinstance(v, str) else v for k, v in body.items()}
    if workflow != "txt2img" and "prompt" in body:
        body = {**SMALL, **body}
    response = client.post(f"/v1/{workflow}", json=body)
    assert_typed_error(response, status, field=field)


def test_oversized_body_is_refused_before_decoding(client):
    big = b'{"prompt": "' + b"x" * (2 * 1024 * 1024) + b'"}'
    response = client.post("/v1/txt2img", content=big,
                           headers={"content-type": "application/json"})
    assert_typed_error(response, 413, kind="payload_too_large")

    def chunks():  # no Content-Length: counted while streaming
        yield b'{"prompt": "'
        for _ in range(40):
            yield b"x" * 65536
        yield b'"}'

    response = client.post("/v1/txt2img", content=chunks(),
                           headers={"content-type": "application/json"})
    assert_typed_error(response, 413, kind="payload_too_large")


def test_unknown_route_and_method_are_typed(client):
    assert_typed_error(client.get("/v1/nothing-here"), 404)
    assert_typed_error(client.get("/v1/txt2img"), 405)
    assert_typed_error(client.get("/v1/jobs/doesnotexist"), 404, field="job_id")


def test_unexpected_error_gives_a_generic_500(client):
    _, engine = tiny_env()
    secret = "/secret/internal/path.safetensors"
    with unet_raises(engine, lambda: RuntimeError(f"boom at {secret}")):
        response = client.post("/v1/txt2img", json={"prompt": "x", **SMALL})
    error = assert_typed_error(response, 500, kind="internal_error")
    assert "boom" not in response.text and "secret" not in response.text, error
    # and the worker goes on
    assert client.post("/v1/txt2img", json={"prompt": "x", **SMALL}).status_code == 200


def test_openapi_schema_matches_routes(client):
    schema = client.get("/openapi.json").json()
    paths = schema["paths"]
    for path in ("/v1/txt2img", "/v1/img2img", "/v1/img2img/upload", "/v1/inpaint",
                 "/v1/controlnet", "/v1/t2i-adapter", "/v1/animate", "/v1/jobs/{job_id}",
                 "/v1/jobs/{job_id}/events", "/v1/images/generations", "/v1/images/edits",
                 "/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/healthz", "/readyz", "/metrics"):
        assert path in paths, path
    body = schema["components"]["schemas"]["Txt2imgBody"]
    assert body["additionalProperties"] is False
    assert "loras" in body["properties"] and "timeout_s" in body["properties"]
    assert "multipart/form-data" in paths["/v1/img2img/upload"]["post"]["requestBody"]["content"]


# -- authentication ---------------------------------------------------------------------------

def test_api_key_bearer_and_basic():
    key = "s3cret-key-value"
    with TestClient(make_app(api_key=key), raise_server_exceptions=False) as c:
        assert c.get("/healthz").status_code == 200
        for path in ("/v1/models", "/metrics", "/sdapi/v1/sd-models", "/openapi.json"):
            assert_typed_error(c.get(path), 401, kind="unauthorized")
        denied = c.post("/v1/txt2img", json={"prompt": "x"},
                        headers={"Authorization": "Bearer wrong"})
        assert_typed_error(denied, 401)
        assert key not in denied.text
        ok = c.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
        assert ok.status_code == 200 and key not in ok.text
        basic = base64.b64encode(f"user:{key}".encode()).decode()
        assert c.get("/sdapi/v1/options",
                     headers={"Authorization": f"Basic {basic}"}).status_code == 200
        wrong = base64.b64encode(b"user:nope").decode()
        assert_typed_error(c.get("/sdapi/v1/options",
                                 headers={"Authorization": f"Basic {wrong}"}), 401)


def test_non_loopback_bind_needs_a_key():
    import argparse

    from fewstep.errors import InvalidRequest
    from fewstep.server.auth import check_bind
    from fewstep.server.cli import add_serve_parser, run_serve

    check_bind("127.0.0.1", None)
    check_bind("::1", None)
    check_bind("0.0.0.0", "k")
    for host in ("0.0.0.0", "192.168.1.5", "::", "example.com"):
        with pytest.raises(InvalidRequest):
            check_bind(host, None)
    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "--model", "unused", "--host", "0.0.0.0"])
    assert run_serve(args) == 2  # refused before anything loads


def test_models_lists_the_workflows_this_model_and_catalogue_can_run():
    from fewstep.server.app import create_app
    from fewstep.server.catalog import Catalog

    _, engine = tiny_env()
    with TestClient(make_app()) as client:
        assert client.get("/v1/models").json()["workflows"] == [
            "txt2img", "img2img", "inpaint", "controlnet", "t2i-adapter", "animate"]
    with TestClient(create_app(engine, Catalog(model_name="tiny-sd15")),
                    base_url="http://127.0.0.1") as client:  # no components: the tasks that need them are not offered
        assert client.get("/v1/models").json()["workflows"] == ["txt2img", "img2img", "inpaint"]
