"""Helpers of the studio tests: finding Chromium (Debian's, driven by Playwright), a gate that
holds the worker before chosen denoising steps, and a page wrapper that records what the page
asked for."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import pytest

from helpers.server import WAIT

INSTALL_HINT = ("the studio browser tests need Chromium and Playwright for Python: "
                "`sudo apt-get install -y chromium` and `pip install playwright` "
                "(Playwright's own browser download is not needed); or set FEWSTEP_CHROMIUM "
                "to a Chromium binary")


def chromium_path() -> str | None:
    for candidate in (os.environ.get("FEWSTEP_CHROMIUM"), "/usr/bin/chromium",
                      shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def require_browser() -> str:
    """The Chromium binary, or skip (fail under CI, where these tests must run)."""
    problem = None
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        problem = "playwright is not installed"
    path = chromium_path()
    if path is None and problem is None:
        problem = "no Chromium found"
    if problem is None:
        return path
    message = f"{problem}: {INSTALL_HINT}"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI must run the browser tests, but {message}", pytrace=False)
    pytest.skip(message)


def launch_args() -> list[str]:
    # No sandbox: Chromium refuses it as root, and CI containers often lack the namespaces it
    # needs; the browser only ever loads the local test server's page.
    return ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]


class StepGate:
    """Holds the worker before the UNet calls numbered in `hold` (1-based, counted from
    creation) until `proceed()`. Without classifier-free guidance there is one call per step,
    so holding call 2 stops a job after its first step has been reported."""

    def __init__(self, engine, hold=(1,)):
        self.hold = set(hold)
        self.calls = 0
        self.held_at = 0
        self.allowed = 0
        self._cond = threading.Condition()
        self._handle = engine.base.unet.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        with self._cond:
            self.calls += 1
            number = self.calls
            if number not in self.hold:
                return
            self.held_at = number
            self._cond.notify_all()
            if not self._cond.wait_for(lambda: self.allowed >= number, WAIT):
                raise RuntimeError(f"step gate: call {number} was never let through")

    def wait_held(self, number: int) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: self.held_at >= number, WAIT), \
                f"no job reached UNet call {number}"

    def proceed(self) -> None:
        with self._cond:
            self.allowed = self.held_at
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self.allowed = float("inf")
            self._cond.notify_all()
        self._handle.remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def shapes_image(size: int = 64):
    """A picture with soft and hard edges (a low-contrast disc, a high-contrast square on a
    gradient), so canny thresholds visibly change the edge map; random noise would be all
    edges at any threshold."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    base = 60 + 60 * x / size
    disc = ((x - size * 0.35) ** 2 + (y - size * 0.4) ** 2) < (size * 0.22) ** 2
    square = (abs(x - size * 0.72) < size * 0.14) & (abs(y - size * 0.7) < size * 0.14)
    red = base + 35 * disc + 150 * square
    green = base + 20 * disc + 40 * square
    blue = 120 - 40 * disc + 10 * square + 0 * y
    rgb = np.stack([red, green, blue], axis=-1).clip(0, 255).astype(np.uint8)
    return Image.fromarray(rgb)
