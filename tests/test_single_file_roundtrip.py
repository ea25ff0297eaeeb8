"""A tiny SD1.5 pipeline written as an original-layout single file loads back unchanged."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fewstep import testing_checkpoint
from fewstep.testing import build_sd15_pipeline
from fewstep.testing_checkpoint import save_sd15_single_file

COMPONENTS = ("unet", "vae", "text_encoder")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd15")
    pipe = build_sd15_pipeline(root)
    folder = root / "sd15"
    pipe.save_pretrained(folder)
    # Keep only configs, tokenizer and scheduler in the folder: from_single_file falls back to
    # a component's weights in `config` when it does not recognise that component in the file
    # (the text encoder does), which would hide a bad conversion.
    for weights in [*folder.rglob("*.safetensors"), *folder.rglob("*.bin")]:
        weights.unlink()
    return pipe, folder


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _load(path: Path, folder: Path):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_single_file(
        str(path), config=str(folder), local_files_only=True, safety_checker=None
    )


def _mismatches(original, loaded) -> list[str]:
    problems = []
    for name in COMPONENTS:
        want = getattr(original, name).state_dict()
        got = getattr(loaded, name).state_dict()
        if set(want) != set(got):
            problems.append(f"{name}: keys differ: {sorted(set(want) ^ set(got))[:10]}")
        for key in sorted(set(want) & set(got)):
            a, b = want[key], got[key]
            if a.shape != b.shape or a.dtype != b.dtype or b.is_meta or not torch.equal(a, b):
                problems.append(f"{name}.{key}")
    return problems


def test_single_file_roundtrip(tiny, tmp_path, no_network):
    pipe, folder = tiny
    target = tmp_path / "out" / "sd15-single.safetensors"

    assert save_sd15_single_file(pipe, target) == target
    assert [p.name for p in target.parent.iterdir()] == [target.name]  # no temp file left

    tensors = load_file(str(target))
    prefixes = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.")
    assert all(k.startswith(prefixes) for k in tensors)
    n_params = sum(len(getattr(pipe, name).state_dict()) for name in COMPONENTS)
    assert len(tensors) == n_params
    # original naming, numbered from the tiny config (2 blocks, 2 layers per block)
    for key in (
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
    ):
        assert key in tensors, key
    channels = pipe.vae.config.block_out_channels[-1]
    for part in ("q", "k", "v", "proj_out"):
        shape = tensors[f"first_stage_model.decoder.mid.attn_1.{part}.weight"].shape
        assert tuple(shape) == (channels, channels, 1, 1)

    loaded = _load(target, folder)
    assert _mismatches(pipe, loaded) == []


def test_roundtrip_catches_a_wrong_mapping(tiny, tmp_path, monkeypatch, no_network):
    pipe, folder = tiny
    # swap the VAE attention query and key projections in the converter
    wrong = dict(testing_checkpoint._VAE_ATTN, to_q="k", to_k="q")
    monkeypatch.setattr(testing_checkpoint, "_VAE_ATTN", wrong)
    target = save_sd15_single_file(pipe, tmp_path / "wrong.safetensors")

    problems = _mismatches(pipe, _load(target, folder))
    assert "vae.encoder.mid_block.attentions.0.to_q.weight" in problems
    assert "vae.decoder.mid_block.attentions.0.to_k.weight" in problems
