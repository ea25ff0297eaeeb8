"""The service and the browser next door: a page of another site must not reach the keyless
loopback service, neither by DNS rebinding (a foreign Host header) nor by the requests a browser
sends without asking first (cross-origin writes, JSON sent as text/plain). The studio page and
the documented clients keep working; no redirect is built from a client's Host header."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from helpers.server import assert_typed_error, make_app, png_b64, sample_image

SMALL = {"width": 64, "height": 64, "steps": 1}
LOOPBACK = "http://127.0.0.1:7860"
KEY = "k3y-for-hosts"


def _png_bytes() -> bytes:
    import io

    buffer = io.BytesIO()
    sample_image(64).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def keyless():
    """The default: no key, no configured names (the service is bound to loopback)."""
    app = make_app(queue_size=4, allowed_hosts=())
    with TestClient(app, base_url=LOOPBACK, raise_server_exceptions=False) as client:
        yield client, app


# -- Host ------------------------------------------------------------------------------------

@pytest.mark.parametrize("host", ["attacker.example", "attacker.example:7860",
                                  "127.0.0.1.attacker.example", "localhost.attacker.example",
                                  "192.0.2.7:7860", "[::2]:7860"])
def test_a_foreign_host_is_refused_on_every_path(keyless, host):
    client, _ = keyless
    jobs_before = client.get("/v1/jobs").json()
    for method, path, body in (("GET", "/v1/jobs", None), ("GET", "/", None),
                               ("GET", "/v1/status", None),
                               ("POST", "/v1/txt2img?wait=false", {"prompt": "x", **SMALL})):
        response = client.request(method, path, json=body, headers={"Host": host})
        assert_typed_error(response, 400, field="host", kind="host_not_allowed")
    assert client.get("/v1/jobs").json() == jobs_before  # nothing was started


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.1:7860", "localhost:7860",
                                  "LOCALHOST", "[::1]:7860", "127.1.2.3:80"])
def test_loopback_names_are_accepted(keyless, host):
    client, _ = keyless
    assert client.get("/v1/status", headers={"Host": host}).status_code == 200


def test_configured_names_are_accepted():
    app = make_app(allowed_hosts=("studio.lan", "*.example.org"))
    with TestClient(app, base_url=LOOPBACK, raise_server_exceptions=False) as client:
        for host in ("studio.lan", "Studio.LAN:8080", "a.example.org", "b.c.example.org:443",
                     "127.0.0.1:7860"):
            assert client.get("/v1/status", headers={"Host": host}).status_code == 200, host
        for host in ("example.org", "studio.lan.evil", "evil.example"):
            assert_typed_error(client.get("/v1/status", headers={"Host": host}), 400,
                               field="host")


def test_with_an_api_key_the_key_guards_and_any_host_is_served():
    """Behind proxies and load balancers the service cannot know its names: with a key, the
    key is the guard (a rebinding page cannot send it); names are checked only when given."""
    auth = {"Authorization": f"Bearer {KEY}"}
    with TestClient(make_app(api_key=KEY, allowed_hosts=()), base_url=LOOPBACK,
                    raise_server_exceptions=False) as client:
        assert client.get("/v1/status", headers={"Host": "fewstep.internal", **auth}
                          ).status_code == 200
        assert client.get("/v1/status", headers={"Host": "fewstep.internal"}
                          ).status_code == 401
    with TestClient(make_app(api_key=KEY, allowed_hosts=("fewstep.example.com",)),
                    base_url=LOOPBACK, raise_server_exceptions=False) as client:
        assert client.get("/v1/status", headers={"Host": "fewstep.example.com", **auth}
                          ).status_code == 200
        assert_typed_error(client.get("/v1/status", headers={"Host": "other.example", **auth}),
                           400, field="host")


# -- Origin and content types ----------------------------------------------------------------

def test_cross_origin_writes_are_refused(keyless):
    client, app = keyless
    jobs_before = client.get("/v1/jobs").json()
    for origin in ("http://attacker.example", "http://127.0.0.1:9999", "null",
                   "http://localhost:7860"):
        edit = client.post("/v1/images/edits", data={"prompt": "x", "size": "64x64"},
                           files={"image": ("i.png", _png_bytes(), "image/png")},
                           headers={"Origin": origin})
        assert_typed_error(edit, 403, field="origin", kind="cross_origin")
        interrupt = client.post("/sdapi/v1/interrupt", content=b"",
                                headers={"Origin": origin, "Content-Type": "text/plain"})
        assert_typed_error(interrupt, 403, field="origin")
        cancel = client.delete("/v1/jobs/nope", headers={"Origin": origin})
        assert_typed_error(cancel, 403, field="origin")
    assert client.get("/v1/jobs").json() == jobs_before  # nothing was started


def test_same_origin_writes_and_cross_origin_reads_pass(keyless):
    client, _ = keyless
    same = client.post("/v1/txt2img", json={"prompt": "x", **SMALL},
                       headers={"Origin": LOOPBACK})
    assert same.status_code == 200, same.text
    assert client.get("/v1/status", headers={"Origin": "http://attacker.example"}
                      ).status_code == 200  # a browser keeps the answer from the other page


def test_configured_names_are_trusted_origins():
    """Behind a proxy that rewrites Host, the page's origin is the configured public name."""
    app = make_app(allowed_hosts=("fewstep.example.com",))
    with TestClient(app, base_url=LOOPBACK, raise_server_exceptions=False) as client:
        response = client.post("/v1/txt2img", json={"prompt": "x", **SMALL},
                               headers={"Origin": "https://fewstep.example.com"})
        assert response.status_code == 200, response.text


@pytest.mark.parametrize("path,body", [
    ("/sdapi/v1/options", {"sd_model_checkpoint": "other"}),
    ("/v1/txt2img", {"prompt": "x", **SMALL}),
    ("/sdapi/v1/txt2img", {"prompt": "x", **SMALL}),
    ("/v1/images/generations", {"prompt": "x", "size": "64x64"}),
    ("/v1/control/canny", {"image": png_b64(sample_image(64))}),
])
@pytest.mark.parametrize("content_type", ["text/plain", "application/octet-stream", None])
def test_json_bodies_must_say_application_json(keyless, path, body, content_type):
    client, _ = keyless
    headers = {"Content-Type": content_type} if content_type else {}
    request = client.build_request("POST", path, content=json.dumps(body).encode(),
                                   headers=headers)
    if content_type is None:
        request.headers.pop("Content-Type", None)
    response = client.send(request)
    assert_typed_error(response, 415, field="content-type", kind="unsupported_media_type")


def test_a_form_is_not_json_either(keyless):
    client, _ = keyless
    options = client.post("/sdapi/v1/options", content=b'{"sd_model_checkpoint": "x"}',
                          headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert_typed_error(options, 415, field="content-type")
    generation = client.post("/v1/txt2img", content=json.dumps({"prompt": "x"}).encode(),
                             headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert_typed_error(generation, 422, field="body")


def test_json_with_parameters_and_suffixes_is_json(keyless):
    client, _ = keyless
    for content_type in ("application/json; charset=utf-8", "application/problem+json",
                         "Application/JSON"):
        response = client.post("/sdapi/v1/options", content=b'{"a": 1}',
                               headers={"Content-Type": content_type})
        assert response.status_code == 200, (content_type, response.text)


def test_bodiless_posts_need_no_content_type(keyless):
    client, _ = keyless
    assert client.post("/sdapi/v1/interrupt").status_code == 200


# -- the trailing-slash redirect ---------------------------------------------------------------

def test_trailing_slash_redirects_are_relative():
    with TestClient(make_app(api_key=KEY, allowed_hosts=()), base_url=LOOPBACK,
                    raise_server_exceptions=False, follow_redirects=False) as client:
        auth = {"Authorization": f"Bearer {KEY}"}
        response = client.get("/v1/jobs/?limit=1", headers={"Host": "evil.example", **auth})
        assert response.status_code in (307, 308), response.text
        assert response.headers["location"] == "/v1/jobs?limit=1"
        assert client.get("/v1/jobs/", headers=auth, follow_redirects=True).status_code == 200
        assert_typed_error(client.get("/v1/nothing-here/", headers=auth), 404)
