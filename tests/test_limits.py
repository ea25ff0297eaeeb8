"""What bounds the work of one denoising step, the unit a cancel or a shutdown waits for: a side
(no 64 x 65536 strips), and the pixels one step makes for all the images or frames of a call.
Refused before any work, in the library, the CLI and the service."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from helpers.server import assert_typed_error, make_app, tiny_env, unet_raises

# each exactly within the per-image pixel limit (2048 x 2048)
STRIPS = [(64, 65536, "height"), (65536, 64, "width"), (1024, 4104, "height")]


@pytest.mark.parametrize("width,height,field", STRIPS)
def test_a_side_over_the_limit_is_refused(width, height, field):
    from fewstep.config import Settings
    from fewstep.errors import InvalidRequest
    from fewstep.tasks import REQUESTS

    request = REQUESTS["txt2img"].build(prompt="x", width=width, height=height)
    with pytest.raises(InvalidRequest) as info:
        request.check_size(width, height, 8, Settings())
    assert info.value.field == field and "4096" in info.value.message


def test_the_side_limit_is_a_setting(monkeypatch):
    from fewstep.config import Settings
    from fewstep.tasks import REQUESTS

    monkeypatch.setenv("FEWSTEP_MAX_SIDE", "65536")
    settings = Settings.from_env()
    assert settings.max_side == 65536
    REQUESTS["txt2img"].build(prompt="x").check_size(64, 65536, 8, settings)


@pytest.mark.parametrize("task,values,field", [
    ("txt2img", {"num_images": 16, "width": 2048, "height": 2048}, "num_images"),
    ("txt2img", {"num_images": 5, "width": 2048, "height": 1664}, "num_images"),
    ("animate", {"num_frames": 64, "width": 1024, "height": 1024,
                 "motion_adapter": "m"}, "num_frames"),
])
def test_the_pixels_of_one_step_are_bounded(task, values, field):
    from fewstep.config import Settings
    from fewstep.errors import InvalidRequest
    from fewstep.tasks import REQUESTS

    request = REQUESTS[task].build(prompt="x", **values)
    with pytest.raises(InvalidRequest) as info:
        request.check_size(values["width"], values["height"], 8, Settings())
    assert info.value.field == field, info.value.message


@pytest.mark.parametrize("task,values", [
    ("txt2img", {"num_images": 16, "width": 1024, "height": 1024}),  # SDXL's size, 16 of them
    ("txt2img", {"num_images": 4, "width": 2048, "height": 2048}),
    ("animate", {"num_frames": 64, "width": 512, "height": 512, "motion_adapter": "m"}),
])
def test_usual_batches_stay_within_the_step_limit(task, values):
    from fewstep.config import Settings
    from fewstep.tasks import REQUESTS

    REQUESTS[task].build(prompt="x", **values).check_size(values["width"], values["height"],
                                                          8, Settings())


@pytest.mark.parametrize("route,body,field", [
    ("/v1/txt2img", {"prompt": "x", "width": 64, "height": 65536, "steps": 1}, "height"),
    ("/v1/images/generations", {"prompt": "x", "size": "65536x64"}, "size"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "width": 64, "height": 65536}, "height"),
    ("/v1/txt2img", {"prompt": "x", "width": 2048, "height": 2048, "num_images": 16},
     "num_images"),
])
def test_the_service_refuses_them_before_admission(route, body, field):
    _, engine = tiny_env()
    # should one be admitted, its first step fails at once instead of running for minutes
    with TestClient(make_app(), raise_server_exceptions=False) as client, \
            unet_raises(engine, lambda: RuntimeError("admitted"), times=100):
        before = client.get("/v1/jobs").json()
        assert_typed_error(client.post(route, json=body), 422, field=field)
        assert client.get("/v1/jobs").json() == before  # never queued


def test_the_cli_refuses_them_before_loading(tiny, tmp_path, capsys, no_loading):
    from fewstep.cli import main

    code = main(["txt2img", "x", "--model", str(tiny.sd15), "--width", "64", "--height",
                 "65536", "--out", str(tmp_path / "x.png")])
    assert code != 0
    err = capsys.readouterr().err
    assert "height" in err and "Traceback" not in err
