"""`fewstep.tasks`: each task's request refuses a bad value with an error naming the field, on its
own or when planned against a model; a record's request builds again."""

import math

import numpy as np
import pytest

from fewstep.errors import InvalidRequest
from fewstep.selftest import sample_image, sample_mask
from fewstep.tasks import (Img2ImgRequest, InpaintRequest, T2IAdapterRequest, Txt2ImgRequest)


def _invalid(engine, cls, field, **values):
    with pytest.raises(InvalidRequest) as info:
        engine.generate(cls.build(**{"prompt": "x", "seed": 1, **values}))
    assert info.value.field is not None and info.value.field.startswith(field), info.value
    return info.value


@pytest.mark.parametrize("values,field", [
    ({"width": 60}, "width"),
    ({"height": 100}, "height"),
    ({"width": 4096, "height": 4096}, "width"),
    ({"steps": 0}, "steps"),
    ({"steps": 51}, "steps"),
    ({"guidance": math.nan}, "guidance"),
    ({"guidance": math.inf}, "guidance"),
    ({"guidance": -1.0}, "guidance"),
    ({"num_images": 0}, "num_images"),
    ({"num_images": 99}, "num_images"),
    ({"seed": -5}, "seed"),
    ({"prompt": "y" * 100_000}, "prompt"),
    ({"loras": [{"ref": "x", "weight": math.nan}]}, "loras"),
    ({"loras": [{"ref": "x", "weight": 50}]}, "loras"),
    ({"unknown_field": 1}, "unknown_field"),
])
def test_txt2img_bad_values(sd15_engine, values, field):
    error = _invalid(sd15_engine, Txt2ImgRequest, field, **values)
    assert field in error.message


def test_strength(sd15_engine):
    image = sample_image()
    _invalid(sd15_engine, Img2ImgRequest, "strength", image=image, strength=1.5)
    _invalid(sd15_engine, Img2ImgRequest, "strength", image=image, strength=math.nan)
    error = _invalid(sd15_engine, Img2ImgRequest, "strength", image=image, strength=0.2, steps=4)
    assert "strength x steps" in error.message


def test_mask_of_another_size(sd15_engine):
    error = _invalid(sd15_engine, InpaintRequest, "mask", image=sample_image(),
                     mask=sample_mask(32))
    assert "same size" in error.message


def test_t2i_adapter_size_must_fit_its_factor(sd15_engine, coarse_adapter):
    # 72 is a multiple of 8 but not of this adapter's 16: its own factor refuses it
    error = _invalid(sd15_engine, T2IAdapterRequest, "width", control_image=sample_image(),
                     adapter=str(coarse_adapter), width=72, height=64)
    assert "multiple of 16" in error.message
    sd15_engine.plan(T2IAdapterRequest(prompt="x", control_image=sample_image(),
                                       adapter=str(coarse_adapter), width=64, height=64))


def test_negative_prompt_warning(sd15_engine):
    result = sd15_engine.generate(Txt2ImgRequest(prompt="x", negative_prompt="y", seed=1))
    assert any("negative prompt has no effect" in w for w in result.warnings)
    assert not Txt2ImgRequest(prompt="x", negative_prompt="y", guidance=1.5).warnings()


@pytest.mark.parametrize("cls,values,field", [
    (Img2ImgRequest, {"image": sample_image(size=4)}, "image"),
    (InpaintRequest, {"image": sample_image(), "mask": sample_image(size=7)}, "mask"),
    (T2IAdapterRequest, {"control_image": sample_image(size=6), "adapter": "x"},
     "control_image"),
    (Txt2ImgRequest, {"task": "img2img"}, "task"),
])
def test_build_refuses_without_a_model(cls, values, field):
    with pytest.raises(InvalidRequest) as info:
        cls.build(prompt="x", **values)
    assert info.value.field == field


def test_canny_thresholds_name_their_field():
    from fewstep.tasks import ControlNetRequest

    with pytest.raises(InvalidRequest) as info:
        ControlNetRequest.build(prompt="x", control_image=sample_image(), controlnet="c",
                                canny_low=200, canny_high=100)
    assert info.value.field == "canny_low"


def test_a_record_builds_its_request_again(sd15_engine):
    result = sd15_engine.generate(Txt2ImgRequest(prompt="again", seed=5, width=64, height=64))
    record = result.record.request
    again = sd15_engine.generate(Txt2ImgRequest.build(**record))
    assert np.array_equal(result.images, again.images)


def test_image_fields_read_a_path_object_but_never_text(tmp_path):
    from pathlib import Path

    sample_image().save(tmp_path / "photo.png")
    request = Img2ImgRequest(prompt="x", image=tmp_path / "photo.png")
    assert request.image.size == (64, 64)
    with pytest.raises(InvalidRequest) as info:
        Img2ImgRequest.build(prompt="x", image=str(tmp_path / "photo.png"))
    assert info.value.field == "image" and "Path(" in info.value.message
    with pytest.raises(InvalidRequest) as info:
        Img2ImgRequest.build(prompt="x", image=Path(tmp_path / "absent.png"))
    assert info.value.field == "image" and "no such file" in info.value.message


@pytest.mark.parametrize("values, expected", [
    ({"width": 65}, "width: must be a multiple of 8, got 65"),
    ({"steps": "abc"}, "(got 'abc')"),
    ({"image": sample_image(size=4)}, "image: is 4x4 pixels; images must be at least 8x8"),
])
def test_errors_read_as_plain_words(values, expected):
    cls = Img2ImgRequest if "image" in values else Txt2ImgRequest
    with pytest.raises(InvalidRequest) as info:
        cls.build(prompt="x", **values)
    message = info.value.message
    assert expected in message
    assert "Value error" not in message and message.count("got") <= 1 and "<PIL" not in message
