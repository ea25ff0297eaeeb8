"""The API docs page (`/docs`, Swagger UI) works offline: its script and stylesheet are shipped in
the package and served by the service, nothing is loaded from another origin, and in a real
browser with every other origin blocked the page lists the service's operations."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from helpers.server import WAIT, live_server, make_app
from helpers.studio import launch_args, require_browser

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "fewstep" / "server" / "api_docs"
ROOT = PACKAGE.parents[3]


@pytest.fixture(scope="module")
def client():
    with TestClient(make_app(), raise_server_exceptions=False) as c:
        yield c


def referenced_urls(html: str) -> list[str]:
    """Every URL the page loads: src and href attributes, and the strings its script fetches."""
    urls = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", html)
    urls += re.findall(r"""\burl\s*:\s*["']([^"']+)["']""", html)
    return urls


def test_docs_page_loads_only_assets_of_this_service(client):
    page = client.get("/docs")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    html = page.text
    assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", html, re.I), html
    urls = referenced_urls(html)
    assert "/openapi.json" in urls
    scripts = [u for u in urls if u.endswith(".js")]
    styles = [u for u in urls if u.endswith(".css")]
    assert scripts and styles, urls
    for url in urls:
        assert url.startswith("/") and not url.startswith("//"), url
        answer = client.get(url)
        assert answer.status_code == 200, url
        assert answer.content, url
    assert client.get(scripts[0]).headers["content-type"].startswith("text/javascript")
    assert client.get(styles[0]).headers["content-type"].startswith("text/css")


def test_docs_assets_are_the_packaged_files_and_nothing_else(client):
    bundle = client.get("/docs/swagger-ui-bundle.js")
    assert bundle.status_code == 200
    assert bundle.content == (PACKAGE / "static" / "swagger-ui-bundle.js").read_bytes()
    etag = bundle.headers["etag"]
    assert client.get("/docs/swagger-ui-bundle.js",
                      headers={"If-None-Match": etag}).status_code == 304
    for name in ("LICENSE", "..%2Fapp.py", "swagger-ui-bundle.js.map", "nope.js"):
        answer = client.get(f"/docs/{name}")
        assert answer.status_code == 404, name
        assert answer.json()["error"]["type"] == "not_found"


def test_the_schema_is_unchanged_and_redoc_is_gone(client):
    schema = client.get("/openapi.json")
    assert schema.status_code == 200 and schema.json()["info"]["title"] == "fewstep"
    paths = schema.json()["paths"]
    assert "/v1/txt2img" in paths
    assert not any(p.startswith("/docs") for p in paths)  # the docs page is not an operation
    assert client.get("/redoc").status_code == 404  # it loaded from a CDN: blank offline


def test_package_data_ships_the_docs_assets_and_their_licence():
    """A non-editable install must carry the assets: pyproject's package data covers them."""
    import fnmatch

    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        tomllib = pytest.importorskip("tomli")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["fewstep.server.api_docs"]
    names = {p.name for p in (PACKAGE / "static").iterdir()}
    assert {"swagger-ui-bundle.js", "swagger-ui.css", "LICENSE", "NOTICE"} <= names
    for path in (PACKAGE / "static").iterdir():
        relative = path.relative_to(PACKAGE).as_posix()
        assert any(fnmatch.fnmatch(relative, p) for p in patterns), relative


def test_docs_page_renders_the_operations_offline():
    """Chromium with every request to another origin aborted: Swagger UI still draws the
    operations from /openapi.json."""
    executable = require_browser()
    from playwright.sync_api import sync_playwright

    with live_server(make_app()) as base, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=launch_args())
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 900})
            context.set_default_timeout(int(WAIT * 1000))
            offsite, errors = [], []

            def only_this_server(route):
                if route.request.url.startswith(base + "/"):
                    route.continue_()
                else:
                    offsite.append(route.request.url)
                    route.abort()

            context.route("**/*", only_this_server)
            page = context.new_page()
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(base + "/docs")
            page.locator(".opblock-summary-path[data-path='/v1/txt2img']").first.wait_for()
            assert page.locator(".opblock").count() > 10
            assert "fewstep" in page.locator(".information-container .title").inner_text()
            page.locator(".opblock-summary-path[data-path='/v1/txt2img']").first.click()
            page.locator(".opblock.is-open .opblock-description-wrapper, "
                         ".opblock.is-open .opblock-section").first.wait_for()
            assert not offsite, offsite
            assert not errors, errors
        finally:
            browser.close()
