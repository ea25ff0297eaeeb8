"""LoRA files: both key formats, refusals before the model is touched, and no leaks."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers.models import unet_fingerprint
from fewstep.errors import LoraError, NotFound, UnsafeFormat
from fewstep.lora import parse_lora_arg
from fewstep.tasks import LoraRequest, Txt2ImgRequest


def _run(engine, loras=(), seed=11):
    request = Txt2ImgRequest(prompt="a boat", seed=seed,
                             loras=[LoraRequest(ref=str(r), weight=w) for r, w in loras])
    return engine.generate(request).images


def _refused(engine, path, error=LoraError):
    before = unet_fingerprint(engine.base.unet)
    adapters_before = dict(engine._slots_for(engine.base).loaded)
    with pytest.raises(error) as info:
        _run(engine, [(path, 1.0)])
    assert torch.equal(before, unet_fingerprint(engine.base.unet)), "the model was touched"
    assert dict(engine._slots_for(engine.base).loaded) == adapters_before
    return info.value


@pytest.fixture(scope="module")
def unfused_engine(tiny):
    from fewstep.build import build_engine

    return build_engine(model=str(tiny.sd15), lcm_lora=str(tiny.lcm_sd15), device="cpu",
                        fuse_loras=False)


@pytest.fixture(params=["fused", "unfused"])
def any_engine(request, sd15_engine, unfused_engine):
    return sd15_engine if request.param == "fused" else unfused_engine


def test_stack_does_not_leak_between_requests(any_engine, tiny):
    plain = _run(any_engine)
    styled = _run(any_engine, [(tiny.style_sd15, 0.8)])
    both = _run(any_engine, [(tiny.style_sd15, 0.8), (tiny.style_sd15_peft, 1.0)])
    plain_again = _run(any_engine)
    for weight in (0.1, 0.9, -0.5, 1.3):  # many switches: fused weights must not drift
        _run(any_engine, [(tiny.style_sd15_peft, weight), (tiny.style_sd15, weight)])
    styled_again = _run(any_engine, [(tiny.style_sd15, 0.8)])
    assert np.abs(plain - styled).max() > 1e-3, "the style LoRA had no effect"
    assert np.abs(styled - both).max() > 1e-3
    np.testing.assert_array_equal(plain, plain_again)
    np.testing.assert_array_equal(plain, _run(any_engine))
    np.testing.assert_allclose(styled, styled_again, atol=1e-6)


def test_fused_and_unfused_stacks_agree(sd15_engine, unfused_engine, tiny):
    stack = [(tiny.style_sd15, 0.8), (tiny.style_sd15_peft, 0.5)]
    fused, unfused = _run(sd15_engine, stack), _run(unfused_engine, stack)
    np.testing.assert_allclose(fused, unfused, atol=1e-5)
    # fused: the deltas live in the weights and the adapter layers are switched off
    layers = [m for m in sd15_engine.base.unet.modules() if hasattr(m, "lora_A")]
    assert layers and all(m.disable_adapters for m in layers)


def test_text_encoder_lora_across_unets(any_engine, tiny):
    """The text encoder is shared by the base and the motion UNet: stacks on one must not
    reach the other, and making the motion UNet must not lose anything."""
    from fewstep.tasks import AnimateRequest

    styled = _run(any_engine, [(tiny.style_sd15, 0.8)])
    animate = AnimateRequest(prompt="x", seed=2, steps=2, num_frames=2,
                             motion_adapter=str(tiny.motion_adapter),
                             loras=[LoraRequest(ref=str(tiny.style_sd15), weight=0.6),
                                    LoraRequest(ref=str(tiny.motion_lora), weight=1.0)])
    first = any_engine.generate(animate).images
    np.testing.assert_allclose(_run(any_engine, [(tiny.style_sd15, 0.8)]), styled, atol=1e-6)
    plain = _run(any_engine)
    np.testing.assert_allclose(any_engine.generate(animate).images, first, atol=1e-6)
    np.testing.assert_array_equal(_run(any_engine), plain)


def test_weights_matter_and_zero_weight_is_not_a_reset(any_engine, tiny):
    plain = _run(any_engine)
    half = _run(any_engine, [(tiny.style_sd15, 0.5)])
    full = _run(any_engine, [(tiny.style_sd15, 1.0)])
    zero = _run(any_engine, [(tiny.style_sd15, 0.0)])
    assert np.abs(half - full).max() > 1e-4
    np.testing.assert_allclose(zero, plain, atol=1e-5)
    np.testing.assert_allclose(half, _run(any_engine, [(tiny.style_sd15, 0.5)]), atol=1e-6)


def test_lora_for_another_family_is_refused(sd15_engine, tiny):
    error = _refused(sd15_engine, tiny.style_sdxl_ldm)
    assert "another model family" in error.message


def test_unknown_keys_are_refused(sd15_engine, tmp_path):
    path = tmp_path / "odd.safetensors"
    save_file({"something.weight": torch.zeros(4, 4)}, str(path))
    error = _refused(sd15_engine, path)
    assert "odd.safetensors" in error.message


def test_misshaped_lora_is_refused(sd15_engine, tiny, tmp_path):
    tensors = load_file(str(tiny.style_sd15_peft))
    key = next(k for k in tensors if k.endswith("lora_A.weight"))
    tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 3)
    path = tmp_path / "misshaped.safetensors"
    save_file(tensors, str(path))
    error = _refused(sd15_engine, path)
    assert "shape" in error.message


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_values_are_refused(sd15_engine, tiny, tmp_path, bad):
    tensors = load_file(str(tiny.style_sd15))
    key = next(k for k in tensors if k.endswith("lora_up.weight"))
    tensors[key][0, 0] = bad
    path = tmp_path / "nan.safetensors"
    save_file(tensors, str(path))
    assert "NaN or Inf" in _refused(sd15_engine, path).message


def test_truncated_file_is_refused(sd15_engine, tiny, tmp_path):
    data = tiny.style_sd15.read_bytes()
    path = tmp_path / "truncated.safetensors"
    path.write_bytes(data[: len(data) // 2])
    assert "truncated" in _refused(sd15_engine, path).message


def test_pickle_and_missing_files_are_refused(sd15_engine, tmp_path):
    pickle = tmp_path / "evil.ckpt"
    pickle.write_bytes(b"not even opened")
    _refused(sd15_engine, pickle, UnsafeFormat)
    _refused(sd15_engine, tmp_path / "missing.safetensors", NotFound)


def test_lora_argument_parsing(tmp_path):
    assert parse_lora_arg("a/b:0.8").weight == 0.8
    assert parse_lora_arg("a/b").weight == 1.0
    assert parse_lora_arg("C:/x.safetensors").ref == "C:/x.safetensors"
    with pytest.raises(Exception) as info:
        parse_lora_arg("a/b:nan")
    assert "finite" in str(info.value)
    with pytest.raises(Exception):
        parse_lora_arg("a/b:99")


def test_style_lora_on_every_sd15_task(sd15_engine, tiny):
    """Pipelines without a LoRA loader of their own (SD1.5 T2I-Adapter) use the base's."""
    from fewstep.selftest import sample_image
    from fewstep.tasks import ControlNetRequest, T2IAdapterRequest

    for cls, extra in ((T2IAdapterRequest, {"adapter": str(tiny.adapter_sd15)}),
                       (ControlNetRequest, {"controlnet": str(tiny.controlnet)})):
        def run(loras):
            return sd15_engine.generate(cls(prompt="x", seed=3, control_image=sample_image(),
                                            loras=loras, **extra)).images
        plain = run([])
        styled = run([LoraRequest(ref=str(tiny.style_sd15), weight=1.0)])
        assert np.abs(plain - styled).max() > 1e-3
        np.testing.assert_array_equal(plain, run([]))


def test_hub_lora_repo_with_one_differently_named_file(monkeypatch, tiny):
    """A hub LoRA repo without pytorch_lora_weights.safetensors: its only .safetensors file is
    taken; with several, the error lists them. (The hub is simulated: no network in tests.)"""
    import huggingface_hub
    import httpx2
    from huggingface_hub.errors import RemoteEntryNotFoundError

    from fewstep import lora as lora_module

    repo_files = {"org/papercut": ["papercut.safetensors", "README.md"],
                  "org/many": ["a.safetensors", "b.safetensors"]}

    def download(repo, filename, local_files_only=False):
        if filename not in repo_files[repo]:
            raise RemoteEntryNotFoundError(filename, response=httpx2.Response(
                404, request=httpx2.Request("GET", "https://hub.invalid")))
        return str(tiny.style_sd15)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo: repo_files[repo])
    assert lora_module.resolve_lora_file("org/papercut") == tiny.style_sd15
    with pytest.raises(NotFound) as info:
        lora_module.resolve_lora_file("org/many")
    assert "a.safetensors, b.safetensors" in info.value.message


@pytest.mark.parametrize("which, weight", [("lcm_sd15", 1.0), ("style_sd15", 0.7),
                                           ("style_sd15_peft", -0.4)])
def test_baking_writes_what_diffusers_fuse_writes(tiny, which, weight):
    """The bake merges each layer into a new tensor (loaded weights are mapped from the file:
    writing into them is slow); the weights must be what diffusers' own fuse gives, for
    convolution and linear layers, text-encoder parts, any weight."""
    from diffusers import StableDiffusionPipeline

    from fewstep.lora import bake_lora, read_lora

    lora = read_lora(str(getattr(tiny, which)))
    ours = StableDiffusionPipeline.from_pretrained(str(tiny.sd15), safety_checker=None)
    theirs = StableDiffusionPipeline.from_pretrained(str(tiny.sd15), safety_checker=None)
    before = {k: v.clone() for k, v in ours.unet.state_dict().items()}
    bake_lora(ours, lora, weight)
    theirs.load_lora_weights(dict(lora.raw), adapter_name="x")
    theirs.fuse_lora(adapter_names=["x"], lora_scale=weight)
    theirs.unload_lora_weights()
    changed = 0
    for model in ("unet", "text_encoder"):
        mine, reference = getattr(ours, model).state_dict(), getattr(theirs, model).state_dict()
        assert mine.keys() == reference.keys(), model  # no adapter layer left behind
        for key, value in reference.items():
            torch.testing.assert_close(mine[key], value, rtol=0, atol=1e-6, msg=key)
            changed += model == "unet" and not torch.equal(before[key], mine[key])
    assert changed > 10  # the LoRA did change the weights


def _one_shot(tiny, request):
    """An engine built as a one-shot command builds it: for the calls it will run."""
    from fewstep.build import build_engine, inspect

    blueprint = inspect(model=str(tiny.sd15), lcm_lora=str(tiny.lcm_sd15), device="cpu",
                        openvino="off")
    return build_engine(blueprint, calls=[blueprint.plan(request)])


def _lcm_layers(engine):
    lora = engine.lora(engine.lcm_ref, "lcm_lora")
    return {key.split(".")[0].removeprefix("lora_unet_") for key in lora.raw}


def test_a_one_shot_call_merges_only_the_layers_that_pay(tiny, sd15_engine, monkeypatch):
    """A one-shot command's call does not bake the whole LCM-LoRA first: the layers where an
    adapter would cost more over the call's steps than a merge are merged, the rest run beside
    (as the recipe runs them). Same picture as a baked engine; the bake a later call needs
    completes it without adding any layer twice, and no adapter is left switched on."""
    import fewstep.engine

    # the tiny model's layers all pay (the test below checks the choice on real sizes): here
    # the down blocks are merged and the rest run beside
    monkeypatch.setattr(fewstep.engine, "merge_pays",
                        lambda name, *args: name.startswith("down_blocks."))
    request = Txt2ImgRequest(prompt="a boat", seed=11, steps=4)
    engine = _one_shot(tiny, request)
    assert not engine.baked
    loaded = unet_fingerprint(engine.base.unet)
    image = engine.generate(request).images
    np.testing.assert_allclose(image, sd15_engine.generate(request).images, atol=1e-4)
    merged = engine._lcm_merged
    assert 0 < len(merged) < len(_lcm_layers(engine)), merged
    assert not engine.baked and not torch.equal(loaded, unet_fingerprint(engine.base.unet))
    np.testing.assert_allclose(engine.generate(request).images, image, atol=1e-6)
    # a LoRA stack bakes the rest, then the base model again: the LCM-LoRA once, not twice
    styled = Txt2ImgRequest(prompt="a boat", seed=11, steps=4,
                            loras=[LoraRequest(ref=str(tiny.style_sd15), weight=0.8)])
    np.testing.assert_allclose(engine.generate(styled).images,
                               sd15_engine.generate(styled).images, atol=1e-4)
    assert engine.baked
    np.testing.assert_allclose(engine.generate(request).images, image, atol=1e-4)


def test_merging_pays_where_an_adapter_sees_many_tokens():
    """The choice per layer: a layer at the latent's full resolution is merged (its adapter
    would run over every position at every step), a wide layer at the lowest resolution runs
    beside unless the call is long; cross-attention keys see the prompt's 77 tokens."""
    from types import SimpleNamespace

    from fewstep.lora import _unet_tokens, merge_pays

    def layer(size, rank=64):
        base = torch.nn.Linear(size, size, bias=False)
        return SimpleNamespace(get_base_layer=lambda: base,
                               lora_A={"a": torch.nn.Linear(size, rank, bias=False)})

    narrow, wide = layer(320), layer(1280)
    latent = (32, 32)  # SD1.5 at 256x256, four resolutions
    assert merge_pays("down_blocks.0.attentions.0.proj_in", narrow, "a", latent, 4, runs=4)
    assert not merge_pays("mid_block.attentions.0.proj_in", wide, "a", latent, 4, runs=4)
    assert merge_pays("mid_block.attentions.0.proj_in", wide, "a", latent, 4, runs=100)
    assert not merge_pays("down_blocks.0.attentions.0.proj_in", narrow, "a", latent, 4, runs=0)
    assert _unet_tokens("down_blocks.1.resnets.0.conv1", (64, 64), 4) == 32 * 32
    assert _unet_tokens("down_blocks.1.downsamplers.0.conv", (64, 64), 4) == 16 * 16
    assert _unet_tokens("up_blocks.1.upsamplers.0.conv", (64, 64), 4) == 32 * 32
    assert _unet_tokens("up_blocks.3.attentions.2.proj_out", (64, 48), 4) == 64 * 48
    assert _unet_tokens("mid_block.attentions.0.transformer_blocks.0.attn2.to_k",
                        (64, 64), 4) == 77
    assert _unet_tokens("down_blocks.2.resnets.1.time_emb_proj", (64, 64), 4) == 1
