"""`fewstep.engine`: an engine runs the loaded model's task pipelines on shared weights, with
progress, previews, cancellation and the limits of its settings; components are checked against
its UNet; the LCM-LoRA weight of animations is their own."""

import threading

import numpy as np
import pytest
import torch

from fewstep.build import build_engine
from fewstep.config import Settings
from fewstep.engine import out_of_memory
from fewstep.errors import Cancelled, InvalidRequest, ModelError
from fewstep.selftest import sample_image
from fewstep.tasks import T2IAdapterRequest, Txt2ImgRequest


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


def test_inpaint_model_runs_inpaint_only(tiny):
    engine = build_engine(model=str(tiny.sd15_inpaint), lcm_lora=str(tiny.lcm_sd15), device="cpu")
    with pytest.raises(ModelError) as info:
        engine.generate(Txt2ImgRequest(prompt="x", seed=1))
    assert "inpaint" in info.value.message


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


@pytest.mark.parametrize("exc, expected", [
    (torch.OutOfMemoryError("CUDA out of memory"), True),
    (MemoryError(), True),
    (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes"), True),
    (RuntimeError("std::bad_alloc"), True),
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), False),
    (ValueError("DefaultCPUAllocator: can't allocate memory"), False),
])
def test_failed_allocations_are_recognised_on_every_device(exc, expected):
    assert out_of_memory(exc) is expected
