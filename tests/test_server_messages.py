"""What error answers and warnings say: the field a client sent, named as sent (whatever it is
called, without pydantic's union branches), never an answer that depends on whether a guessed
server path exists, and A1111 LoRA tags read in full."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from helpers.server import assert_typed_error, make_app, png_b64, sample_image, tiny_env

SMALL = {"width": 64, "height": 64, "steps": 1}


@pytest.fixture(scope="module")
def client():
    with TestClient(make_app(queue_size=4), raise_server_exceptions=False) as c:
        yield c


# -- field names -----------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["path", "body", "query", "header", "form", "cookie", "a"])
def test_a1111_override_settings_errors_name_the_key_as_sent(client, key):
    """An option value of the wrong shape: the field is the option's own key, whatever it is
    called, and none of the union's branch names (`str`, `list[...]`)."""
    response = client.post("/sdapi/v1/txt2img", json={
        "prompt": "x", "override_settings": {key: {"nested": 1}}, **SMALL})
    error = assert_typed_error(response, 422)
    assert error["field"] == f"override_settings.{key}", error


def test_a1111_override_settings_list_items_name_their_index(client):
    response = client.post("/sdapi/v1/txt2img", json={
        "prompt": "x", "override_settings": {"path": [1, {"x": 2}]}, **SMALL})
    error = assert_typed_error(response, 422)
    assert error["field"] in ("override_settings.path", "override_settings.path.1"), error
    assert "str" not in error["field"].split(".") and "[" not in error["field"], error


def test_missing_and_nested_fields_keep_their_names(client):
    error = assert_typed_error(client.post("/v1/txt2img", json={"steps": 1}), 422)
    assert error["field"] == "prompt", error
    error = assert_typed_error(client.post("/v1/txt2img", json={
        "prompt": "x", "loras": [{"name": "style"}, {"weight": 1}]}), 422)
    assert error["field"] == "loras.1.name", error
    error = assert_typed_error(client.post("/v1/txt2img?wait=maybe", json={"prompt": "x"}), 422)
    assert error["field"] == "wait", error


def test_upload_params_errors_name_the_field(client):
    image = ("i.png", _png(sample_image(64)), "image/png")
    response = client.post("/v1/img2img/upload", files={"image": image},
                           data={"params": json.dumps({"prompt": "x", "path": 1})})
    assert assert_typed_error(response, 422)["field"] == "path"


def test_field_from_loc_drops_only_the_location_and_union_branches():
    from fewstep.server.errors import field_from_loc

    body = {"body": {"path": 1}, "override_settings": {"query": {"x": 1}}}
    assert field_from_loc(("body", "body", "path"), body, located=True) == "body.path"
    assert field_from_loc(("body", "override_settings", "query", "str"), body,
                          located=True) == "override_settings.query"
    assert field_from_loc(("body", "override_settings", "query", "list[str]", 0), body,
                          located=True) == "override_settings.query"
    assert field_from_loc(("body", "prompt"), body, located=True, missing=True) == "prompt"
    assert field_from_loc(("query", "wait"), body, located=True) == "wait"
    assert field_from_loc(("path", "x")) == "path.x"  # not located, no input: all kept


def _png(image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# -- A1111 LoRA tags with two weights --------------------------------------------------------

@pytest.mark.parametrize("tag,weight,warned", [
    ("<lora:style:0.5>", 0.5, False),
    ("<lora:style:0.7:0.7>", 0.7, False),
    ("<lora:style:0.2:0.8>", 0.8, True),
    ("<lora:style:te=0.2:unet=0.8>", 0.8, True),
    ("<lora:style:unet=0.6>", 0.6, True),
    ("<lora:style:0.5:0.5:4>", 0.5, True),
])
def test_lora_tags_with_text_encoder_and_unet_weights(client, tag, weight, warned):
    """One weight per LoRA here (text encoder and UNet alike): the UNet's is used, and a tag
    that asked for more is answered with a warning, as an unknown sampler is."""
    response = client.post("/sdapi/v1/txt2img", json={"prompt": f"a cat {tag}", "seed": 1,
                                                      **SMALL})
    assert response.status_code == 200, response.text
    info = json.loads(response.json()["info"])
    assert info["prompt"] == "a cat"
    assert [lora["weight"] for lora in info["loras"]] == [weight]
    header = response.headers.get("X-Fewstep-Warning", "")
    if warned:
        assert "style" in header and any("style" in w for w in info["warnings"]), header
    else:
        assert not header and info["warnings"] == []


@pytest.mark.parametrize("tag", ["<lora:style:0.5:9>", "<lora:style:te=x>",
                                 "<lora:style:unet=nan>"])
def test_every_weight_of_a_tag_is_checked(client, tag):
    assert_typed_error(client.post("/sdapi/v1/txt2img", json={"prompt": tag, **SMALL}), 422,
                       field="prompt")


# -- answers never depend on whether a guessed server path exists -----------------------------

HIDDEN = {"model": "/srv/m/sd15", "lora": "/srv/m/style", "controlnet": "/srv/m/canny",
          "lcm": "/srv/m/lcm"}


@pytest.fixture(scope="module")
def hidden_client():
    """A catalogue with short references, which an error message could echo whole."""
    from fewstep.server.app import create_app
    from fewstep.server.catalog import Catalog
    from fewstep.server.service import ServerOptions

    _, engine = tiny_env()
    catalog = Catalog(model_name="tiny-sd15", loras={"style": HIDDEN["lora"]},
                      controlnets={"canny": HIDDEN["controlnet"]},
                      hidden={"tiny-sd15": HIDDEN["model"], "lcm-lora": HIDDEN["lcm"]})
    app = create_app(engine, catalog, ServerOptions(allowed_hosts=("testserver",)))
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def _guesses():
    image = png_b64(sample_image(64))
    return [
        ("controlnet", lambda v: ("/v1/controlnet", {"prompt": "x", "control_image": image,
                                                     "controlnet": v, **SMALL})),
        ("lora", lambda v: ("/v1/txt2img", {"prompt": "x", "loras": [{"name": v}]})),
        ("lora", lambda v: ("/sdapi/v1/txt2img", {"prompt": f"x <lora:{v}:1>", **SMALL})),
        ("model", lambda v: ("/v1/images/generations", {"prompt": "x", "model": v})),
        ("model", lambda v: ("/sdapi/v1/txt2img", {
            "prompt": "x", "override_settings": {"sd_model_checkpoint": v}, **SMALL})),
        ("model", lambda v: ("/sdapi/v1/options", {"sd_model_checkpoint": v})),
    ]


@pytest.mark.parametrize("index", range(len(_guesses())))
def test_a_guessed_path_gets_the_same_answer_whether_it_exists_or_not(hidden_client, index):
    kind, request = _guesses()[index]
    answers = []
    for guess in (HIDDEN[kind], HIDDEN[kind] + "-absent"):
        path, body = request(guess)
        response = hidden_client.post(path, json=body)
        error = assert_typed_error(response)
        answers.append((response.status_code, error["field"],
                        error["message"].replace(guess, "<guess>")))
    assert answers[0] == answers[1], answers
    assert "canny" not in answers[0][2] or kind == "controlnet"


def test_a_prompt_comes_back_as_sent(client):
    """Prompts are the client's text: a server path in one is not rewritten in the record."""
    models, _ = tiny_env()
    for prompt in (f"a cat {models.sd15}", f"a cat {models.controlnet}/config.json"):
        response = client.post("/v1/txt2img", json={"prompt": prompt, "seed": 1, **SMALL})
        assert response.status_code == 200, response.text
        assert response.json()["params"]["request"]["prompt"] == prompt
