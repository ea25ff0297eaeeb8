"""Every output regenerates from its file: the record it carries, the same input images (checked
against their digests) and, for service outputs, the same catalogue. Same pixels, every task."""

import base64
import io
import json

import numpy as np
import pytest
from helpers.cli import one_error_line
from PIL import Image

from fewstep.cli import main
from fewstep.errors import InvalidRequest
from fewstep.outputs import save_result
from fewstep.records import read_record, same_pixels
from fewstep.reproduce import reproduce
from fewstep.selftest import sample_image, sample_mask


def _original(engine, request, out):
    """An output as the CLI writes it."""
    return save_result(engine.generate(request), out)


def _record_only(engine, request, out):
    """A file with the record `request` would get, without running it (for the checks made
    before anything runs)."""
    from fewstep.engine import Result

    record = engine.record(engine.plan(request), width=64, height=64)
    return save_result(Result(request.task, np.zeros((1, 64, 64, 3), np.float32), record),
                       out)[0]


def _cases(tiny):
    from fewstep.tasks import (AnimateRequest, ControlNetRequest, Img2ImgRequest,
                               InpaintRequest, LoraRequest, T2IAdapterRequest, Txt2ImgRequest)

    image, mask = sample_image(), sample_mask()
    return {
        # task: (request, suffix, input images given again: PIL, bytes or a path)
        "txt2img": (Txt2ImgRequest(prompt="a cat", num_images=2, steps=2, loras=[
            LoraRequest(ref=str(tiny.style_sd15), weight=0.7)]), ".png", {}),
        "img2img": (Img2ImgRequest(prompt="a cat", image=image, strength=0.5, steps=2), ".jpg",
                    {"image": image}),
        "inpaint": (InpaintRequest(prompt="a cat", image=image, mask=mask, steps=2), ".webp",
                    {"image": image, "mask": _png_bytes(mask)}),
        "controlnet": (ControlNetRequest(prompt="a cat", control_image=image, steps=2,
                                         controlnet=str(tiny.controlnet)), ".png",
                       {"control_image": image}),
        "t2i-adapter": (T2IAdapterRequest(prompt="a cat", control_image=image, steps=2,
                                          adapter=str(tiny.adapter_sd15), canny=False), ".png",
                        {"control_image": "INPUT"}),
        "animate": (AnimateRequest(prompt="a cat", motion_adapter=str(tiny.motion_adapter),
                                   num_frames=2, steps=2, width=64, height=64, loras=[
                                       LoraRequest(ref=str(tiny.motion_lora))]), ".gif", {}),
    }


def _png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("task", ["txt2img", "img2img", "inpaint", "controlnet", "t2i-adapter",
                                  "animate"])
def test_every_task_reproduces_from_its_file(tiny, sd15_engine, tmp_path, task):
    request, suffix, images = _cases(tiny)[task]
    if images.get("control_image") == "INPUT":
        sample_image().save(tmp_path / "input.png")
        images = {"control_image": tmp_path / "input.png"}
    paths = _original(sd15_engine, request, tmp_path / f"original{suffix}")
    original = paths[-1]  # with two images, the second: its batch position is recorded
    record = read_record(original)
    assert record.task == task and record.request["seed"] is not None
    assert set(record.inputs) == set(type(request).image_fields())

    again = tmp_path / f"again{suffix}"
    result = reproduce(original, images=images, engine=sd15_engine, out=again)
    assert result.images.shape[0] == 1
    assert same_pixels(original, again) == (True, 0)
    assert read_record(again).batch_index == record.batch_index


def test_animation_as_mp4_carries_its_record(tiny, sd15_engine, tmp_path):
    request, _, _ = _cases(tiny)["animate"]
    original = _original(sd15_engine, request, tmp_path / "a.mp4")[0]
    assert read_record(original).request["num_frames"] == 2
    again = tmp_path / "again.mp4"
    reproduce(original, engine=sd15_engine, out=again)
    assert same_pixels(original, again)[0]


def test_input_images_are_asked_for_and_checked(tiny, sd15_engine, tmp_path):
    from fewstep.tasks import Img2ImgRequest

    original = _record_only(sd15_engine, Img2ImgRequest(prompt="x", image=sample_image()),
                            tmp_path / "i.png")
    with pytest.raises(InvalidRequest, match="needs its input image again: --image"):
        reproduce(original, engine=sd15_engine)
    with pytest.raises(InvalidRequest, match="not the image this output was made from"):
        reproduce(original, engine=sd15_engine, images={"image": sample_image(seed=9)})
    with pytest.raises(InvalidRequest, match="takes no mask"):
        reproduce(original, engine=sd15_engine, images={"image": sample_image(),
                                                        "mask": sample_mask()})


def test_files_without_a_record_and_other_engines_are_refused(tiny, sd15_engine, tmp_path):
    from fewstep.engine import Engine
    from fewstep.tasks import Txt2ImgRequest

    plain = tmp_path / "plain.png"
    sample_image().save(plain)
    with pytest.raises(InvalidRequest, match="no fewstep record"):
        read_record(plain)
    original = _record_only(sd15_engine, Txt2ImgRequest(prompt="x"), tmp_path / "a.png")
    other = Engine.__new__(Engine)  # holds another model: checked before anything runs
    other.model_ref, other.lcm_ref = str(tiny.sdxl), str(tiny.lcm_sdxl)
    with pytest.raises(InvalidRequest, match="the engine holds model"):
        reproduce(original, engine=other)


def test_cli_reproduce_loads_what_the_record_says(tiny, tmp_path, monkeypatch, capsys):
    image = tmp_path / "input.png"
    sample_image().save(image)
    monkeypatch.chdir(tmp_path)
    assert main(["img2img", "x", "--image", str(image), "--model", str(tiny.sd15),
                 "--lcm-lora", str(tiny.lcm_sd15), "--lora", f"{tiny.style_sd15}:0.6",
                 "--device", "cpu", "--num-images", "2", "--steps", "2", "--quiet",
                 "--out", "cat.png"]) == 0
    capsys.readouterr()
    assert main(["reproduce", "cat-2.png", "--quiet"]) == 2
    assert "--image FILE" in capsys.readouterr().err
    assert main(["reproduce", "cat-2.png", "--image", str(image), "--quiet"]) == 0
    assert "same pixels as cat-2.png" in capsys.readouterr().err
    assert same_pixels("cat-2.png", "cat-2-reproduced.png") == (True, 0)
    # written as WebP, the pixels differ by the format's loss: the warning says so
    assert main(["reproduce", "cat-2.png", "--image", str(image), "--quiet",
                 "--out", "again.webp"]) == 0
    err = capsys.readouterr().err
    assert ".webp is a lossy format" in err and "another device" not in err


def test_service_outputs_reproduce_with_the_same_catalogue(tmp_path, capsys):
    from fastapi.testclient import TestClient

    from helpers.server import make_app, tiny_env

    models, _ = tiny_env()
    with TestClient(make_app()) as client:
        answer = client.post("/v1/txt2img", json={
            "prompt": "a cat", "seed": 5, "loras": [{"name": "style", "weight": 0.7},
                                                    {"name": "style-peft", "weight": 0.5}]})
    assert answer.status_code == 200, answer.text
    original = tmp_path / "service.png"
    original.write_bytes(base64.b64decode(answer.json()["images"][0]["b64"]))
    record = read_record(original)
    assert record.model == "tiny-sd15" and record.request["loras"][0]["ref"] == "style"
    assert set(record.catalog_names) == {"model", "lcm_lora", "request.loras.0.ref",
                                         "request.loras.1.ref"}
    assert str(models.root) not in original.read_bytes().decode("latin-1")  # no paths leak

    out = tmp_path / "again.png"
    assert main(["reproduce", str(original), "--out", str(out), "--quiet"]) == 2
    assert "--config FILE" in capsys.readouterr().err  # names need the catalogue
    config = tmp_path / "serve.json"
    config.write_text(json.dumps({
        "model": str(models.sd15), "model_name": "tiny-sd15", "lcm_lora": str(models.lcm_sd15),
        "lora": {"style": str(models.style_sd15), "style-peft": str(models.style_sd15_peft)}}))
    assert main(["reproduce", str(original), "--config", str(config), "--out", str(out),
                 "--device", "cpu", "--quiet"]) == 0
    assert same_pixels(original, out) == (True, 0)
    np.testing.assert_array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(original)))
    # or the entries as flags, the model given outright
    flags_out = tmp_path / "flags.png"
    assert main(["reproduce", str(original), "--model", str(models.sd15), "--lcm-lora",
                 str(models.lcm_sd15), "--lora", f"style={models.style_sd15}", "--lora",
                 f"style-peft={models.style_sd15_peft}", "--device", "cpu", "--quiet",
                 "--out", str(flags_out)]) == 0
    assert same_pixels(original, flags_out) == (True, 0)



@pytest.mark.parametrize("index", [99, -1, "x"])
def test_a_bad_batch_index_is_one_line_before_any_work(sd15_engine, tmp_path, capsys, index,
                                                       no_loading):
    from PIL import PngImagePlugin

    from fewstep.tasks import Txt2ImgRequest

    original = _record_only(sd15_engine, Txt2ImgRequest(prompt="x", seed=1), tmp_path / "a.png")
    data = json.loads(Image.open(original).text["fewstep"])
    info = PngImagePlugin.PngInfo()
    info.add_text("fewstep", json.dumps({**data, "batch_index": index}))
    Image.open(original).save(original, pnginfo=info)
    out = tmp_path / "again.png"
    assert main(["reproduce", str(original), "--out", str(out), "--quiet"]) == 2
    assert "(batch_index)" in one_error_line(capsys.readouterr().err)
    assert not out.exists()
