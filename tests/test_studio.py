"""The studio page as the service serves it (no browser: see test_studio_browser.py): the page
and its files, open without the API key and nothing else with it, nothing loaded from another
origin, the files shipped as package data, and the canny preview endpoint."""

from __future__ import annotations

import base64
import io
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from helpers.server import assert_typed_error, decode, make_app, png_b64, sample_image
from helpers.studio import shapes_image

STATIC = Path(__file__).resolve().parents[1] / "src" / "fewstep" / "server" / "studio" / "static"
ROOT = STATIC.parents[4]


@pytest.fixture(scope="module")
def client():
    with TestClient(make_app(queue_size=2), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture(scope="module")
def keyed():
    with TestClient(make_app(api_key="s3cret"), raise_server_exceptions=False) as c:
        yield c


def test_page_and_its_files_are_served(client):
    page = client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp
    assert page.headers["x-content-type-options"] == "nosniff"
    referenced = re.findall(r'(?:src|href)="([^"#]+)"', page.text)
    assert referenced, "the page references no files"
    for url in referenced:
        assert url.startswith("/studio/"), url
        asset = client.get(url)
        assert asset.status_code == 200, url
    for name, kind in (("app.js", "text/javascript"), ("studio.css", "text/css"),
                       ("icon.svg", "image/svg+xml")):
        response = client.get(f"/studio/{name}")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith(kind), name
    # every module the page imports is served too
    for module in re.findall(r'from "\./([\w.-]+)"', client.get("/studio/app.js").text):
        assert client.get(f"/studio/{module}").status_code == 200, module


STABLE_TEST_IDS = [
    "task-txt2img", "task-img2img", "task-inpaint", "task-controlnet", "task-t2i-adapter",
    "task-animate", "prompt", "negative", "steps", "guidance", "width", "height", "seed",
    "num-images", "strength", "image-input", "mask-canvas", "control-preview", "generate",
    "cancel", "progress", "preview", "error", "history", "realtime", "api-key",
]


def test_the_stable_test_hooks_are_in_the_page(client):
    """Tests elsewhere depend on these data-testid names: they must not change."""
    html = client.get("/").text
    for testid in STABLE_TEST_IDS:
        assert html.count(f'data-testid="{testid}"') == 1, testid
    script = client.get("/studio/app.js").text
    assert 'dataset.testid = "result"' in script  # each result img/video
    assert "const id = `lora-${name}`;" in script and "weight.dataset.testid = id;" in script


def test_unchanged_files_answer_304(client):
    first = client.get("/studio/app.js")
    again = client.get("/studio/app.js", headers={"If-None-Match": first.headers["etag"]})
    assert again.status_code == 304 and not again.content


@pytest.mark.parametrize("path", ["/studio/nope.js", "/studio/..%2F__init__.py",
                                  "/studio/%2e%2e/__init__.py", "/studio/__init__.py",
                                  "/studio/"])
def test_only_the_page_files_are_served(client, path):
    response = client.get(path)
    assert response.status_code == 404, (path, response.text[:200])
    assert_typed_error(response, 404)
    assert "import" not in response.text


def test_nothing_comes_from_another_origin():
    """No CDN, font service or other origin in any file: the page works offline."""
    files = sorted(STATIC.iterdir())
    assert {f.name for f in files} >= {"index.html", "app.js", "api.js", "jobs.js", "mask.js",
                                       "history.js", "studio.css", "icon.svg"}
    for path in files:
        text = path.read_text(encoding="utf-8")
        text = text.replace('xmlns="http://www.w3.org/2000/svg"', "")  # a name, not a load
        assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", text, re.I), path.name
        if path.suffix == ".css":
            assert not re.search(r"@import|url\(", text), path.name


def test_the_page_is_open_but_the_api_needs_the_key(keyed):
    assert keyed.get("/").status_code == 200
    assert keyed.get("/studio/app.js").status_code == 200
    assert_typed_error(keyed.get("/v1/models"), 401, field="authorization")
    body = {"image": png_b64(sample_image(32)), "low": 100, "high": 200}
    assert_typed_error(keyed.post("/v1/control/canny", json=body), 401, field="authorization")
    ok = keyed.post("/v1/control/canny", json=body, headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200


def test_package_data_ships_the_static_files():
    """A non-editable install must carry the page: pyproject's package data covers every file."""
    import fnmatch

    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        tomllib = pytest.importorskip("tomli")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["fewstep.server.studio"]
    for path in STATIC.iterdir():
        relative = path.relative_to(STATIC.parent).as_posix()
        assert any(fnmatch.fnmatch(relative, p) for p in patterns), relative
    extras = config["project"]["optional-dependencies"]["test"]
    assert any(e.startswith("playwright") for e in extras)


# -- POST /v1/control/canny -------------------------------------------------------------------

def test_canny_preview_is_the_engines_edge_map(client):
    from fewstep.control import canny

    image = shapes_image(48)
    for low, high in ((100, 200), (10, 40), (0, 0), (255, 255)):
        response = client.post("/v1/control/canny",
                               json={"image": png_b64(image), "low": low, "high": high})
        assert response.status_code == 200, response.text
        assert set(response.json()) == {"image"}
        got = decode(response.json()["image"])
        expected = np.asarray(canny(image, low, high))
        assert got.shape == expected.shape == (48, 48, 3)
        assert np.array_equal(got, expected), (low, high)
    loose = decode(client.post("/v1/control/canny", json={
        "image": png_b64(image), "low": 10, "high": 40}).json()["image"])
    strict = decode(client.post("/v1/control/canny", json={
        "image": png_b64(image), "low": 250, "high": 255}).json()["image"])
    assert loose.sum() > strict.sum()  # the thresholds really reach the edge detector


def test_canny_preview_accepts_data_urls_and_jpeg(client):
    buffer = io.BytesIO()
    sample_image(40).save(buffer, format="JPEG")
    data_url = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()
    response = client.post("/v1/control/canny", json={"image": data_url, "low": 50, "high": 150})
    assert response.status_code == 200
    assert decode(response.json()["image"]).shape == (40, 40, 3)


@pytest.mark.parametrize("change, field", [
    ({"low": 201, "high": 200}, "low"),
    ({"low": -1}, "low"),
    ({"high": 256}, "high"),
    ({"low": 1.5}, "low"),
    ({"high": "x"}, "high"),
    ({"image": "not base64 !!"}, "image"),
    ({"image": base64.b64encode(b"GIF89a broken").decode()}, "image"),
    ({"image": ""}, "image"),
    ({"extra": 1}, "extra"),
])
def test_canny_preview_refuses_bad_values_naming_the_field(client, change, field):
    body = {"image": png_b64(sample_image(16)), "low": 100, "high": 200, **change}
    assert_typed_error(client.post("/v1/control/canny", json=body), 422, field=field)


def test_canny_preview_needs_an_image(client):
    assert_typed_error(client.post("/v1/control/canny", json={"low": 1, "high": 2}), 422,
                       field="image")
    assert_typed_error(client.post("/v1/control/canny", content=b"{nope",
                                   headers={"Content-Type": "application/json"}), 400)


def test_canny_preview_bounds_the_decoded_size():
    from fewstep.config import Settings

    app = make_app()
    service = app.state.service
    service.settings = Settings(max_input_pixels=32 * 32)
    with TestClient(app, raise_server_exceptions=False) as c:
        ok = c.post("/v1/control/canny", json={"image": png_b64(sample_image(32)), "low": 1,
                                               "high": 2})
        assert ok.status_code == 200
        big = Image.new("RGB", (33, 32))
        error = assert_typed_error(c.post("/v1/control/canny", json={
            "image": png_b64(big), "low": 1, "high": 2}), 422, field="image")
        assert "33x32" in error["message"]


# -- the browser tests' own switch ------------------------------------------------------------

def test_browser_tests_skip_with_a_hint_but_never_under_ci(monkeypatch):
    from helpers import studio as studio_helpers

    monkeypatch.setattr(studio_helpers, "chromium_path", lambda: None)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="apt-get install -y chromium"):
        studio_helpers.require_browser()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI must run the browser tests"):
        studio_helpers.require_browser()
