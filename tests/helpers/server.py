"""Shared helpers of the service tests: tiny models and one Engine for the whole run (built
once, cached in this module), apps over it, a real uvicorn server on 127.0.0.1, and a gate
that holds the worker inside a denoising step so queue states can be set up without sleeps."""

from __future__ import annotations

import atexit
import base64
import contextlib
import functools
import io
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

WAIT = 60.0  # upper bound of every wait in these tests


@functools.cache
def tiny_env():
    """(models, engine), built once per process."""
    from fewstep.build import build_engine
    from fewstep.testing import build_tiny_models

    root = Path(tempfile.mkdtemp(prefix="fewstep-server-"))
    atexit.register(shutil.rmtree, root, True)
    models = build_tiny_models(root / "models")
    engine = build_engine(model=str(models.sd15), lcm_lora=str(models.lcm_sd15), device="cpu")
    return models, engine


def make_catalog(models):
    from fewstep.server.catalog import Catalog

    return Catalog(
        model_name="tiny-sd15",
        loras={"style": str(models.style_sd15), "style-peft": str(models.style_sd15_peft),
               "motion": str(models.motion_lora)},
        controlnets={"canny": str(models.controlnet)},
        adapters={"canny": str(models.adapter_sd15)},
        motion_adapters={"motion": str(models.motion_adapter)},
        hidden={"tiny-sd15": str(models.sd15), "lcm-lora": str(models.lcm_sd15)},
    )


def make_app(**options):
    from fewstep.server.app import create_app
    from fewstep.server.service import ServerOptions

    models, engine = tiny_env()
    # TestClient's requests say `Host: testserver`
    options.setdefault("allowed_hosts", ("testserver",))
    return create_app(engine, make_catalog(models), ServerOptions(**options))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live_server(app):
    """A real uvicorn server on 127.0.0.1 (random port) in a thread, configured as `fewstep
    serve` configures it (header timeout, connection bound); yields its base URL."""
    import uvicorn

    from fewstep.server.connections import uvicorn_config

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn_config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    end = time.monotonic() + WAIT
    while not server.started:
        assert time.monotonic() < end, "server did not start"
        assert thread.is_alive(), "server thread died"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(WAIT)
        sock.close()


class Gate:
    """Holds the worker at the start of the next UNet call until `release()`. `entered` is set
    when a job is held, so a test knows a job is running."""

    def __init__(self, engine, fail_after: float = WAIT):
        self.open = threading.Event()
        self.entered = threading.Event()
        self._fail_after = fail_after
        self._handle = engine.base.unet.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.entered.set()
        if not self.open.wait(self._fail_after):
            raise RuntimeError("gate was never released")

    def wait_entered(self):
        assert self.entered.wait(WAIT), "no job reached the UNet"

    def release(self):
        self.open.set()
        self._handle.remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


@contextlib.contextmanager
def unet_raises(engine, exc_factory, times: int = 1):
    """The next `times` UNet calls raise `exc_factory()` (fault injection)."""
    left = [times]

    def hook(module, args):
        if left[0] > 0:
            left[0] -= 1
            raise exc_factory()

    handle = engine.base.unet.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def png_b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def sample_image(size=64, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def decode(b64text: str) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(b64text))) as im:
        return np.asarray(im.convert("RGB"))


def wait_until(predicate, what: str, timeout: float = WAIT, interval: float = 0.02):
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(interval)


def assert_typed_error(response, status=None, field=None, kind=None):
    assert 400 <= response.status_code < 600, response.status_code
    if status is not None:
        assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error["type"], str) and isinstance(error["message"], str), body
    if field is not None:
        assert error["field"] == field, body
    if kind is not None:
        assert error["type"] == kind, body
    text = response.text
    assert "Traceback" not in text and "File \"" not in text, text
    models, _ = tiny_env()
    assert str(models.root) not in text and "/tmp/" not in text, text
    return error
