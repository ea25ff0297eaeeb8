"""What broke when the service was attacked, each class checked: nothing slow on the event loop,
finished jobs hold only their encoded outputs, typed 4xx instead of 500, the connection kept
after an unexpected error, validation before admission, and the smaller faults."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image, PngImagePlugin

from helpers.server import (
    WAIT,
    Gate,
    assert_typed_error,
    live_server,
    make_app,
    png_b64,
    sample_image,
    tiny_env,
    wait_until,
)

SMALL = {"width": 64, "height": 64, "steps": 1}


@pytest.fixture(scope="module")
def server():
    app = make_app(queue_size=1)
    with live_server(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def client():
    with TestClient(make_app(queue_size=4), raise_server_exceptions=False) as c:
        yield c


def png_bytes(image: Image.Image, format: str = "PNG", **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **kw)
    return buffer.getvalue()


def gradient(size: int) -> Image.Image:
    """A large image that compresses well: a small body, a large decoded image."""
    ramp = np.linspace(0, 255, size, dtype=np.uint8)
    return Image.fromarray(np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None],
                                                        ramp[None, ::-1]), axis=-1))


# -- 1. nothing slow on the event loop ------------------------------------------------------

def test_health_answers_while_an_image_decodes(server, monkeypatch):
    """The decode of a large input is held inside Pillow: /healthz must still answer, which it
    cannot if the decode runs on the event loop."""
    url, _ = server
    big = gradient(1024)
    entered, release = threading.Event(), threading.Event()
    original = PngImagePlugin.PngImageFile.load

    def held_load(self):
        if self.size == big.size:
            entered.set()
            release.wait(WAIT)
        return original(self)

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", held_load)
    body = {"prompt": "x", "image": png_b64(big), "strength": 1.0, **SMALL}
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(httpx.post, url + "/v1/img2img", json=body, timeout=WAIT)
        try:
            assert entered.wait(WAIT), "the decode never started"
            health = httpx.get(url + "/healthz", timeout=10)
            assert health.status_code == 200
            assert not slow.done()  # answered while the decode was still held
        finally:
            release.set()
        assert slow.result(WAIT).status_code == 200, slow.result().text


def test_hostile_lora_tags_block_nothing(server):
    """Tens of thousands of `<lora:` fragments: refused by the prompt limit at once, and the
    event loop answers meanwhile."""
    url, _ = server
    with ThreadPoolExecutor(1) as pool:
        hostile = pool.submit(httpx.post, url + "/sdapi/v1/txt2img", timeout=WAIT,
                              json={"prompt": "<lora:" * 50_000, **SMALL})
        assert httpx.get(url + "/healthz", timeout=10).status_code == 200
        assert_typed_error(hostile.result(WAIT), 422, field="prompt")


def test_lora_tag_parsing_is_linear():
    """The parser alone, past the prompt limit: 100k fragments, with and without closing
    brackets, take a moment (a quadratic parser takes hours)."""
    from fewstep.errors import InvalidRequest
    from fewstep.server.catalog import Catalog
    from fewstep.server.convert.a1111 import split_loras

    catalog = Catalog(loras={"style": "/x/style.safetensors"})
    start = time.perf_counter()
    assert split_loras("<lora:" * 100_000, catalog) == ("<lora:" * 100_000, [])
    with pytest.raises(InvalidRequest):
        split_loras("<lora:" * 100_000 + ">", catalog)
    text, loras = split_loras("a <lora:style:0.5> b " * 20_000, catalog)
    assert loras[:1] == [{"name": "style", "weight": 0.5}] and len(loras) == 20_000
    assert text == " ".join(["a b"] * 20_000)
    assert time.perf_counter() - start < 10.0


# -- 2. memory ---------------------------------------------------------------------------------

def test_memory_stays_flat_over_large_input_requests():
    """50 img2img requests with a 1024x1024 input each (about 3 MB decoded): the process grows
    by far less than what keeping the inputs would take (150 MB)."""
    import gc

    import psutil

    process = psutil.Process()
    image = png_b64(gradient(1024))
    body = {"prompt": "x", "image": image, "strength": 1.0, **SMALL}
    with TestClient(make_app(queue_size=4), raise_server_exceptions=False) as c:
        for _ in range(5):  # warm-up: pipelines, allocator pools
            assert c.post("/v1/img2img", json=body).status_code == 200
        gc.collect()
        before = process.memory_info().rss
        for _ in range(50):
            response = c.post("/v1/img2img", json=body)
            assert response.status_code == 200, response.text
        gc.collect()
        grown = process.memory_info().rss - before
        jobs = c.get("/v1/jobs").json()
    assert len(jobs) == 55  # every job is still there to look up ...
    assert grown < 48 * 1024 * 1024, f"grew by {grown / 2**20:.0f} MiB"  # ... but not its input


# -- 3. typed 4xx instead of 500 ---------------------------------------------------------------

TINY = sample_image(4)


@pytest.mark.parametrize("route,field", [
    ("/v1/img2img", "image"),
    ("/v1/inpaint", "image"),
    ("/v1/controlnet", "control_image"),
    ("/v1/t2i-adapter", "control_image"),
    ("/v1/img2img/upload", "image"),
    ("/v1/images/edits", "image"),
    ("/sdapi/v1/img2img", "init_images.0"),
])
def test_tiny_input_images_are_422(client, route, field):
    tiny = png_bytes(TINY)
    if route == "/v1/img2img/upload":
        response = client.post(route, data={"params": json.dumps({"prompt": "x"})},
                               files={"image": ("t.png", tiny, "image/png")})
    elif route == "/v1/images/edits":
        response = client.post(route, data={"prompt": "x"},
                               files={"image": ("t.png", tiny, "image/png")})
    elif route.startswith("/sdapi"):
        response = client.post(route, json={"prompt": "x", "init_images": [png_b64(TINY)]})
    else:
        extra = {"controlnet": "canny", "adapter": "canny"}
        body = {"prompt": "x", field: png_b64(TINY)}
        if route == "/v1/inpaint":
            body["mask"] = png_b64(TINY)
        for name in ("controlnet", "adapter"):
            if name in route.replace("t2i-", ""):
                body[name] = extra[name]
        response = client.post(route, json=body)
    assert_typed_error(response, 422, field=field)


def test_tiny_masks_are_422(client):
    image = png_bytes(sample_image(64))
    response = client.post("/v1/images/edits", data={"prompt": "x"},
                           files={"image": ("i.png", image, "image/png"),
                                  "mask": ("m.png", png_bytes(TINY), "image/png")})
    assert_typed_error(response, 422, field="mask")
    response = client.post("/sdapi/v1/img2img", json={
        "prompt": "x", "init_images": [png_b64(TINY)], "mask": png_b64(TINY)})
    assert_typed_error(response, 422)


@pytest.mark.parametrize("prompt", ["<lora:style:100>", "<lora:style:-5>", "<lora:style:1e999>",
                                    "<lora:style:nan>"])
def test_a1111_lora_weight_out_of_range_is_422(client, prompt):
    assert_typed_error(client.post("/sdapi/v1/txt2img", json={"prompt": prompt, **SMALL}), 422,
                       field="prompt")


@pytest.mark.parametrize("route,kind", [
    ("/v1/txt2img", "json"), ("/sdapi/v1/txt2img", "json"), ("/sdapi/v1/options", "json"),
    ("/v1/images/generations", "json"), ("/v1/img2img/upload", "params"),
    ("/v1/images/edits", "loras")])
def test_deeply_nested_json_is_a_typed_4xx(client, route, kind):
    for depth in (100_000, 990, 400):
        nested = "[" * depth + "]" * depth
        if kind == "json":
            response = client.post(route, content='{"prompt": "x", "override_settings": '
                                   '{"a": ' + nested + '}, "loras": ' + nested + '}',
                                   headers={"content-type": "application/json"})
        elif kind == "params":
            response = client.post(route, data={"params": nested},
                                   files={"image": ("i.png", png_bytes(TINY), "image/png")})
        else:
            response = client.post(route, data={"prompt": "x", "loras": nested},
                                   files={"image": ("i.png", png_bytes(TINY), "image/png")})
        assert response.status_code < 500, (depth, response.status_code)
        if route != "/sdapi/v1/options":  # which takes any object, and ignores it
            assert 400 <= response.status_code < 500, (depth, response.status_code)
            assert assert_typed_error(response)["field"] is not None


# -- 4. the connection survives an unexpected error --------------------------------------------

def test_connection_survives_an_unexpected_error(server, monkeypatch):
    url, app = server
    backend = app.state.service.backend

    async def broken_health():
        raise RuntimeError("injected fault")

    with httpx.Client(base_url=url, timeout=WAIT) as http:
        first = http.get("/v1/status")
        assert first.status_code == 200
        local = first.extensions["network_stream"].get_extra_info("client_addr")
        monkeypatch.setattr(backend, "health", broken_health)
        failed = http.get("/healthz")
        error = assert_typed_error(failed, 500, kind="internal_error")
        assert "injected" not in error["message"]
        assert failed.headers.get("connection") != "close"
        monkeypatch.undo()
        after = http.get("/healthz")
        assert after.status_code == 200
        # the same connection: the server did not drop it after the 500
        assert after.extensions["network_stream"].get_extra_info("client_addr") == local


# -- 5. validation before admission -------------------------------------------------------------

def test_full_queue_still_refuses_what_can_never_run_with_422(server):
    url, app = server
    _, engine = tiny_env()
    bad = [
        ("/v1/txt2img", {"prompt": "x", "width": 65, "height": 64}, "width"),
        ("/v1/txt2img", {"prompt": "x", "steps": 500}, "steps"),
        ("/v1/img2img", {"prompt": "x", "image": png_b64(TINY)}, "image"),
        ("/v1/img2img", {"prompt": "x", "image": png_b64(sample_image(64)), "steps": 2,
                         "strength": 0.1}, "strength"),
        ("/v1/inpaint", {"prompt": "x", "image": png_b64(sample_image(64)),
                         "mask": png_b64(sample_image(32))}, "mask"),
    ]
    with Gate(engine) as gate, ThreadPoolExecutor(2) as pool:
        running = pool.submit(httpx.post, url + "/v1/txt2img", json={"prompt": "a", **SMALL},
                              timeout=WAIT)
        gate.wait_entered()
        queued = pool.submit(httpx.post, url + "/v1/txt2img", json={"prompt": "b", **SMALL},
                             timeout=WAIT)
        wait_for_depth(app, 1)
        full = httpx.post(url + "/v1/txt2img", json={"prompt": "c", **SMALL}, timeout=WAIT)
        assert_typed_error(full, 429, kind="queue_full")
        for path, body, field in bad:
            assert_typed_error(httpx.post(url + path, json=body, timeout=WAIT), 422,
                               field=field)
        gate.release()
        assert running.result(WAIT).status_code == 200
        assert queued.result(WAIT).status_code == 200


def wait_for_depth(app, depth):
    wait_until(lambda: app.state.service.backend.depth == depth, f"{depth} queued")


# -- 9. smaller ---------------------------------------------------------------------------------

def test_unknown_sampler_is_answered_with_a_warning(client):
    other = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "seed": 1,
                                                   "sampler_name": "Euler a", **SMALL})
    assert other.status_code == 200, other.text
    assert "Euler a" in other.headers["X-Fewstep-Warning"]
    info = json.loads(other.json()["info"])
    assert any("Euler a" in w for w in info["warnings"]) and info["sampler_name"] == "LCM"
    lcm = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "seed": 1, "sampler_name": "LCM",
                                                 **SMALL})
    assert "X-Fewstep-Warning" not in lcm.headers
    assert json.loads(lcm.json()["info"])["warnings"] == []
    assert lcm.json()["images"] == other.json()["images"]  # LCM ran both times
    odd = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "sampler_name": "Эйлер\r\nX: 1",
                                                 **SMALL})
    assert odd.status_code == 200 and "?" in odd.headers["X-Fewstep-Warning"]


def test_a_job_cut_by_shutdown_is_503_shutting_down():
    _, engine = tiny_env()
    app = make_app(queue_size=2)
    backend = app.state.service.backend
    with live_server(app) as url, Gate(engine) as gate, ThreadPoolExecutor(2) as pool:
        running = pool.submit(httpx.post, url + "/v1/txt2img", timeout=WAIT,
                              json={"prompt": "long", "width": 64, "height": 64, "steps": 8})
        gate.wait_entered()
        queued = pool.submit(httpx.post, url + "/v1/txt2img", timeout=WAIT,
                             json={"prompt": "next", **SMALL})
        wait_for_depth(app, 1)
        stopping = threading.Thread(target=backend.stop, kwargs={"timeout": WAIT})
        stopping.start()  # what the end of the SIGTERM grace does
        wait_until(lambda: backend.running is not None and backend.running.cancel.is_set(),
                   "the running job to be told to stop")
        gate.release()
        stopping.join(WAIT)
        for future in (running, queued):
            assert_typed_error(future.result(WAIT), 503, kind="shutting_down")


def test_openai_edits_take_stream_false_as_form_text(client):
    image = ("i.png", png_bytes(sample_image(64)), "image/png")
    for text in ("false", "False", "0"):
        response = client.post("/v1/images/edits", files={"image": image}, data={
            "prompt": "x", "stream": text, "size": "64x64", "steps": "2", "strength": "0.5"})
        assert response.status_code == 200, (text, response.text)
    refused = client.post("/v1/images/edits", files={"image": image},
                          data={"prompt": "x", "stream": "true"})
    assert_typed_error(refused, 422, field="stream")


def test_canny_thresholds_name_their_field(client):
    response = client.post("/v1/controlnet", json={
        "prompt": "x", "control_image": png_b64(sample_image(64)), "controlnet": "canny",
        "canny_low": 200, "canny_high": 100, **SMALL})
    assert_typed_error(response, 422, field="canny_low")


def test_openai_urls_never_come_from_the_host_header():
    body = {"prompt": "x", "size": "64x64", "steps": 1, "response_format": "url"}
    # a name the service answers to (--allowed-hosts): its URLs still never come from it
    hosts = ("testserver", "evil.example")
    with TestClient(make_app(allowed_hosts=hosts), raise_server_exceptions=False) as c:
        url = c.post("/v1/images/generations", json=body,
                     headers={"Host": "evil.example"}).json()["data"][0]["url"]
        assert url.startswith("/v1/files/") and url.endswith(".png")
        assert c.get(url).headers["content-type"] == "image/png"
    public = "https://images.example.org/fewstep"
    with TestClient(make_app(public_url=public + "/", allowed_hosts=hosts),
                    raise_server_exceptions=False) as c:
        url = c.post("/v1/images/generations", json=body,
                     headers={"Host": "evil.example"}).json()["data"][0]["url"]
        assert url.startswith(public + "/v1/files/") and "evil" not in url
        assert c.get(url.removeprefix(public)).status_code == 200


def test_a_stalled_body_gets_408_and_the_connection_closes():
    app = make_app(body_timeout_s=0.5)
    with live_server(app) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=WAIT) as sock:
            sock.sendall(b"POST /v1/txt2img HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
                         b'{"prompt": ')
            received = b""
            while True:  # read until the server closes: it must, without the rest of the body
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), head
    assert json.loads(body)["error"] == {"type": "request_timeout", "field": "body",
                                         "message": "the body did not arrive within 0.5 s"}


@pytest.mark.parametrize("format,kw", [("BMP", {}), ("TIFF", {}), ("PPM", {}), ("ICO", {}),
                                       ("TGA", {}), ("PCX", {})])
def test_only_png_jpeg_webp_and_gif_are_decoded(client, format, kw):
    data = png_bytes(sample_image(64), format, **kw)
    response = client.post("/v1/img2img", json={"prompt": "x", "image": base64.b64encode(
        data).decode(), "strength": 0.5, "width": 64, "height": 64, "steps": 2})
    assert_typed_error(response, 422, field="image")


def test_gif_inputs_give_their_first_frame():
    from fewstep.images import load_image

    frames = [Image.new("RGB", (16, 16), color) for color in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    image = load_image(buffer.getvalue(), "image")
    assert image.size == (16, 16) and image.getpixel((0, 0)) == (255, 0, 0)
    for format in ("JPEG", "WEBP"):
        assert load_image(png_bytes(frames[1], format), "image").size == (16, 16)
