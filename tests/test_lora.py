"""LoRA files: both key formats, refusals before the model is touched, and no leaks."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import unet_fingerprint
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


def test_stack_does_not_leak_between_requests(sd15_engine, tiny):
    plain = _run(sd15_engine)
    styled = _run(sd15_engine, [(tiny.style_sd15, 0.8)])
    both = _run(sd15_engine, [(tiny.style_sd15, 0.8), (tiny.style_sd15_peft, 1.0)])
    plain_again = _run(sd15_engine)
    styled_again = _run(sd15_engine, [(tiny.style_sd15, 0.8)])
    assert np.abs(plain - styled).max() > 1e-3, "the style LoRA had no effect"
    assert np.abs(styled - both).max() > 1e-3
    np.testing.assert_array_equal(plain, plain_again)
    np.testing.assert_array_equal(styled, styled_again)


def test_weights_matter_and_zero_weight_is_not_a_reset(sd15_engine, tiny):
    plain = _run(sd15_engine)
    half = _run(sd15_engine, [(tiny.style_sd15, 0.5)])
    full = _run(sd15_engine, [(tiny.style_sd15, 1.0)])
    zero = _run(sd15_engine, [(tiny.style_sd15, 0.0)])
    assert np.abs(half - full).max() > 1e-4
    np.testing.assert_allclose(zero, plain, atol=1e-5)
    np.testing.assert_array_equal(half, _run(sd15_engine, [(tiny.style_sd15, 0.5)]))


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
