"""The studio page in a real browser (Debian's Chromium driven by Playwright) against a real
server on tiny models: every task to a visible result, the mask canvas, the canny preview, live
step previews, cancel, real-time superseding, errors next to their field, a full queue, the
API-key flow and a phone-sized screen. Screenshots are written to a temporary folder (or to
$FEWSTEP_STUDIO_SCREENSHOTS) and their paths printed."""

from __future__ import annotations

import base64
import io
import json
import os
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from helpers.server import (WAIT, Gate, decode, live_server, make_app, sample_image,
                             tiny_env, wait_until)
from helpers.studio import StepGate, launch_args, require_browser, shapes_image

MS = int(WAIT * 1000)  # Playwright timeouts
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}


# -- fixtures ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def chromium():
    executable = require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=launch_args())
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server():
    """One real server for the module; a queue of one makes a full queue easy to set up."""
    app = make_app(queue_size=1)
    with live_server(app) as base:
        yield base, app.state.service


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    chosen = os.environ.get("FEWSTEP_STUDIO_SCREENSHOTS")
    folder = Path(chosen) if chosen else tmp_path_factory.mktemp("studio-screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    print(f"\nstudio screenshots: {folder}")
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("studio-inputs")
    paths = {"noise": folder / "noise.png", "shapes": folder / "shapes.png"}
    sample_image(64, seed=1).save(paths["noise"])
    shapes_image(64).save(paths["shapes"])
    return paths


class Studio:
    """A page of the studio plus what it sent: request URLs, POST bodies, console errors."""

    def __init__(self, page, base):
        self.page = page
        self.base = base
        self.urls: list[str] = []
        self.posts: list[tuple[str, dict | None]] = []
        self.errors: list[str] = []
        page.on("request", self._request)
        page.on("pageerror", lambda exc: self.errors.append(f"page error: {exc}"))
        page.on("console", self._console)

    def _request(self, request):
        self.urls.append(request.url)
        if request.method == "POST":
            try:
                body = json.loads(request.post_data or "null")
            except ValueError:
                body = None
            self.posts.append((request.url.removeprefix(self.base), body))

    def _console(self, message):
        # the browser logs every 4xx fetch as "Failed to load resource": those are expected
        if message.type == "error" and "Failed to load resource" not in message.text:
            self.errors.append(f"console: {message.text}")

    def __getattr__(self, name):
        return getattr(self.page, name)

    def by(self, testid):
        return self.page.get_by_test_id(testid)

    def open(self, path="/"):
        self.page.goto(self.base + path)
        return self

    def wait_ready(self):
        self.page.wait_for_selector("#app[data-state=idle]", timeout=MS)
        return self

    def job_posts(self, task):
        return [body for url, body in self.posts if url.startswith(f"/v1/{task}?")]

    def wait_posts(self, task, count):
        """Until the page has sent `count` requests for `task` (the page's events are only
        handled while Playwright waits, so this waits through Playwright)."""
        end = time.monotonic() + WAIT
        while len(self.job_posts(task)) < count:
            assert time.monotonic() < end, f"the page sent no request #{count} for {task}"
            self.page.wait_for_timeout(20)

    def wait_state(self, *states):
        selector = ", ".join(f"#progress[data-state={s}]" for s in states)
        self.page.wait_for_selector(selector, state="attached", timeout=MS)

    def generate(self):
        self.by("generate").click()

    def wait_result(self, count=1):
        self.wait_state("done")
        results = self.by("result")
        results.first.wait_for(timeout=MS)
        assert results.count() == count
        return results

    def set_task(self, task):
        self.by(f"task-{task}").click()
        assert self.by(f"task-{task}").get_attribute("aria-selected") == "true"

    def small(self, steps=2, size=64):
        self.by("steps").fill(str(steps))
        self.by("width").fill(str(size))
        self.by("height").fill(str(size))

    def shot(self, folder, name, full_page=True):
        path = folder / f"{name}.png"
        self.page.evaluate("window.scrollTo(0, 0)")
        self.page.screenshot(path=str(path), full_page=full_page)
        return path

    def current_job(self):
        return self.page.get_attribute("#progress", "data-job")


def open_studio(chromium, base, viewport=DESKTOP, **context_options):
    context = chromium.new_context(viewport=viewport, color_scheme="dark",
                                   accept_downloads=True, **context_options)
    context.set_default_timeout(MS)
    return Studio(context.new_page(), base)


@pytest.fixture
def studio(chromium, server):
    base, service = server
    page = open_studio(chromium, base).open().wait_ready()
    yield page
    page.page.context.close()
    assert not page.errors, page.errors
    offsite = [u for u in page.urls if not u.startswith((base + "/", "data:", "blob:"))]
    assert not offsite, f"the page loaded from elsewhere: {offsite}"
    wait_until(service.backend.idle, "the server to be idle after the test")


def job_ids(service):
    return {job.id for job in service.backend.job_list()}


def png_text(data: bytes) -> dict:
    with Image.open(io.BytesIO(data)) as im:
        return dict(im.text)


# -- tasks end to end -------------------------------------------------------------------------

def test_txt2img_result_download_seed_reuse_and_shortcut(studio, server, shots):
    _, service = server
    studio.by("prompt").fill("a lighthouse at dusk")
    studio.small(steps=2)
    studio.generate()
    result = studio.wait_result()
    assert result.evaluate("img => img.naturalWidth") == 64
    assert result.evaluate("img => img.complete && img.naturalHeight") == 64
    seed = int(result.get_attribute("data-seed"))
    assert "seed" in studio.by("status").inner_text()
    body = studio.job_posts("txt2img")[-1]
    assert body["prompt"] == "a lighthouse at dusk" and body["steps"] == 2
    assert "seed" not in body  # random seed: the server draws it
    studio.shot(shots, "txt2img")

    with studio.expect_download() as download:
        studio.by("download").click()
    data = Path(download.value.path()).read_bytes()
    assert download.value.suggested_filename == f"fewstep-{seed}.png"
    params = png_text(data)
    assert "a lighthouse at dusk" in params["parameters"] and f"Seed: {seed}" in \
        params["parameters"]
    assert json.loads(params["fewstep"])["request"]["seed"] == seed

    studio.by("seed-reuse").click()
    assert studio.by("seed").input_value() == str(seed)
    studio.by("prompt").focus()
    studio.keyboard.press("Control+Enter")  # the keyboard shortcut generates
    studio.wait_posts("txt2img", 2)
    studio.wait_state("done")
    assert studio.job_posts("txt2img")[-1]["seed"] == seed
    again = studio.by("result").first
    with studio.expect_download() as second:
        studio.by("download").click()
    # same seed, same settings: the same picture
    assert decode(base64.b64encode(Path(second.value.path()).read_bytes()).decode()).tolist() \
        == decode(base64.b64encode(data).decode()).tolist()
    assert again.get_attribute("data-seed") == str(seed)
    studio.wait_for_selector("#history li:nth-child(2)")
    assert studio.by("history").locator("li").count() == 2

    studio.locator(".use-input").click()  # the picture becomes the input of image to image
    studio.wait_for_selector(f"#image-meta:has-text('result seed {seed} · 64 × 64')")
    assert studio.by("task-img2img").get_attribute("aria-selected") == "true"
    assert studio.locator("#input-image").evaluate("img => img.naturalWidth") == 64
    studio.set_task("inpaint")  # or of the task at hand
    studio.locator(".use-input").click()
    assert studio.by("task-inpaint").get_attribute("aria-selected") == "true"
    assert studio.by("mask-canvas").evaluate("c => [c.width, c.height]") == [64, 64]


def fill_for(studio, task, images):
    studio.set_task(task)
    if task in ("img2img", "inpaint", "controlnet", "t2i-adapter"):
        studio.by("image-input").set_input_files(str(images["shapes"]))
        studio.wait_for_selector("#image-stage:not([hidden])")
    if task == "inpaint":
        paint(studio, [(0.1, 0.1), (0.5, 0.5)])
    if task == "animate":
        studio.by("frames").fill("2")
    studio.by("prompt").fill(f"a test of {task}")
    studio.small(steps=2)


@pytest.mark.parametrize("task, expected", [
    ("img2img", {"strength": 0.6, "image": str}),
    ("inpaint", {"strength": 1.0, "image": str, "mask": str}),
    ("controlnet", {"controlnet": "canny", "control_image": str, "canny_low": 100,
                    "canny_high": 200, "conditioning_scale": 0.8}),
    ("t2i-adapter", {"adapter": "canny", "control_image": str, "conditioning_factor": 1.0}),
    ("animate", {"motion_adapter": "motion", "num_frames": 2, "fps": 8}),
])
def test_every_task_end_to_end(studio, server, images, shots, task, expected):
    fill_for(studio, task, images)
    studio.generate()
    result = studio.wait_result()
    body = studio.job_posts(task)[-1]
    for key, value in expected.items():
        if value is str:
            assert isinstance(body[key], str) and len(body[key]) > 100, key
        else:
            assert body[key] == value, (key, body[key])
    media = result.get_attribute("data-media-type")
    assert media == ("image/gif" if task == "animate" else "image/png")
    assert result.evaluate("img => img.naturalWidth") == 64
    if task == "animate":  # a real animation: the GIF shown has the frames asked for
        _, service = server
        data, media_type = service.backend.job(studio.current_job()).output.files[0]
        assert media_type == "image/gif"
        with Image.open(io.BytesIO(data)) as gif:
            assert gif.n_frames == 2
    studio.shot(shots, f"task-{task}")


def drop_or_paste(studio, path, how, target="#drop-zone"):
    """Drop a file on `target` (the image drop zone unless said), or paste it, as a browser
    does (a DataTransfer)."""
    data = base64.b64encode(Path(path).read_bytes()).decode()
    studio.evaluate("""([data, name, how, target]) => {
        const bytes = Uint8Array.from(atob(data), c => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], name, { type: "image/png" }));
        if (how === "drop") {
          const element = document.querySelector(target);
          for (const type of ["dragenter", "dragover", "drop"]) {
            element.dispatchEvent(
              new DragEvent(type, { dataTransfer: transfer, bubbles: true, cancelable: true }));
          }
        } else {
          document.dispatchEvent(new ClipboardEvent("paste",
            { clipboardData: transfer, bubbles: true, cancelable: true }));
        }
    }""", [data, Path(path).name, how, target])


def test_images_by_drop_and_by_paste(studio, images):
    studio.set_task("controlnet")
    drop_or_paste(studio, images["shapes"], "drop")
    studio.wait_for_selector("#image-meta:has-text('shapes.png · 64 × 64')")
    studio.wait_for_selector("#control-preview[data-low='100']")

    studio.set_task("txt2img")
    drop_or_paste(studio, images["noise"], "paste")  # a pasted image goes to image-to-image
    studio.wait_for_selector("#image-meta:has-text('noise.png')")
    assert studio.by("task-img2img").get_attribute("aria-selected") == "true"
    studio.by("prompt").fill("pasted")
    studio.by("steps").fill("2")
    studio.generate()
    studio.wait_result()
    sent = decode(studio.job_posts("img2img")[-1]["image"])
    assert np.array_equal(sent, np.asarray(Image.open(images["noise"]).convert("RGB")))


def test_an_input_image_size_that_changes_is_said_and_its_own_size_offered(studio, tmp_path,
                                                                          shots):
    """The tiny model's native size is 64: a 96 x 80 image is scaled to that area (64 x 56)
    and a 60 x 44 one rounded to multiples of 8; the page says so, in the size list too, and
    offers the image's own size."""
    large, odd = tmp_path / "large.png", tmp_path / "odd.png"
    sample_image(64, seed=3).resize((96, 80)).save(large)
    sample_image(64, seed=4).resize((60, 44)).save(odd)
    studio.set_task("img2img")
    size = (lambda: (studio.by("width").input_value(), studio.by("height").input_value()))
    chosen = (lambda: studio.by("size-preset").locator("option:checked").inner_text())
    meta = studio.locator("#image-meta")

    studio.by("image-input").set_input_files(str(large))
    studio.wait_for_selector("#image-meta:has-text('large.png')")
    assert size() == ("64", "56")
    assert "96 × 80" in meta.inner_text() and "64 × 56" in meta.inner_text()
    assert "scaled" in meta.inner_text()
    assert "64 × 56" in chosen() and "scaled" in chosen(), chosen()
    assert "From the image (64 × 56)" not in studio.by("size-preset").inner_text()
    own = studio.by("size-preset").locator("option[value='96x80']")
    assert "96 × 80" in own.inner_text()  # the image's own size is one choice away
    studio.shot(shots, "input-scaled")
    studio.by("size-preset").select_option("96x80")
    assert size() == ("96", "80")
    assert "64 × 56" not in meta.inner_text() and "scaled" not in meta.inner_text()
    studio.by("prompt").fill("at the image's size")
    studio.by("steps").fill("2")
    studio.generate()
    result = studio.wait_result()
    assert result.evaluate("img => [img.naturalWidth, img.naturalHeight]") == [96, 80]
    assert (studio.job_posts("img2img")[-1]["width"],
            studio.job_posts("img2img")[-1]["height"]) == (96, 80)

    studio.by("image-input").set_input_files(str(odd))
    studio.wait_for_selector("#image-meta:has-text('odd.png')")
    assert size() == ("56", "40")
    assert "60 × 44" in meta.inner_text() and "56 × 40" in meta.inner_text()
    assert "multiples of 8" in meta.inner_text() and "multiples of 8" in chosen()


# -- the mask canvas ----------------------------------------------------------------------------

def paint(studio, points):
    """Drag the mouse over the mask canvas through `points` (fractions of its box)."""
    canvas = studio.by("mask-canvas")
    canvas.wait_for()
    box = canvas.bounding_box()
    xy = [(box["x"] + fx * box["width"], box["y"] + fy * box["height"]) for fx, fy in points]
    studio.mouse.move(*xy[0])
    studio.mouse.down()
    for x, y in xy[1:]:
        studio.mouse.move(x, y, steps=8)
    studio.mouse.up()


def painted(studio) -> int:
    return studio.by("mask-canvas").evaluate(
        "c => { const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        " let n = 0; for (let i = 3; i < d.length; i += 4) n += d[i] >= 128; return n; }")


def test_mask_canvas_paint_erase_invert_clear_and_send(studio, images, shots):
    studio.set_task("inpaint")
    studio.by("image-input").set_input_files(str(images["noise"]))
    canvas = studio.by("mask-canvas")
    canvas.wait_for()
    assert canvas.evaluate("c => [c.width, c.height]") == [64, 64]  # the image's own pixels
    assert painted(studio) == 0
    studio.generate()  # nothing painted: said next to the mask, nothing sent
    error = studio.locator("[data-field~=mask] [data-testid=error]")
    error.wait_for()
    assert "paint" in error.inner_text()
    assert not studio.job_posts("inpaint")

    studio.by("mask-brush").fill("20")
    paint(studio, [(0.05, 0.1), (0.4, 0.1), (0.4, 0.4), (0.05, 0.4)])
    first = painted(studio)
    assert 0 < first < 64 * 64 // 2
    studio.by("mask-eraser").click()
    paint(studio, [(0.05, 0.1), (0.4, 0.1)])
    erased = painted(studio)
    assert erased < first
    studio.by("mask-invert").click()
    assert painted(studio) == 64 * 64 - erased
    studio.by("mask-clear").click()
    assert painted(studio) == 0

    studio.locator("#mask-paint").click()
    paint(studio, [(0.1, 0.1), (0.3, 0.3)])  # top left only
    strokes = painted(studio)
    studio.by("prompt").fill("repaint the corner")
    studio.by("steps").fill("2")
    studio.shot(shots, "mask")
    studio.generate()
    studio.wait_result()
    body = studio.job_posts("inpaint")[-1]
    mask = decode(body["mask"])[..., 0]
    assert mask.shape == (64, 64) and set(np.unique(mask)) == {0, 255}
    ys, xs = np.nonzero(mask)
    assert len(ys) == strokes  # exactly what was painted, at the image's pixels
    assert ys.max() < 32 and xs.max() < 32 and mask[12, 12] == 255
    assert decode(body["image"]).shape == (64, 64, 3)


# -- the canny preview --------------------------------------------------------------------------

def preview_equals(studio, image, low, high):
    from fewstep.control import canny

    studio.wait_for_selector(f"#control-preview[data-low='{low}'][data-high='{high}']")
    src = studio.by("control-preview").get_attribute("src")
    got = decode(src.split(",", 1)[1])
    return np.array_equal(got, np.asarray(canny(image, low, high)))


def test_canny_preview_follows_the_thresholds(studio, images, shots):
    studio.set_task("controlnet")
    studio.by("image-input").set_input_files(str(images["shapes"]))
    image = Image.open(images["shapes"]).convert("RGB")
    assert preview_equals(studio, image, 100, 200)
    studio.by("canny-low").fill("10")
    studio.by("canny-high").fill("40")
    assert preview_equals(studio, image, 10, 40)
    loose = studio.by("control-preview").get_attribute("src")
    studio.locator("#canny-high-range").fill("255")  # the slider moves it too
    studio.by("canny-low").fill("250")
    assert preview_equals(studio, image, 250, 255)
    assert studio.by("control-preview").get_attribute("src") != loose
    studio.shot(shots, "canny")

    studio.set_task("t2i-adapter")  # the same image and thresholds carry over
    assert studio.by("control-preview").is_visible()
    studio.by("canny-low").fill("120")
    studio.by("canny-high").fill("100")  # low above high: said next to the thresholds
    error = studio.locator("[data-field~=canny_low] [data-testid=error]")
    error.wait_for()
    assert "low" in error.inner_text()
    studio.by("canny-high").fill("130")
    assert preview_equals(studio, image, 120, 130)
    assert not error.is_visible()


# -- live previews, cancel ----------------------------------------------------------------------

def test_live_step_previews_arrive_while_the_job_runs(studio, server, shots):
    _, service = server
    _, engine = tiny_env()
    studio.by("prompt").fill("previews")
    studio.small(steps=2)
    with StepGate(engine, hold=(1, 2)) as gate:
        studio.generate()
        gate.wait_held(1)
        studio.wait_state("running")  # the page follows the events before step 1
        gate.proceed()
        gate.wait_held(2)
        preview = studio.by("preview")
        preview.wait_for()
        studio.wait_for_selector("#preview[data-step='1']")
        src = preview.get_attribute("src")
        assert src.startswith("data:image/png;base64,")
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as im:
            assert im.size == (32, 32)  # latent resolution of the tiny model
        progress = studio.by("progress")
        assert progress.evaluate("p => [p.value, p.max]") == [1, 2]
        assert "Step 1 of 2" in studio.by("status").inner_text()
        studio.shot(shots, "live-preview")
        gate.proceed()
        studio.wait_result()
    assert not preview.is_visible()  # the result replaces the preview
    assert int(preview.get_attribute("data-count")) >= 1


def test_cancel_stops_the_running_job(studio, server):
    _, service = server
    _, engine = tiny_env()
    studio.by("prompt").fill("cancel me")
    studio.small(steps=2)
    with Gate(engine) as gate:
        studio.generate()
        gate.wait_entered()
        studio.wait_state("running")
        job = service.backend.job(studio.current_job())
        studio.by("cancel").click()
        wait_until(job.cancel.is_set, "the cancel to reach the server")
    studio.wait_state("cancelled")
    assert job.state == "cancelled" and job.step < 2  # stopped at the next step
    assert studio.by("result").count() == 0
    assert "Cancelled" in studio.by("status").inner_text()
    assert studio.by("cancel").is_disabled() and studio.by("generate").is_enabled()


# -- real-time mode -----------------------------------------------------------------------------

def test_realtime_newer_requests_supersede_older_ones(studio, server, shots):
    _, service = server
    _, engine = tiny_env()
    studio.small(steps=2)
    studio.by("prompt").fill("one")
    before = job_ids(service)
    with Gate(engine) as gate:
        studio.by("realtime").check()  # turning it on generates what is there
        gate.wait_entered()
        studio.by("prompt").fill("two")
        studio.wait_for_selector("#app[data-superseded='1'][data-pending='1']")
        studio.by("prompt").fill("three")
        studio.wait_for_selector("#app[data-superseded='2'][data-pending='1']")
        live = [j for j in service.backend.job_list() if j.id not in before]
        assert len(live) == 1 and live[0].state == "running"  # one running, one waiting here
    studio.locator("[data-testid=result][alt*='three']").wait_for()
    studio.wait_for_selector("#app[data-pending='0']")
    studio.wait_state("done")
    new = [j for j in service.backend.job_list() if j.id not in before]
    assert [j.state for j in new] == ["cancelled", "done"]
    assert new[1].output.record.request["prompt"] == "three"  # "two" never ran
    studio.shot(shots, "realtime")

    # typing quickly: the debounce makes one request of three keystrokes
    before = job_ids(service)
    studio.by("prompt").press_sequentially(" four", delay=20)
    studio.locator("[data-testid=result][alt*='three four']").wait_for()
    studio.wait_state("done")
    new = [j for j in service.backend.job_list() if j.id not in before]
    assert [j.state for j in new if j.state == "done"] == ["done"]
    assert all(j.state in ("done", "cancelled") for j in new)
    assert new[-1].output.record.request["prompt"] == "three four"


# -- errors -------------------------------------------------------------------------------------

def test_errors_are_shown_next_to_the_field_they_name(studio, shots):
    studio.by("prompt").fill("errors")
    studio.small(steps=2)
    studio.by("steps").fill("999")  # refused at once (422)
    studio.generate()
    error = studio.locator("[data-field~=steps] [data-testid=error]")
    error.wait_for()
    assert "steps" in error.inner_text() and "50" in error.inner_text()
    assert studio.by("steps").get_attribute("aria-invalid") == "true"
    studio.by("steps").fill("2")  # editing the field clears its error
    assert not error.is_visible()

    studio.by("width").fill("100")  # refused by the job (not a multiple of 8)
    studio.generate()
    studio.wait_state("failed")
    error = studio.locator("[data-field~=width] [data-testid=error]")
    error.wait_for()
    assert "multiple of 8" in error.inner_text()
    studio.shot(shots, "error-width")

    studio.by("width").fill("64")
    studio.set_task("img2img")  # no image yet: said at the image, nothing sent
    studio.generate()
    studio.locator("[data-field~=image] [data-testid=error]").wait_for()
    assert not studio.job_posts("img2img")


def test_a_full_queue_shows_busy_and_retries_once(chromium, server, shots):
    base, service = server
    _, engine = tiny_env()
    page = open_studio(chromium, base)
    page.clock.install()  # the page's retry timer runs when the test says so
    page.open().wait_ready()
    page.by("prompt").fill("busy")
    page.small(steps=1)
    small = {"prompt": "filler", "steps": 1, "width": 64, "height": 64}
    try:
        with Gate(engine) as gate, httpx.Client(base_url=base) as client:
            running = client.post("/v1/txt2img?wait=false", json=small).json()["id"]
            gate.wait_entered()
            queued = client.post("/v1/txt2img?wait=false", json=small).json()["id"]  # full now

            page.generate()
            page.wait_for_selector("#status:has-text('Server busy, retrying in')")
            assert page.by("progress").get_attribute("data-state") == "busy"
            page.shot(shots, "busy", full_page=False)
            page.clock.run_for(5000)  # the one retry finds the queue still full
            error = page.by("error")
            error.wait_for()
            assert "still busy" in error.inner_text()
            assert len(page.job_posts("txt2img")) == 2  # one try and one retry, no more

            page.generate()
            page.wait_for_selector("#status:has-text('Server busy, retrying in')")
            assert client.post(f"/v1/jobs/{queued}/cancel").status_code == 200  # room again
            page.clock.run_for(5000)
            page.wait_state("queued", "running")
            assert len(page.job_posts("txt2img")) == 4
        page.wait_result()
        assert service.backend.job(running).state == "done"
        assert not page.by("error").is_visible()
        assert not page.errors, page.errors
    finally:
        page.page.context.close()


# -- API key, catalogue-dependent tasks ----------------------------------------------------------

@pytest.fixture(scope="module")
def keyed_server():
    """A second server over the same engine: an API key, and a catalogue with the model only."""
    from fewstep.server.app import create_app
    from fewstep.server.catalog import Catalog
    from fewstep.server.service import ServerOptions

    models, engine = tiny_env()
    catalog = Catalog(model_name="tiny", hidden={"tiny": str(models.sd15),
                                                 "lcm-lora": str(models.lcm_sd15)})
    app = create_app(engine, catalog, ServerOptions(api_key="k3y-for-tests"))
    with live_server(app) as base:
        yield base


def test_api_key_is_asked_once_and_sent_with_every_call(chromium, keyed_server, shots):
    page = open_studio(chromium, keyed_server)
    seen = []
    page.page.on("request", lambda r: seen.append((r.url, r.headers.get("authorization"))))
    try:
        page.open()
        key = page.by("api-key")
        key.wait_for()  # the page loads without the key, then asks for it
        page.shot(shots, "api-key", full_page=False)
        key.fill("wrong")
        key.press("Enter")
        message = page.locator("#key-message")
        message.wait_for()
        assert "refused" in message.inner_text()
        key.fill("k3y-for-tests")
        page.locator("#key-submit").click()
        page.wait_ready()
        assert not page.locator("#key-dialog").is_visible()
        # this catalogue has no ControlNet, adapter or motion adapter: those tasks are off
        for task in ("controlnet", "t2i-adapter", "animate"):
            assert page.by(f"task-{task}").is_disabled(), task
        for task in ("txt2img", "img2img", "inpaint"):
            assert page.by(f"task-{task}").is_enabled(), task
        assert page.locator(".lora-row").count() == 0
        assert "None" in page.locator("#lora-list").inner_text()

        page.by("prompt").fill("with a key")
        page.small(steps=1)
        page.generate()
        page.wait_result()
        page.reload()  # kept for the tab: not asked again
        page.wait_ready()
        assert not page.by("api-key").is_visible()
        assert page.evaluate("sessionStorage.getItem('fewstep.apiKey')") == "k3y-for-tests"
        page.generate()
        page.wait_result()
        api_calls = [(u, a) for u, a in seen if "/v1/" in u]
        assert any("/events" in u for u, _ in api_calls)
        after_key = api_calls[[a for _, a in api_calls].index("Bearer k3y-for-tests"):]
        assert all(a == "Bearer k3y-for-tests" for _, a in after_key), after_key
        assert not any("k3y" in u for u, _ in seen)  # never in a URL
        assert not page.errors, page.errors
    finally:
        page.page.context.close()


# -- LoRAs, history -----------------------------------------------------------------------------

def test_lora_stack_is_sent_and_recorded(studio, server):
    _, service = server
    assert studio.locator(".lora-row").count() == 3
    studio.by("lora-style").fill("0.5")  # moving the weight turns it on
    studio.by("lora-toggle-style-peft").check()
    studio.by("prompt").fill("with loras")
    studio.small(steps=1)
    studio.generate()
    studio.wait_result()
    body = studio.job_posts("txt2img")[-1]
    assert body["loras"] == [{"name": "style", "weight": 0.5}, {"name": "style-peft",
                                                                 "weight": 1}]
    job = service.backend.job(studio.current_job())
    assert [(lo["ref"], lo["weight"]) for lo in job.output.record.request["loras"]] == [
        ("style", 0.5), ("style-peft", 1.0)]
    studio.by("lora-toggle-style").uncheck()
    studio.by("num-images").fill("2")
    studio.generate()
    studio.wait_posts("txt2img", 2)
    results = studio.wait_result(count=2)  # two images, each shown
    assert studio.job_posts("txt2img")[-1]["loras"] == [{"name": "style-peft", "weight": 1}]
    assert studio.job_posts("txt2img")[-1]["num_images"] == 2
    assert [results.nth(i).evaluate("img => img.naturalWidth") for i in range(2)] == [64, 64]
    assert studio.by("download").count() == 2


def test_history_keeps_results_and_restores_their_settings(studio, images):
    fill_for(studio, "img2img", images)
    studio.by("prompt").fill("remember me")
    studio.by("strength").fill("0.8")
    studio.by("guidance").fill("1.5")
    studio.by("negative").fill("blur")
    studio.by("lora-style").fill("0.25")
    studio.generate()
    seed = studio.wait_result().get_attribute("data-seed")

    studio.reload()  # kept in the browser, not in the tab
    studio.wait_ready()
    item = studio.by("history").locator("li")
    item.first.wait_for()
    assert item.count() == 1
    assert "remember me" in item.inner_text() and seed in item.inner_text()
    assert studio.by("prompt").input_value() == ""
    studio.by("history-use").click()
    assert studio.by("task-img2img").get_attribute("aria-selected") == "true"
    assert studio.by("prompt").input_value() == "remember me"
    assert studio.by("negative").input_value() == "blur"
    assert studio.by("seed").input_value() == seed
    assert studio.by("strength").input_value() == "0.8"
    assert studio.by("guidance").input_value() == "1.5"
    assert studio.by("lora-style").input_value() == "0.25"
    assert studio.by("lora-toggle-style").is_checked()
    item.locator(".thumb").click()  # shows that entry's pictures again
    studio.by("result").first.wait_for()
    assert studio.by("result").count() == 1
    assert studio.by("result").first.get_attribute("data-seed") == seed
    item.locator(".history-delete").click()
    studio.wait_for_selector("#history:not(:has(li))", state="attached")


# -- settings read back from a PNG ---------------------------------------------------------------

def test_settings_are_read_back_from_a_dropped_or_chosen_png(studio, server, images, tmp_path,
                                                             shots):
    """Every PNG the service writes carries its record (`fewstep` chunk) and A1111 infotext
    (`parameters`): dropped on the page or chosen with the button, it fills the form."""
    base, service = server
    sent = {"prompt": "read me back", "negative_prompt": "blur", "steps": 3, "guidance": 1.5,
            "width": 64, "height": 56, "seed": 1234, "loras": [{"name": "style", "weight": 0.5}]}
    made = httpx.post(base + "/v1/txt2img", json=sent, timeout=WAIT).json()
    first = tmp_path / "made.png"
    first.write_bytes(base64.b64decode(made["images"][0]["b64"]))

    drop_or_paste(studio, first, "drop", target="#prompt")  # anywhere on the page
    studio.wait_for_selector("#status:has-text('Settings read from made.png')")
    form = {name: studio.by(name).input_value() for name in
            ("prompt", "negative", "seed", "steps", "guidance", "width", "height")}
    assert form == {"prompt": "read me back", "negative": "blur", "seed": "1234", "steps": "3",
                    "guidance": "1.5", "width": "64", "height": "56"}
    assert studio.by("lora-toggle-style").is_checked()
    assert studio.by("lora-style").input_value() == "0.5"
    assert not studio.by("lora-toggle-style-peft").is_checked()
    studio.shot(shots, "settings-from-png")
    studio.generate()  # the same settings: the same picture
    studio.wait_result()
    body = studio.job_posts("txt2img")[-1]
    assert {k: body.get(k) for k in sent} == sent
    again = service.backend.job(studio.current_job()).output.files[0][0]
    assert decode(base64.b64encode(again).decode()).tolist() == \
        decode(made["images"][0]["b64"]).tolist()

    # an image-to-image record, chosen with the button: the task and strength come back; the
    # input image is not in the file, which the page says
    shapes = base64.b64encode(images["shapes"].read_bytes()).decode()
    made = httpx.post(base + "/v1/img2img", json={
        "prompt": "second", "image": shapes, "strength": 0.8, "steps": 2, "seed": 5,
        "width": 64, "height": 64}, timeout=WAIT).json()
    second = tmp_path / "second.png"
    second.write_bytes(base64.b64decode(made["images"][0]["b64"]))
    studio.by("settings-file").set_input_files(str(second))
    studio.wait_for_selector("#status:has-text('Settings read from second.png')")
    assert studio.by("task-img2img").get_attribute("aria-selected") == "true"
    assert studio.by("strength").input_value() == "0.8"
    assert studio.by("prompt").input_value() == "second"
    assert not studio.by("lora-toggle-style").is_checked()
    assert "input image" in studio.by("status").inner_text()

    # the same file as the input image: it is the input, and its settings are one click away
    drop_or_paste(studio, first, "drop")
    studio.wait_for_selector("#image-meta:has-text('made.png')")
    assert studio.by("prompt").input_value() == "second"  # not changed by itself
    studio.shot(shots, "settings-offered-by-the-input")
    studio.by("image-settings").click()
    studio.wait_for_selector("#status:has-text('Settings read from made.png')")
    assert studio.by("prompt").input_value() == "read me back"
    assert studio.by("task-img2img").get_attribute("aria-selected") == "true"  # the image stays


def test_settings_from_a1111_infotext_and_files_without_settings(studio, images, tmp_path,
                                                                 shots):
    """Infotext alone (another tool's PNG, compressed and not Latin-1 here): prompt, LoRA tags,
    negative prompt and the numbers; LoRAs this server lacks are named. A PNG without settings
    is refused next to the button, and nothing changes."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", "a café ☕ at dawn <lora:style-peft:0.7> <lora:elsewhere:1>\n"
                                "Negative prompt: grey, dull\n"
                                'Steps: 5, Sampler: Euler a, CFG scale: 2.5, Seed: 99, '
                                'Size: 48x40, Model: other, Lora hashes: "style-peft: abc"',
                  zip=True)
    other = tmp_path / "other.png"
    Image.new("RGB", (48, 40), (20, 40, 60)).save(other, pnginfo=info)
    drop_or_paste(studio, other, "drop", target=".output")
    studio.wait_for_selector("#status:has-text('Settings read from other.png')")
    assert studio.by("prompt").input_value() == "a café ☕ at dawn"
    assert studio.by("negative").input_value() == "grey, dull"
    form = {name: studio.by(name).input_value() for name in
            ("steps", "guidance", "seed", "width", "height")}
    assert form == {"steps": "5", "guidance": "2.5", "seed": "99", "width": "48",
                    "height": "40"}
    assert studio.by("lora-toggle-style-peft").is_checked()
    assert studio.by("lora-style-peft").input_value() == "0.7"
    assert not studio.by("lora-toggle-style").is_checked()
    assert "elsewhere" in studio.by("status").inner_text()  # not in this catalogue
    assert studio.by("task-txt2img").get_attribute("aria-selected") == "true"
    studio.shot(shots, "settings-from-infotext")

    studio.by("settings-file").set_input_files(str(images["noise"]))  # no settings in it
    error = studio.locator("[data-field~=settings] [data-testid=error]")
    error.wait_for()
    studio.shot(shots, "settings-none")
    assert "noise.png" in error.inner_text() and "no settings" in error.inner_text()
    assert studio.by("prompt").input_value() == "a café ☕ at dawn"


# -- layout, accessibility ----------------------------------------------------------------------

def test_every_control_has_a_label(studio):
    for task in ("txt2img", "img2img", "inpaint", "controlnet", "t2i-adapter", "animate"):
        studio.set_task(task)
        unlabelled = studio.evaluate("""() => [...document.querySelectorAll(
              'input, textarea, select, canvas, button')]
            .filter(el => el.getClientRects().length || el.type === 'file')
            .filter(el => !(el.labels && el.labels.length) && !el.getAttribute('aria-label')
                          && !el.getAttribute('aria-labelledby') && !el.textContent.trim())
            .map(el => el.id || el.outerHTML.slice(0, 80))""")
        assert not unlabelled, (task, unlabelled)


def test_the_negative_prompt_hint_follows_the_guidance(studio):
    hint = studio.locator("#negative-hint")
    assert studio.by("guidance").input_value() == "1"
    assert hint.is_visible() and "No effect" in hint.inner_text()
    studio.set_task("inpaint")  # its recipe's guidance is 4: the negative prompt is used
    assert studio.by("guidance").input_value() == "4"
    assert not hint.is_visible()
    studio.set_task("txt2img")
    assert hint.is_visible()
    studio.by("guidance").fill("2")
    assert not hint.is_visible()
    studio.locator("#guidance-range").fill("1")  # the slider too
    assert hint.is_visible()


def test_narrow_phone_screen(chromium, server, images, shots):
    base, _ = server
    page = open_studio(chromium, base, viewport=PHONE, is_mobile=True, has_touch=True)
    try:
        page.open().wait_ready()
        no_overflow = "() => document.documentElement.scrollWidth <= window.innerWidth"
        assert page.evaluate(no_overflow)
        prompt, generate = page.by("prompt").bounding_box(), page.by("generate").bounding_box()
        assert prompt["y"] < generate["y"]  # the prompt, then the button, then the rest
        steps = page.by("steps").bounding_box()
        assert generate["y"] < steps["y"] < page.by("history").bounding_box()["y"]
        page.by("prompt").fill("on a phone")
        page.small(steps=1)
        page.generate()
        result = page.wait_result()
        box = result.bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"]
        assert page.evaluate(no_overflow)
        page.shot(shots, "phone-txt2img")
        fill_for(page, "inpaint", images)
        assert page.evaluate(no_overflow)
        page.shot(shots, "phone-inpaint")
        assert not page.errors, page.errors
    finally:
        page.page.context.close()


def test_phone_shows_every_task_and_the_input_image_before_the_results(chromium, server,
                                                                      images, shots):
    base, _ = server
    page = open_studio(chromium, base, viewport=PHONE, is_mobile=True, has_touch=True)
    try:
        page.open().wait_ready()
        for task in ("txt2img", "img2img", "inpaint", "controlnet", "t2i-adapter", "animate"):
            box = page.by(f"task-{task}").bounding_box()
            assert box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"], (task, box)
        assert page.evaluate("() => { const t = document.querySelector('.tasks');"
                             " return t.scrollWidth <= t.clientWidth; }")  # nothing hidden
        page.shot(shots, "phone-tabs", full_page=False)
        page.set_task("animate")  # the last task: one tap, no scrolling
        fill_for(page, "img2img", images)
        page.generate()
        result = page.wait_result()
        image = page.locator("#input-image").bounding_box()
        assert image["y"] + image["height"] <= page.by("generate").bounding_box()["y"]
        assert image["y"] + image["height"] <= result.bounding_box()["y"]
        page.shot(shots, "phone-img2img")
        assert not page.errors, page.errors
    finally:
        page.page.context.close()


def test_readme_screenshot(chromium, server, images, shots):
    """The picture in the README (docs/studio.png): ControlNet with its edge map, a result and
    a short history. Refresh it with
    FEWSTEP_STUDIO_SCREENSHOTS=docs pytest tests/test_studio_browser.py -k readme"""
    base, _ = server
    page = open_studio(chromium, base, viewport={"width": 1360, "height": 1020})
    try:
        page.open().wait_ready()
        page.by("prompt").fill("a lighthouse on a cliff at dusk, oil painting")
        page.small(steps=2)
        page.generate()
        page.wait_result()
        fill_for(page, "controlnet", images)
        page.by("prompt").fill("a red cube beside a bronze sphere, studio light")
        page.by("lora-style").fill("0.8")
        page.generate()
        page.wait_posts("controlnet", 1)
        page.wait_result()
        page.wait_for_selector("#history li:nth-child(2)")
        page.locator("#control-preview").wait_for()
        page.by("prompt").focus()
        page.shot(shots, "studio", full_page=False)
        assert not page.errors, page.errors
    finally:
        page.page.context.close()
