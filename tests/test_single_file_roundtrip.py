"""Tiny SD1.5, SDXL and SSD-1B pipelines written as original-layout single files load back
unchanged through diffusers' `from_single_file`."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fewstep import testing_checkpoint
from fewstep.testing import TEXT_2_WIDTH, TINY_TEXT, build_sd15_pipeline, build_sdxl_pipeline
from fewstep.testing_checkpoint import save_sd15_single_file, save_sdxl_single_file

COMPONENTS = {"sd15": ("unet", "vae", "text_encoder"),
              "sdxl": ("unet", "vae", "text_encoder", "text_encoder_2")}
COMPONENTS["ssd-1b"] = COMPONENTS["sdxl"]


def _build(family: str, root: Path):
    if family == "sd15":
        return build_sd15_pipeline(root)
    return build_sdxl_pipeline(root, ssd=family == "ssd-1b")


def _save(family: str, pipe, path: Path) -> Path:
    save = save_sd15_single_file if family == "sd15" else save_sdxl_single_file
    return save(pipe, path)


@pytest.fixture(scope="module", params=["sd15", "sdxl", "ssd-1b"])
def tiny(request, tmp_path_factory):
    family = request.param
    root = tmp_path_factory.mktemp(family)
    pipe = _build(family, root)
    folder = root / family
    pipe.save_pretrained(folder)
    # Keep only configs, tokenizers and scheduler in the folder: from_single_file falls back to
    # a component's weights in `config` when it does not recognise that component in the file,
    # which would hide a bad conversion.
    for weights in [*folder.rglob("*.safetensors"), *folder.rglob("*.bin")]:
        weights.unlink()
    return family, pipe, folder


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _load(family: str, path: Path, folder: Path):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if family == "sd15":
        return StableDiffusionPipeline.from_single_file(
            str(path), config=str(folder), local_files_only=True, safety_checker=None
        )
    return StableDiffusionXLPipeline.from_single_file(
        str(path), config=str(folder), local_files_only=True
    )


def _mismatches(family: str, original, loaded) -> list[str]:
    problems = []
    for name in COMPONENTS[family]:
        want = getattr(original, name).state_dict()
        got = getattr(loaded, name).state_dict()
        if set(want) != set(got):
            problems.append(f"{name}: keys differ: {sorted(set(want) ^ set(got))[:10]}")
        for key in sorted(set(want) & set(got)):
            a, b = want[key], got[key]
            if a.shape != b.shape or a.dtype != b.dtype or b.is_meta or not torch.equal(a, b):
                problems.append(f"{name}.{key}")
    return problems


# original naming, numbered from the tiny configs (2 blocks, 2 layers per block)
SD15_KEYS = (
    "model.diffusion_model.time_embed.0.weight",
    "model.diffusion_model.input_blocks.1.1.proj_in.weight",
    "model.diffusion_model.input_blocks.3.0.op.weight",
    "model.diffusion_model.middle_block.2.out_layers.3.weight",
    "model.diffusion_model.output_blocks.2.1.conv.weight",
    "model.diffusion_model.output_blocks.5.1.transformer_blocks.0.attn2.to_k.weight",
    "model.diffusion_model.out.2.weight",
    "first_stage_model.encoder.down.0.downsample.conv.weight",
    "first_stage_model.decoder.up.1.upsample.conv.weight",
    "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight",
    "first_stage_model.encoder.mid.block_2.conv1.weight",
    "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight",
    "cond_stage_model.transformer.text_model.final_layer_norm.weight",
)
# SDXL order: plain blocks first, attention in the lower resolution; the up path's first block
# has attention, so its upsampler is the third module of output block 2
SDXL_KEYS = (
    "model.diffusion_model.label_emb.0.0.weight",
    "model.diffusion_model.label_emb.0.2.bias",
    "model.diffusion_model.input_blocks.3.0.op.weight",
    "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight",
    "model.diffusion_model.middle_block.1.transformer_blocks.1.ff.net.2.weight",
    "model.diffusion_model.output_blocks.2.2.conv.weight",
    "model.diffusion_model.output_blocks.0.1.transformer_blocks.1.attn1.to_q.weight",
    "model.diffusion_model.output_blocks.5.0.skip_connection.weight",
    "first_stage_model.decoder.mid.attn_1.proj_out.weight",
    "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight",
    "conditioner.embedders.0.transformer.text_model.embeddings.position_ids",
    "conditioner.embedders.0.transformer.text_model.encoder.layers.1.self_attn.q_proj.weight",
    "conditioner.embedders.1.model.token_embedding.weight",
    "conditioner.embedders.1.model.transformer.resblocks.1.ln_2.bias",
    "conditioner.embedders.1.model.transformer.resblocks.0.mlp.c_proj.weight",
    "conditioner.embedders.1.model.ln_final.weight",
    "conditioner.embedders.1.model.logit_scale",
)


def test_single_file_roundtrip(tiny, tmp_path, no_network):
    family, pipe, folder = tiny
    target = tmp_path / "out" / f"{family}-single.safetensors"

    assert _save(family, pipe, target) == target
    assert [p.name for p in target.parent.iterdir()] == [target.name]  # no temp file left

    tensors = load_file(str(target))
    if family == "sd15":
        prefixes = ("model.diffusion_model.", "first_stage_model.",
                    "cond_stage_model.transformer.")
        extras = 0
        expected = SD15_KEYS
    else:
        prefixes = ("model.diffusion_model.", "first_stage_model.",
                    "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model.")
        # position_ids and logit_scale added; q, k and v fused into one in_proj per layer
        extras = 2 - 2 * 2 * TINY_TEXT["num_hidden_layers"]
        expected = SDXL_KEYS
    assert all(k.startswith(prefixes) for k in tensors)
    n_params = sum(len(getattr(pipe, name).state_dict()) for name in COMPONENTS[family])
    assert len(tensors) == n_params + extras
    for key in expected:
        assert key in tensors, key
    channels = pipe.vae.config.block_out_channels[-1]
    for part in ("q", "k", "v", "proj_out"):
        shape = tensors[f"first_stage_model.decoder.mid.attn_1.{part}.weight"].shape
        assert tuple(shape) == (channels, channels, 1, 1)
    if family != "sd15":
        open_clip = "conditioner.embedders.1.model."
        width, projection = TEXT_2_WIDTH, TINY_TEXT["projection_dim"]
        assert tensors[open_clip + "positional_embedding"].shape == (77, width)
        assert tensors[open_clip + "text_projection"].shape == (width, projection)
        fused = tensors[open_clip + "transformer.resblocks.0.attn.in_proj_weight"]
        assert fused.shape == (3 * width, width)
        layer = pipe.text_encoder_2.text_model.encoder.layers[0].self_attn
        assert torch.equal(fused[width:2 * width], layer.k_proj.weight.detach())

    loaded = _load(family, target, folder)
    assert _mismatches(family, pipe, loaded) == []


def test_roundtrip_catches_a_wrong_vae_mapping(tiny, tmp_path, monkeypatch, no_network):
    family, pipe, folder = tiny
    # swap the VAE attention query and key projections in the converter
    wrong = dict(testing_checkpoint._VAE_ATTN, to_q="k", to_k="q")
    monkeypatch.setattr(testing_checkpoint, "_VAE_ATTN", wrong)
    target = _save(family, pipe, tmp_path / "wrong.safetensors")

    problems = _mismatches(family, pipe, _load(family, target, folder))
    assert "vae.encoder.mid_block.attentions.0.to_q.weight" in problems
    assert "vae.decoder.mid_block.attentions.0.to_k.weight" in problems


@pytest.mark.parametrize("tiny", ["sdxl"], indirect=True)
def test_roundtrip_catches_a_wrong_open_clip_mapping(tiny, tmp_path, monkeypatch, no_network):
    family, pipe, folder = tiny
    # fuse key, query, value instead of query, key, value into the OpenCLIP in_proj
    monkeypatch.setattr(testing_checkpoint, "_IN_PROJ_ORDER", ("k_proj", "q_proj", "v_proj"))
    target = _save(family, pipe, tmp_path / "wrong.safetensors")

    problems = _mismatches(family, pipe, _load(family, target, folder))
    assert "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.weight" in problems
    assert "text_encoder_2.text_model.encoder.layers.1.self_attn.k_proj.weight" in problems
    assert "text_encoder_2.text_model.encoder.layers.0.self_attn.v_proj.weight" not in problems
    assert not [p for p in problems if not p.startswith("text_encoder_2.")]

