"""SDXL and SSD-1B single-file checkpoints through fewstep: family from the keys, the same
weights and pixels as the diffusers folder they were written from, parity with the recipe, and
the CLI's offline `--config` path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from fewstep.cli import main
from fewstep.build import build_engine
from fewstep.loading import single_file_family
from fewstep.selftest import PARITY_TOLERANCE, Case, run_case
from fewstep.tasks import Txt2ImgRequest

PROMPT = "a red lighthouse on a cliff"
# family -> TinyModels attribute names: single file, the folder it was written from, LCM-LoRA
MODELS = {
    "sd15": ("sd15_single_file", "sd15", "lcm_sd15"),
    "sdxl": ("sdxl_single_file", "sdxl", "lcm_sdxl"),
    "ssd-1b": ("ssd1b_single_file", "ssd1b", "lcm_ssd1b"),
}
SDXL_LIKE = ["sdxl", "ssd-1b"]
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def _paths(tiny, family):
    return tuple(getattr(tiny, name) for name in MODELS[family])


@pytest.fixture(scope="module")
def engines():
    return {}  # shared with selftest.run_case: (model, lcm weight) -> Engine


def _engine(engines, model, lcm, config=None):
    key = (str(model), 1.0)
    if key not in engines:
        engines[key] = build_engine(model=str(model), lcm_lora=str(lcm),
                                    model_config_dir=config and str(config),
                                    device="cpu", dtype="fp32")
    return engines[key]


@pytest.mark.parametrize("family", list(MODELS))
def test_family_from_the_keys(tiny, family):
    single, _, _ = _paths(tiny, family)
    assert single_file_family(single) == family


# The published UNet architectures (diffusers configs of stabilityai/stable-diffusion-xl-base-1.0
# and segmind/SSD-1B), built without memory on the meta device for their key names only.
SDXL_UNET = dict(
    sample_size=128, layers_per_block=2, block_out_channels=(320, 640, 1280),
    attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, cross_attention_dim=2048)
SSD1B_UNET = dict(SDXL_UNET, transformer_layers_per_block=(1, 2, 4),
                  reverse_transformer_layers_per_block=[[4, 4, 10], [2, 1, 1], [1, 1, 1]],
                  mid_block_type="UNetMidBlock2D")


@pytest.mark.parametrize("family,config", [("sdxl", SDXL_UNET), ("ssd-1b", SSD1B_UNET)])
def test_family_from_the_keys_of_full_size_checkpoints(tmp_path, family, config):
    from diffusers import UNet2DConditionModel

    from fewstep.testing_checkpoint import unet_to_ldm

    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    # the real key names, each with a one-element tensor: only the keys are read
    keys = [f"model.diffusion_model.{k}" for k in unet_to_ldm(unet)]
    keys.append("conditioner.embedders.1.model.positional_embedding")
    path = tmp_path / f"{family}.safetensors"
    save_file({k: torch.zeros(1) for k in keys}, str(path))
    assert single_file_family(path) == family


@pytest.mark.parametrize("family", SDXL_LIKE)
def test_single_file_engine_equals_the_folder_engine(tiny, engines, family):
    single, folder, lcm = _paths(tiny, family)
    from_file = _engine(engines, single, lcm, config=folder)
    from_folder = _engine(engines, folder, lcm)
    assert from_file.family.name == from_folder.family.name == family

    # every weight as in the folder (a wrongly converted key would differ or be missing)
    for name in COMPONENTS:
        want = getattr(from_folder.base, name).state_dict()
        got = getattr(from_file.base, name).state_dict()
        assert set(got) == set(want), name
        different = [k for k in want if not torch.equal(want[k], got[k])]
        assert different == [], (name, different[:5])

    request = Txt2ImgRequest(prompt=PROMPT, seed=11, steps=1)
    a = from_file.generate(request).images
    b = from_folder.generate(request).images
    assert a.shape == b.shape == (1, 64, 64, 3)
    assert float(np.abs(a - b).max()) <= PARITY_TOLERANCE
    assert float(a.std()) > 0.01  # a picture, not a flat field


@pytest.mark.parametrize("family", SDXL_LIKE)
def test_single_file_matches_the_reference_recipe(tiny, engines, family):
    single, folder, lcm = MODELS[family]
    case = Case("txt2img single-file", family=family, model=lambda m: getattr(m, single),
                lcm=lambda m: getattr(m, lcm), config=lambda m: getattr(m, folder),
                request=lambda m: Txt2ImgRequest(prompt=PROMPT, seed=7, steps=1))
    row = run_case(case, tiny, engines)
    assert row["max_diff"] <= PARITY_TOLERANCE, row
    assert row["ok"]


def _cli(tiny, family, out, *extra):
    single, _, lcm = _paths(tiny, family)
    return main(["txt2img", PROMPT, "--model", str(single), "--lcm-lora", str(lcm),
                 "--device", "cpu", "--dtype", "fp32", "--quiet", "--steps", "1",
                 "--seed", "5", "--out", str(out), *extra])


def test_cli_single_file_with_config(tiny, engines, tmp_path):
    _, folder, lcm = _paths(tiny, "sdxl")
    out = tmp_path / "lighthouse.png"
    assert _cli(tiny, "sdxl", out, "--config", str(folder)) == 0
    image = np.asarray(Image.open(out).convert("RGB")).astype(int)

    expected = _engine(engines, folder, lcm).generate(
        Txt2ImgRequest(prompt=PROMPT, seed=5, steps=1)).pil_images()[0]
    assert np.abs(image - np.asarray(expected).astype(int)).max() <= 1  # 8-bit rounding


def test_cli_single_file_offline_without_config(tiny, tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    # an empty hub cache: the family's default configs are not there to fall back on
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    out = tmp_path / "out"
    out.mkdir()
    capsys.readouterr()

    assert _cli(tiny, "sdxl", out / "x.png") == 3
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err
    assert err.startswith("error (config):") and "--config" in err, err
    assert "sdxl" in err
    assert list(out.iterdir()) == []
