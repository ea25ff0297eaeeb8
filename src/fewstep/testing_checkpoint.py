"""Write a diffusers Stable Diffusion pipeline as one original-layout checkpoint.

The inverse of `from_single_file`, with the key names of the original repositories:

* SD 1.x (CompVis/LDM): UNet under `model.diffusion_model.`, VAE under `first_stage_model.`,
  CLIP text encoder under `cond_stage_model.transformer.` (as diffusers'
  `scripts/convert_diffusers_to_original_stable_diffusion.py` writes them);
* SDXL and SSD-1B (Stability's generative-models): the same UNet and VAE naming, the CLIP-L text
  encoder under `conditioner.embedders.0.transformer.` and the second (OpenCLIP) text encoder
  under `conditioner.embedders.1.model.` in OpenCLIP's own naming (`transformer.resblocks.N`,
  fused `in_proj` attention weights, a transposed `text_projection`), as
  `scripts/convert_diffusers_to_original_sdxl.py` writes them.

Block numbering is derived from the UNet and VAE configs, so tiny test models with fewer blocks
(and SSD-1B's uneven transformer depths) convert too.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."
SDXL_TEXT_PREFIX = "conditioner.embedders.0.transformer."
SDXL_TEXT_2_PREFIX = "conditioner.embedders.1.model."

# diffusers -> LDM, inside a UNet ResBlock
_UNET_RESNET = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
)

_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "class_embedding.linear_1": "label_emb.0.0",
    "class_embedding.linear_2": "label_emb.0.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}

_VAE_TOP = {
    "conv_in": "conv_in",
    "conv_out": "conv_out",
    "conv_norm_out": "norm_out",
}

_VAE_ATTN = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}


def _layers_per_block(config, n_blocks: int) -> list[int]:
    lpb = config["layers_per_block"]
    if isinstance(lpb, int):
        return [lpb] * n_blocks
    lpb = list(lpb)
    if len(lpb) != n_blocks:
        raise ValueError(f"layers_per_block {lpb} does not match {n_blocks} blocks")
    if len(set(lpb)) != 1:
        # the LDM numbering (and diffusers' loader) assumes the same count in every block
        raise ValueError(f"uneven layers_per_block {lpb} has no original-layout numbering")
    return lpb


def _unet_module_map(unet) -> dict[str, str]:
    """diffusers module prefix -> LDM module prefix, for every block of the UNet."""
    config = unet.config
    n = len(config["down_block_types"])
    layers = _layers_per_block(config, n)[0]
    per_block = layers + 1  # resnets (+ attentions) then one downsampler / upsampler slot
    mapping = dict(_UNET_TOP)

    for i in range(n):
        for j in range(layers):
            ldm = 1 + i * per_block + j
            mapping[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{ldm}.0"
            mapping[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{ldm}.1"
        if i < n - 1:
            mapping[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{(i + 1) * per_block}.0.op"

    mapping["mid_block.attentions.0"] = "middle_block.1"
    for j in range(2):
        mapping[f"mid_block.resnets.{j}"] = f"middle_block.{2 * j}"

    up_types = config["up_block_types"]
    for i in range(n):
        for j in range(per_block):
            ldm = i * per_block + j
            mapping[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{ldm}.0"
            mapping[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{ldm}.1"
        if i < n - 1:
            # the upsampler follows the last resnet (and its attention, when the block has one)
            slot = 2 if "CrossAttn" in up_types[i] else 1
            mapping[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{i * per_block + layers}.{slot}.conv"
    return mapping


def _convert(state: dict[str, torch.Tensor], modules: dict[str, str], rename_rest) -> dict[str, torch.Tensor]:
    # longest module prefix first, so "down_blocks.0.resnets.1" never matches "...resnets.10"
    ordered = sorted(modules.items(), key=lambda kv: -len(kv[0]))
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        for src, dst in ordered:
            if key.startswith(src + "."):
                rest = key[len(src) + 1:]
                new = f"{dst}.{rename_rest(src, rest)}"
                break
        else:
            raise ValueError(f"no original-layout name for {key!r}")
        if new in out:
            raise ValueError(f"two tensors map to {new!r}")
        out[new] = tensor
    return out


def _unet_rest(src: str, rest: str) -> str:
    if ".resnets." in src:
        for a, b in _UNET_RESNET:
            if rest.startswith(a + "."):
                return b + rest[len(a):]
    # attention (Transformer2DModel) internals keep their names in the LDM SpatialTransformer
    return rest


def unet_to_ldm(unet) -> dict[str, torch.Tensor]:
    """The UNet's state dict with original (LDM) key names, without the `model.diffusion_model.`
    prefix."""
    return _convert(unet.state_dict(), _unet_module_map(unet), _unet_rest)


def _vae_module_map(vae) -> dict[str, str]:
    config = vae.config
    n_down = len(config["down_block_types"])
    n_up = len(config["up_block_types"])
    mapping = {"quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv"}
    for part in ("encoder", "decoder"):
        for src, dst in _VAE_TOP.items():
            mapping[f"{part}.{src}"] = f"{part}.{dst}"
        mapping[f"{part}.mid_block.attentions.0"] = f"{part}.mid.attn_1"
        for j in range(2):
            mapping[f"{part}.mid_block.resnets.{j}"] = f"{part}.mid.block_{j + 1}"
    for i in range(n_down):
        for j in range(len(vae.encoder.down_blocks[i].resnets)):
            mapping[f"encoder.down_blocks.{i}.resnets.{j}"] = f"encoder.down.{i}.block.{j}"
        mapping[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = f"encoder.down.{i}.downsample.conv"
    for i in range(n_up):
        ldm = n_up - 1 - i  # the LDM decoder numbers its up blocks from the lowest resolution
        for j in range(len(vae.decoder.up_blocks[i].resnets)):
            mapping[f"decoder.up_blocks.{i}.resnets.{j}"] = f"decoder.up.{ldm}.block.{j}"
        mapping[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = f"decoder.up.{ldm}.upsample.conv"
    return mapping


def _vae_rest(src: str, rest: str) -> str:
    if ".resnets." in src:
        if rest.startswith("conv_shortcut."):
            return "nin_shortcut." + rest[len("conv_shortcut."):]
        return rest
    if src.endswith("attentions.0"):
        for a, b in _VAE_ATTN.items():
            if rest.startswith(a + "."):
                return b + rest[len(a):]
        raise ValueError(f"unknown VAE attention parameter {src}.{rest}")
    return rest


def vae_to_ldm(vae) -> dict[str, torch.Tensor]:
    """The VAE's state dict with original (LDM) key names, without the `first_stage_model.`
    prefix. Attention projections become 1x1 convolution weights, as LDM stores them."""
    out = _convert(vae.state_dict(), _vae_module_map(vae), _vae_rest)
    for key, tensor in list(out.items()):
        if ".mid.attn_1." in key and key.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")):
            if tensor.ndim == 2:
                out[key] = tensor.reshape(*tensor.shape, 1, 1)
    return out


def text_encoder_to_ldm(text_encoder) -> dict[str, torch.Tensor]:
    """HF CLIP names under `text_model.` (newer transformers flatten `CLIPTextModel`; the original
    checkpoints keep the `text_model.` level), without the `cond_stage_model.transformer.` prefix."""
    wrapped = hasattr(text_encoder, "text_model")
    out = {}
    for key, tensor in text_encoder.state_dict().items():
        if not wrapped and not key.startswith("text_model."):
            key = "text_model." + key
        out[key] = tensor
    return out


# diffusers (HF CLIP) -> OpenCLIP, inside one encoder layer
_OPEN_CLIP_LAYER = (
    ("self_attn.out_proj.", "attn.out_proj."),
    ("layer_norm1.", "ln_1."),
    ("layer_norm2.", "ln_2."),
    ("mlp.fc1.", "mlp.c_fc."),
    ("mlp.fc2.", "mlp.c_proj."),
)

# torch.nn.MultiheadAttention stacks query, key and value in one `in_proj` weight, in this order
_IN_PROJ_ORDER = ("q_proj", "k_proj", "v_proj")

_OPEN_CLIP_TOP = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}


def open_clip_to_ldm(text_encoder) -> dict[str, torch.Tensor]:
    """A `CLIPTextModelWithProjection` in OpenCLIP's naming, without the
    `conditioner.embedders.1.model.` prefix: the query, key and value projections fused into one
    `in_proj` weight and bias per layer, the projection stored transposed, plus the
    `logit_scale` that full OpenCLIP checkpoints carry (the loader ignores it)."""
    state = {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        if key == "text_projection.weight":
            out["text_projection"] = tensor.T
        elif key in _OPEN_CLIP_TOP:
            out[_OPEN_CLIP_TOP[key]] = tensor
        elif key.startswith("encoder.layers."):
            layer, rest = key[len("encoder.layers."):].split(".", 1)
            block = f"transformer.resblocks.{layer}."
            if rest.startswith(("self_attn.q_proj.", "self_attn.k_proj.", "self_attn.v_proj.")):
                part, kind = rest.split(".")[1:]  # q_proj, weight
                fused.setdefault(f"{block}attn.in_proj_{kind}", {})[part] = tensor
                continue
            for a, b in _OPEN_CLIP_LAYER:
                if rest.startswith(a):
                    out[block + b + rest[len(a):]] = tensor
                    break
            else:
                raise ValueError(f"no OpenCLIP name for text encoder parameter {key!r}")
        else:
            raise ValueError(f"no OpenCLIP name for text encoder parameter {key!r}")
    for key, parts in fused.items():
        out[key] = torch.cat([parts[name] for name in _IN_PROJ_ORDER], 0)
    out["logit_scale"] = torch.tensor(4.6052)  # ln(100), OpenCLIP's trained value
    return out


def _position_ids(text_encoder) -> torch.Tensor:
    # a buffer that transformers no longer saves but original checkpoints carry
    positions = text_encoder.config.max_position_embeddings
    return torch.arange(positions, dtype=torch.int64)[None]


def save_sd15_single_file(pipe, path: Path) -> Path:
    """Write `pipe` (a diffusers StableDiffusionPipeline) as one original-layout `.safetensors`
    checkpoint at `path`, atomically, and return the path."""
    return _write(path, (
        (UNET_PREFIX, unet_to_ldm(pipe.unet)),
        (VAE_PREFIX, vae_to_ldm(pipe.vae)),
        (TEXT_PREFIX, text_encoder_to_ldm(pipe.text_encoder)),
    ))


def save_sdxl_single_file(pipe, path: Path) -> Path:
    """Write `pipe` (a diffusers StableDiffusionXLPipeline: SDXL or SSD-1B) as one original-layout
    `.safetensors` checkpoint at `path`, atomically, and return the path."""
    clip_l = text_encoder_to_ldm(pipe.text_encoder)
    clip_l["text_model.embeddings.position_ids"] = _position_ids(pipe.text_encoder)
    return _write(path, (
        (UNET_PREFIX, unet_to_ldm(pipe.unet)),
        (VAE_PREFIX, vae_to_ldm(pipe.vae)),
        (SDXL_TEXT_PREFIX, clip_l),
        (SDXL_TEXT_2_PREFIX, open_clip_to_ldm(pipe.text_encoder_2)),
    ))


def _write(path: Path, parts) -> Path:
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    for prefix, part in parts:
        for key, tensor in part.items():
            # safetensors needs contiguous tensors that share no storage
            tensors[prefix + key] = tensor.detach().to("cpu").contiguous().clone()

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": "pt"})
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
