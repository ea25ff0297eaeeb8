"""The fast path gives the same images as the plain path where it claims to (tiny models, CPU).

Exact techniques (prompt cache, channels_last, SDPA) are held to 1e-4 on float images in 0..1;
the prompt cache alone is bitwise. Half precision and the tiny VAE change the picture by design
and are only checked to run and to stay finite."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fewstep.accel import FastOptions, FastPath
from fewstep.accel.syncs import unet_batches
from fewstep.prompts import PromptCache
from fewstep.build import build_engine
from fewstep.tasks import Img2ImgRequest, LoraRequest, Txt2ImgRequest

EXACT_TOL = 1e-4


def _engine(tiny, family="sd15"):
    model, lcm = {"sd15": (tiny.sd15, tiny.lcm_sd15), "sdxl": (tiny.sdxl, tiny.lcm_sdxl),
                  "ssd-1b": (tiny.ssd1b, tiny.lcm_ssd1b)}[family]
    return build_engine(model=str(model), lcm_lora=str(lcm), device="cpu", dtype="fp32",
                        speed="off")


@pytest.fixture(scope="module")
def pair(tiny):
    """A plain engine and one with the default fast path, on the same tiny SD1.5 weights."""
    plain = _engine(tiny)
    fast = _engine(tiny)
    # the exact techniques, channels_last included (the CPU presets leave it off in float32)
    report = FastPath(FastOptions(channels_last_vae=True)).apply(fast)
    return plain, fast, report


def test_cpu_presets_keep_float32_weights_in_their_order():
    """NHWC weights run slower in float32 on a CPU (and copying them costs seconds): only the
    half-precision preset and other devices get them."""
    for preset in ("default", "auto"):
        assert FastPath.preset(preset, "cpu").options.channels_last is False
        assert FastPath.preset(preset, "cuda").options.channels_last is True
    fastest = FastPath.preset("fastest", "cpu").options
    assert fastest.channels_last is (fastest.dtype is not None)


def test_cpu_presets_decode_in_nhwc():
    """The VAE decodes 15 % faster in NHWC on a CPU (the tiny one 3x in bf16); CUDA's
    GroupNorms run slower that way."""
    for preset in ("default", "auto", "fastest"):
        assert FastPath.preset(preset, "cpu").options.channels_last_vae is True
        assert FastPath.preset(preset, "cuda").options.channels_last_vae is False
    assert FastPath.preset("off", "cpu").options.channels_last_vae is False


def _image(engine, **kw):
    kw.setdefault("prompt", "a red lighthouse")
    kw.setdefault("seed", 7)
    kw.setdefault("width", 64)
    kw.setdefault("height", 64)
    return engine.generate(Txt2ImgRequest(**kw)).images


def test_default_fast_path_equals_plain(pair):
    plain, fast, report = pair
    assert report.applied["prompt_cache"] == "on"
    assert report.applied["channels_last"] == "on"
    assert fast.base.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert report.applied["channels_last_vae"] == "on"
    assert fast.base.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert not fast.base.vae.decoder.conv_in.weight.is_contiguous()
    a, b = _image(plain), _image(fast)
    assert a.shape == b.shape == (1, 64, 64, 3)
    assert np.abs(a - b).max() <= EXACT_TOL


def test_sdpa_is_the_default_attention(pair):
    """diffusers already uses SDPA; the fast path reports what it found without changing it."""
    _, fast, report = pair
    found = {type(p).__name__ for p in fast.base.unet.attn_processors.values()}
    assert found == {"AttnProcessor2_0"}
    assert set(report.checks["sdpa"]) == {"AttnProcessor2_0"}


def test_plain_attention_is_switched_to_sdpa(tiny):
    """A model that comes with plain (non-SDPA) attention gets SDPA from the fast path, with the
    same picture."""
    from diffusers.models.attention_processor import AttnProcessor

    plain = _engine(tiny)
    slow = _engine(tiny)
    slow.base.unet.set_attn_processor(AttnProcessor())
    report = FastPath(FastOptions(prompt_cache=False, static_scheduler=False,
                                  channels_last=False, sdpa=True)).apply(slow)
    assert {type(p).__name__ for p in slow.base.unet.attn_processors.values()} == \
        {"AttnProcessor2_0"}
    assert set(report.checks["sdpa"]) == {"AttnProcessor2_0"}
    assert np.abs(_image(slow) - _image(plain)).max() <= EXACT_TOL


def test_prompt_cache_hit_gives_identical_images(pair):
    _, fast, _ = pair
    cache = fast.prompt_cache
    first = _image(fast, prompt="cache me", seed=3)
    hits = cache.hits
    second = _image(fast, prompt="cache me", seed=3)
    assert cache.hits == hits + 1
    assert np.array_equal(first, second)  # bitwise
    misses = cache.misses
    _image(fast, prompt="something else", seed=3)
    assert cache.misses == misses + 1


def test_prompt_cache_is_exact_against_no_cache(tiny):
    engine = _engine(tiny)
    FastPath(FastOptions(prompt_cache=True, channels_last=False, sdpa=False,
                         static_scheduler=False)).apply(engine)
    uncached_engine = _engine(tiny)
    for _ in range(2):  # a miss, then a hit
        assert np.array_equal(_image(engine, num_images=2), _image(uncached_engine, num_images=2))
    assert engine.prompt_cache.hits >= 1


def test_lora_stack_with_text_encoder_parts(pair, tiny):
    """A style LoRA with text-encoder weights changes the prompt embeddings: the cache must key
    on the LoRA stack, and every stack must equal the plain engine's."""
    plain, fast, _ = pair
    cache = fast.prompt_cache
    for loras in ([LoraRequest(ref=str(tiny.style_sd15), weight=0.7)],
                  [LoraRequest(ref=str(tiny.style_sd15), weight=0.3)],
                  [LoraRequest(ref=str(tiny.style_sd15), weight=0.7),
                   LoraRequest(ref=str(tiny.style_sd15_peft), weight=0.5)],
                  []):
        misses = cache.misses
        a = _image(plain, prompt="stack", loras=loras)
        b = _image(fast, prompt="stack", loras=loras)
        assert np.abs(a - b).max() <= EXACT_TOL, loras
        if loras and loras[0].weight == 0.3:
            assert cache.misses == misses + 1  # the text-encoder scale changed: no stale hit


def test_img2img_through_the_fast_path(pair):
    from PIL import Image

    plain, fast, _ = pair
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    req = dict(prompt="img2img", image=image, seed=5, strength=0.75)
    a = plain.generate(Img2ImgRequest(**req)).images
    b = fast.generate(Img2ImgRequest(**req)).images
    assert np.abs(a - b).max() <= EXACT_TOL


@pytest.mark.parametrize("family", ["sdxl", "ssd-1b"])
def test_sdxl_family_fast_path_equals_plain(tiny, family):
    plain, fast = _engine(tiny, family), _engine(tiny, family)
    FastPath.preset("default", "cpu").apply(fast)
    a, b = _image(plain), _image(fast)
    assert np.abs(a - b).max() <= EXACT_TOL
    hits = fast.prompt_cache.hits
    assert np.array_equal(b, _image(fast))
    assert fast.prompt_cache.hits == hits + 1


def cfg_batch(pipe, guidance: float, **call) -> int:
    """The batch the UNet sees for one image at `guidance`: 1 when classifier-free guidance is
    off (diffusers' `guidance_scale > 1` rule), 2 when it doubles the batch."""
    with unet_batches(pipe) as seen, torch.inference_mode():
        pipe(guidance_scale=guidance, num_inference_steps=1, output_type="latent", **call)
    return seen[0]


def test_no_cfg_batch_doubling_at_guidance_one(pair):
    plain, _, _ = pair
    call = dict(prompt="x", width=64, height=64, generator=torch.Generator().manual_seed(0))
    assert cfg_batch(plain.base, 1.0, **call) == 1
    assert cfg_batch(plain.base, 2.0, **call) == 2


def test_fastest_options_run(tiny):
    """bf16 + tiny VAE (random weights, the tiny models' x2 scale): runs, finite, right shape."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    taesd = AutoencoderTiny(encoder_block_out_channels=(16, 16), decoder_block_out_channels=(16, 16),
                            num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1))
    engine = _engine(tiny)
    report = FastPath.preset("fastest", "cpu", "sd15", tiny_vae=taesd, dtype="bf16").apply(engine)
    assert report.applied["dtype"] == "bfloat16"
    assert engine.base.vae is taesd
    images = _image(engine)
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()
    # pipelines derived later get the same treatment
    pipe = engine.pipeline("img2img")
    assert pipe.vae is taesd and pipe.unet.dtype == torch.bfloat16


def test_fp16_vae_option_turns_off_upcast(tiny):
    from diffusers import AutoencoderKL

    engine = _engine(tiny, "sdxl")
    vae = AutoencoderKL.from_pretrained(str(tiny.sdxl / "vae"))
    vae.register_to_config(force_upcast=True)
    report = FastPath(FastOptions(fp16_vae=vae)).apply(engine)
    assert engine.base.vae is vae and vae.config.force_upcast is False
    assert report.applied["fp16_vae"].startswith("<")
    # SD1.5 has nothing to fix
    sd = _engine(tiny)
    assert FastPath(FastOptions(fp16_vae=vae)).apply(sd).applied["fp16_vae"].startswith("skipped")


def test_prompt_cache_is_bounded_and_returns_copies():
    cache = PromptCache(2)
    cache.put("a", (torch.ones(2), None))
    value = cache.get("a")
    value[0].add_(5)  # a caller changing its copy changes nothing cached
    assert torch.equal(cache.get("a")[0], torch.ones(2))
    assert cache.get("missing") is None
    for key in "bcd":
        cache.put(key, (torch.zeros(1),))
    assert cache.get("a") is None and cache.get("d") is not None
    assert (cache.hits, cache.misses) == (3, 2)
