"""Real clients against a real uvicorn server on 127.0.0.1: the official `openai` SDK, the
`webuiapi` AUTOMATIC1111 client, and the load script."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import webuiapi
from PIL import Image

from helpers.server import live_server, make_app, sample_image

KEY = "test-key-123"


@pytest.fixture(scope="module")
def server():
    app = make_app(queue_size=3, api_key=KEY)
    with live_server(app) as url:
        yield url


@pytest.fixture(scope="module")
def keyless():
    """The default service: no key, so the Host, Origin and content-type rules guard it."""
    app = make_app(queue_size=3, allowed_hosts=())
    with live_server(app) as url:
        yield url


@pytest.fixture(params=["key", "keyless"])
def service(request, server, keyless):
    """(url, key): the clients must work both with a key and under the keyless rules."""
    return (server, KEY) if request.param == "key" else (keyless, None)


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_openai_sdk_generate_and_edit(service):
    import base64

    server, key = service
    client = openai.OpenAI(base_url=server + "/v1", api_key=key or "unused", max_retries=0)
    result = client.images.generate(model="tiny-sd15", prompt="a fox", n=2, size="64x64",
                                    response_format="b64_json",
                                    extra_body={"seed": 4, "steps": 2})
    assert len(result.data) == 2
    first = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json)))
    assert first.size == (64, 64)

    by_url = client.images.generate(model="tiny-sd15", prompt="a fox", n=2, size="64x64",
                                    response_format="url", extra_body={"seed": 4, "steps": 2})
    assert by_url.data[0].url.startswith("/v1/files/")  # relative: no public URL configured
    fetched = httpx.get(server + by_url.data[0].url, timeout=30)
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(fetched.content)).convert("RGB")),
                          np.asarray(first.convert("RGB")))  # same seed, same image

    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (16, 16, 48, 48))  # transparent = repaint
    edited = client.images.edit(model="tiny-sd15", prompt="a hat",
                                image=("in.png", _png(sample_image(64)), "image/png"),
                                mask=("mask.png", _png(mask), "image/png"), size="64x64",
                                response_format="b64_json", extra_body={"steps": 2})
    out = np.asarray(Image.open(io.BytesIO(base64.b64decode(edited.data[0].b64_json)))
                     .convert("RGB"))
    assert out.shape == (64, 64, 3)

    with pytest.raises(openai.NotFoundError):
        client.images.generate(model="dall-e-3", prompt="x", size="64x64")
    with pytest.raises(openai.UnprocessableEntityError):
        client.images.generate(model="tiny-sd15", prompt="x", size="big")
    if key is None:
        return
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0).images.generate(
            prompt="x", size="64x64")


def test_webuiapi_client(service):
    server, key = service
    logins = {"username": "any", "password": key} if key else {}
    api = webuiapi.WebUIApi(host="127.0.0.1", port=int(server.rsplit(":", 1)[1]),
                            sampler="LCM", steps=2, **logins)
    assert [m["model_name"] for m in api.get_sd_models()] == ["tiny-sd15"]
    assert {lo["name"] for lo in api.get_loras()} == {"motion", "style", "style-peft"}
    assert api.get_options()["sd_model_checkpoint"] == "tiny-sd15"

    plain = api.txt2img(prompt="a boat", seed=9, width=64, height=64, cfg_scale=1.0)
    styled = api.txt2img(prompt="a boat <lora:style:0.9>", seed=9, width=64, height=64,
                         cfg_scale=1.0)
    assert plain.image.size == (64, 64)
    assert plain.info["seed"] == 9 and plain.info["prompt"] == "a boat"
    assert styled.info["loras"] == [{"ref": "style", "weight": 0.9}]
    assert not np.array_equal(np.asarray(plain.image), np.asarray(styled.image))

    mask = Image.new("RGB", (64, 64))
    mask.paste((255, 255, 255), (16, 16, 48, 48))
    inpainted = api.img2img(images=[sample_image(64)], mask_image=mask, prompt="x", seed=1,
                            width=64, height=64, cfg_scale=1.0, denoising_strength=1.0)
    assert inpainted.image.size == (64, 64)
    assert api.get_progress()["state"]["job_count"] == 0
    api.interrupt()

    with pytest.raises(RuntimeError) as info:
        api.txt2img(prompt="<lora:../../etc/x:1>", width=64, height=64)
    assert info.value.args[0] == 422 and "Traceback" not in info.value.args[1]
    with pytest.raises(RuntimeError) as info:
        api.txt2img(prompt="<lora:unknown:1>", width=64, height=64)
    assert info.value.args[0] == 404


def test_load_script(server):
    script = Path(__file__).resolve().parents[1] / "scripts" / "load_test.py"
    done = subprocess.run(
        [sys.executable, str(script), "--url", server, "--api-key", KEY, "--requests", "14",
         "--concurrency", "10", "--seeds", "2", "--max-seconds", "90"],
        capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "queue limit: 3" in out
    assert "lost: 0  corrupted: 0" in out
    count_429 = int(out.split("429: ")[1].split()[0])
    assert count_429 > 0, out  # 10 at once against a queue of 3: some must be refused
    refused = subprocess.run([sys.executable, str(script), "--url", "http://10.1.2.3:7860"],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2
