"""Bad input gets a clear error naming the field, and changes nothing."""

import math
import threading

import numpy as np
import pytest

from fewstep.config import Settings
from fewstep.build import build_engine
from fewstep.errors import (Cancelled, InvalidRequest, ModelError, NotFound, OfflineError,
                            UnsafeFormat)
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


def test_t2i_adapter_size_must_fit_its_factor(sd15_engine, tiny):
    # the tiny SD1.5 adapter downscales by 4 overall; 8 is the stricter multiple here
    _invalid(sd15_engine, T2IAdapterRequest, "width", control_image=sample_image(),
             adapter=str(tiny.adapter_sd15), width=60, height=64)


def test_unreadable_image(tmp_path):
    from fewstep.images import load_image

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(InvalidRequest) as info:
        load_image(bad, "mask")
    assert info.value.field == "mask"
    good = tmp_path / "good.png"
    sample_image().save(good)
    good.write_bytes(good.read_bytes()[:200])  # truncated
    with pytest.raises(InvalidRequest):
        load_image(good, "image")
    with pytest.raises(InvalidRequest) as info:
        load_image(tmp_path / "none.png", "control_image")
    assert "no such file" in info.value.message


def test_decompression_bomb(tmp_path):
    from PIL import Image

    from fewstep.images import load_image

    path = tmp_path / "big.png"
    Image.new("L", (5000, 5000)).save(path)
    with pytest.raises(InvalidRequest) as info:
        load_image(path, "image", max_pixels=4096 * 4096)
    assert "limit" in info.value.message


def test_negative_prompt_warning(sd15_engine):
    result = sd15_engine.generate(Txt2ImgRequest(prompt="x", negative_prompt="y", seed=1))
    assert any("negative prompt has no effect" in w for w in result.warnings)
    assert not Txt2ImgRequest(prompt="x", negative_prompt="y", guidance=1.5).warnings()


def test_progress_and_cancellation(sd15_engine):
    steps = []
    sd15_engine.generate(Txt2ImgRequest(prompt="x", seed=1, steps=3),
                         progress=lambda step, total: steps.append((step, total)))
    assert steps == [(1, 3), (2, 3), (3, 3)]

    cancel = threading.Event()

    def stop_after_first(step, total):
        cancel.set()

    with pytest.raises(Cancelled):
        sd15_engine.generate(Txt2ImgRequest(prompt="x", seed=1), progress=stop_after_first,
                             cancel=cancel)
    # the engine keeps serving
    assert sd15_engine.generate(Txt2ImgRequest(prompt="x", seed=1)).images.shape == (1, 64, 64, 3)


def test_unknown_and_unsafe_models(tmp_path, monkeypatch):
    with pytest.raises(NotFound) as info:
        build_engine(model=str(tmp_path / "nope"))
    assert info.value.field == "model"
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"x")
    with pytest.raises(UnsafeFormat):
        build_engine(model=str(ckpt))
    with pytest.raises(UnsafeFormat):
        build_engine(model=str(tmp_path / "weights.bin"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OfflineError) as info:
        build_engine(model="some-org/not-cached-model")
    assert "local diffusers folder" in info.value.message


def test_inpaint_model_runs_inpaint_only(tiny):
    engine = build_engine(model=str(tiny.sd15_inpaint), lcm_lora=str(tiny.lcm_sd15), device="cpu")
    with pytest.raises(ModelError) as info:
        engine.generate(Txt2ImgRequest(prompt="x", seed=1))
    assert "inpaint" in info.value.message


def test_lcm_lora_of_another_family_is_refused(tiny):
    from fewstep.errors import LoraError

    with pytest.raises(LoraError):
        build_engine(model=str(tiny.sd15), lcm_lora=str(tiny.lcm_sdxl), device="cpu")


def test_family_detection(tiny):
    from fewstep.families import detect_family
    import json

    names = [detect_family(json.loads((p / "unet" / "config.json").read_text())).name
             for p in (tiny.sd15, tiny.sdxl, tiny.ssd1b, tiny.sd15_inpaint)]
    assert names == ["sd15", "sdxl", "ssd-1b", "sd15"]


def test_a_family_that_does_not_fit_the_model_is_refused_before_loading(tiny):
    with pytest.raises(ModelError) as info:
        build_engine(model=str(tiny.sdxl), family="sd15", lcm_lora=str(tiny.lcm_sd15), device="cpu")
    assert info.value.field == "family" and "sdxl" in info.value.message
    with pytest.raises(ModelError) as info:
        build_engine(model=str(tiny.sd15), family="sdxl", lcm_lora=str(tiny.lcm_sdxl), device="cpu")
    assert info.value.field == "family"
    # SSD-1B shares SDXL's layout: naming the other one only changes the defaults
    engine = build_engine(model=str(tiny.ssd1b), family="sdxl", lcm_lora="none", device="cpu",
                          speed="off")
    assert engine.family.name == "sdxl"


def test_settings_limits_apply(tiny):
    engine = build_engine(model=str(tiny.sd15), lcm_lora="none", device="cpu",
                          settings=Settings(max_pixels=64 * 32, max_steps=2))
    with pytest.raises(InvalidRequest) as info:
        engine.generate(Txt2ImgRequest(prompt="x", steps=3))
    assert info.value.field == "steps"
    with pytest.raises(InvalidRequest):
        engine.generate(Txt2ImgRequest(prompt="x", steps=2))  # 64x64 > limit
    assert np.isfinite(engine.generate(
        Txt2ImgRequest(prompt="x", steps=2, width=64, height=32)).images).all()


def test_task_pipelines_share_the_loaded_weights(sd15_engine, tiny):
    base = sd15_engine.base
    for task, extra in (("img2img", {}), ("inpaint", {}),
                        ("controlnet", {"controlnet": str(tiny.controlnet)})):
        pipe = sd15_engine.pipeline(task, **extra)
        assert pipe.unet is base.unet and pipe.vae is base.vae
        assert pipe.text_encoder is base.text_encoder
        assert sd15_engine.pipeline(task, **extra) is pipe  # built once
    # the LCM-LoRA is fused: no adapter layers remain from it
    assert "fs_bake" not in getattr(base.unet, "peft_config", {})
    assert sd15_engine.lcm_ref == str(tiny.lcm_sd15)


def test_step_previews(sd15_engine):
    previews = []
    sd15_engine.generate(Txt2ImgRequest(prompt="x", seed=1, steps=3),
                         preview=lambda step, image: previews.append((step, image.size)))
    assert previews == [(1, (32, 32)), (2, (32, 32)), (3, (32, 32))]  # latent resolution


def test_fp16_load_falls_back_when_no_variant(tiny):
    import torch

    engine = build_engine(model=str(tiny.sd15), lcm_lora=str(tiny.lcm_sd15), device="cpu",
                          dtype="fp16")
    assert engine.base.unet.dtype == torch.float16


def test_animation_has_its_own_lcm_weight(tiny):
    """The recipe animates at LCM weight 0.55 while images use 1.0: one engine serves both."""
    from fewstep.tasks import AnimateRequest

    request = AnimateRequest(prompt="x", seed=4, steps=2, num_frames=2,
                             motion_adapter=str(tiny.motion_adapter))
    both = build_engine(model=str(tiny.sd15), lcm_lora=f"{tiny.lcm_sd15}:1.0",
                        animate_lcm_weight=0.55, device="cpu", speed="off")
    only = build_engine(model=str(tiny.sd15), lcm_lora=f"{tiny.lcm_sd15}:0.55",
                        animate_lcm_weight=0.55, device="cpu", speed="off")
    full = build_engine(model=str(tiny.sd15), lcm_lora=f"{tiny.lcm_sd15}:1.0",
                        animate_lcm_weight=1.0, device="cpu", speed="off")
    animated = both.generate(request)
    np.testing.assert_allclose(animated.images, only.generate(request).images, atol=1e-5)
    assert np.abs(animated.images - full.generate(request).images).max() > 1e-3
    assert animated.record.lcm_weight == 0.55
    image = Txt2ImgRequest(prompt="x", seed=4)
    np.testing.assert_array_equal(both.generate(image).images, full.generate(image).images)


def test_components_that_do_not_fit_are_refused_naming_the_field(sd15_engine, tiny):
    # the SDXL ControlNet and T2I-Adapter on an SD1.5 model; the SD1.5 ones pass
    for kind, wrong, right in (("controlnet", tiny.controlnet_sdxl, tiny.controlnet),
                               ("adapter", tiny.adapter_sdxl, tiny.adapter_sd15)):
        with pytest.raises(ModelError) as info:
            sd15_engine.check_component(kind, str(wrong), f"catalog.{kind}")
        assert info.value.field == f"catalog.{kind}" and "does not fit" in info.value.message
        sd15_engine.check_component(kind, str(right), kind)
    sd15_engine.check_component("motion_adapter", str(tiny.motion_adapter))


def test_motion_adapter_on_an_sdxl_model_is_refused(tiny):
    engine = build_engine(model=str(tiny.sdxl), lcm_lora=str(tiny.lcm_sdxl), device="cpu",
                          speed="off")
    with pytest.raises(ModelError) as info:
        engine.check_component("motion_adapter", str(tiny.motion_adapter), "motion_adapter")
    assert info.value.field == "motion_adapter"


def test_validate_checks_without_running(sd15_engine, tiny):
    calls = []
    handle = sd15_engine.base.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(InvalidRequest) as info:
            sd15_engine.validate(T2IAdapterRequest(prompt="x", control_image=sample_image(),
                                                   adapter=str(tiny.adapter_sd15), width=4096,
                                                   height=4096))
        assert info.value.field == "width"
        sd15_engine.validate(Txt2ImgRequest(prompt="x", width=64, height=64))
    finally:
        handle.remove()
    assert calls == []  # no model ran


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
