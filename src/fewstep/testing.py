"""Tiny random-weight models of every supported family, saved in the real on-disk formats.

Everything here is built offline from configs (`torch.manual_seed(0)` before each component, as
diffusers' own `get_dummy_components()` does), so tests, `fewstep selftest` and the benchmark's
smoke run exercise the real loading code without any download:

* diffusers folders for SD1.5, SDXL and SSD-1B shaped models and a 9-channel inpainting model,
* a ControlNet, T2I-Adapters for SD1.5 and SDXL, a motion adapter,
* LCM-LoRAs in the published key format (kohya-style keys with diffusers module names, one rank
  on every target module, `.alpha` tensors), a kohya style LoRA with original-model (LDM) module
  names and text-encoder parts, a peft-format style LoRA, a motion LoRA,
* single-file (original layout) checkpoints of the SD1.5, SDXL and SSD-1B models.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from .families import LCM_TARGET_SUFFIXES

# --------------------------------------------------------------------------------------------
# components

TINY_TEXT = dict(
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=1,
    hidden_size=32,
    intermediate_size=37,
    layer_norm_eps=1e-05,
    num_attention_heads=4,
    num_hidden_layers=2,
    vocab_size=1000,
    hidden_act="gelu",
    projection_dim=32,
    max_position_embeddings=77,
)

_BLOCKS = (32, 64)
# The SDXL family's second text encoder is wider than the first, as OpenCLIP bigG (1280) is wider
# than CLIP-L (768): diffusers' single-file loader tells the two apart by width alone.
TEXT_2_WIDTH = 48


def _bytes_to_unicode() -> dict[int, str]:
    # the byte -> printable character table of GPT-2 / CLIP byte-level BPE
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def write_tokenizer(folder: Path) -> None:
    """A CLIP tokenizer written locally: byte-level vocabulary, no merges, 77 tokens."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in _bytes_to_unicode().values():
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    assert len(vocab) <= TINY_TEXT["vocab_size"]
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "special_tokens_map.json").write_text(
        json.dumps(
            {
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
            }
        )
    )
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": 77,
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "do_lower_case": True,
            }
        )
    )


def _tokenizer(tmp: Path):
    from transformers import CLIPTokenizer

    write_tokenizer(tmp)
    return CLIPTokenizer.from_pretrained(str(tmp))


def _vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=list(_BLOCKS),
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        norm_num_groups=2,
        sample_size=64,
    )


def sd15_unet(in_channels: int = 4):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    # SD1.5 order: cross-attention blocks first, as in the real model
    return UNet2DConditionModel(
        block_out_channels=_BLOCKS,
        layers_per_block=2,
        sample_size=32,
        in_channels=in_channels,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=2,
    )


# what the SDXL-family UNet and ControlNet share: two text encoders (32 + 48 wide) and size/crop
# ids (`text_time`)
_SDXL_CONDITIONING = dict(
    attention_head_dim=(2, 4),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    transformer_layers_per_block=(1, 2),
    projection_class_embeddings_input_dim=80,  # 6 * 8 + text_encoder_2 projection (32)
    cross_attention_dim=32 + TEXT_2_WIDTH,
    norm_num_groups=2,
)


def sdxl_unet(ssd: bool = False, in_channels: int = 4):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    extra = {}
    if ssd:
        # SSD-1B keeps SDXL's layout but drops transformer layers unevenly in the up path,
        # which its config records in `reverse_transformer_layers_per_block`.
        extra["reverse_transformer_layers_per_block"] = [[2, 1, 1], [1, 1, 1]]
    return UNet2DConditionModel(
        block_out_channels=_BLOCKS,
        layers_per_block=2,
        sample_size=32,
        in_channels=in_channels,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        **_SDXL_CONDITIONING,
        **extra,
    )


def _text_encoder(projection: bool = False, hidden_size: int = TINY_TEXT["hidden_size"]):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    config = CLIPTextConfig(**{**TINY_TEXT, "hidden_size": hidden_size})
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _scheduler(sdxl: bool):
    from diffusers import EulerDiscreteScheduler, PNDMScheduler

    # a fine-tune ships its own scheduler config; fewstep swaps in LCMScheduler from it
    common = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    if sdxl:
        return EulerDiscreteScheduler(timestep_spacing="leading", steps_offset=1, **common)
    return PNDMScheduler(skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False, **common)


def build_sd15_pipeline(tmp: Path, in_channels: int = 4):
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline

    cls = StableDiffusionInpaintPipeline if in_channels == 9 else StableDiffusionPipeline
    return cls(
        unet=sd15_unet(in_channels),
        vae=_vae(),
        text_encoder=_text_encoder(),
        tokenizer=_tokenizer(tmp / "tokenizer-src"),
        scheduler=_scheduler(False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_sdxl_pipeline(tmp: Path, ssd: bool = False):
    from diffusers import StableDiffusionXLPipeline

    tok = _tokenizer(tmp / "tokenizer-src")
    return StableDiffusionXLPipeline(
        unet=sdxl_unet(ssd),
        vae=_vae(),
        text_encoder=_text_encoder(),
        text_encoder_2=_text_encoder(projection=True, hidden_size=TEXT_2_WIDTH),
        tokenizer=tok,
        tokenizer_2=tok,
        scheduler=_scheduler(True),
    )


def build_controlnet(sdxl: bool = False):
    from diffusers import ControlNetModel

    torch.manual_seed(0)
    if sdxl:
        return ControlNetModel(
            block_out_channels=_BLOCKS,
            layers_per_block=2,
            in_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            conditioning_embedding_out_channels=(16, 32),
            **_SDXL_CONDITIONING,
        )
    return ControlNetModel(
        block_out_channels=_BLOCKS,
        layers_per_block=2,
        in_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=2,
        # the conditioning embedding must downscale like the tiny VAE (x2)
        conditioning_embedding_out_channels=(16, 32),
    )


def build_t2i_adapter(sdxl: bool):
    from diffusers import T2IAdapter

    torch.manual_seed(0)
    if sdxl:
        return T2IAdapter(
            in_channels=3,
            channels=list(_BLOCKS),
            num_res_blocks=2,
            downscale_factor=4,
            adapter_type="full_adapter_xl",
        )
    return T2IAdapter(
        in_channels=3,
        channels=list(_BLOCKS),
        num_res_blocks=2,
        downscale_factor=2,
        adapter_type="full_adapter",
    )


def build_tiny_vae():
    """An AutoencoderTiny (taesd layout) that downscales like the tiny VAE (x2)."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    return AutoencoderTiny(encoder_block_out_channels=(16, 16),
                           decoder_block_out_channels=(16, 16),
                           num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1))


def build_motion_adapter():
    from diffusers import MotionAdapter

    torch.manual_seed(0)
    return MotionAdapter(
        block_out_channels=_BLOCKS,
        motion_layers_per_block=2,
        motion_norm_num_groups=2,
        motion_num_attention_heads=4,
    )


# --------------------------------------------------------------------------------------------
# LoRA files


def _lora_pair(out_f: int, in_f: int, rank: int, kernel: tuple[int, int] | None, gen):
    if kernel is None:
        down = torch.randn(rank, in_f, generator=gen) * 0.05
        up = torch.randn(out_f, rank, generator=gen) * 0.05
    else:
        down = torch.randn(rank, in_f, *kernel, generator=gen) * 0.05
        up = torch.randn(out_f, rank, 1, 1, generator=gen) * 0.05
    return down, up


def _targets(model: torch.nn.Module, suffixes: tuple[str, ...]):
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and name.endswith(suffixes):
            yield name, module


def _shape(module):
    if isinstance(module, torch.nn.Linear):
        return module.out_features, module.in_features, None
    return module.out_channels, module.in_channels, tuple(module.kernel_size)


def write_kohya_lora(
    path: Path,
    unet,
    *,
    rank: int,
    alpha: float,
    suffixes: tuple[str, ...],
    seed: int,
    text_encoder=None,
    rename=None,
) -> Path:
    """kohya-style keys: `lora_unet_<module with _>.lora_down.weight` / `.lora_up.weight` / `.alpha`.

    `rename` maps a diffusers module name to another naming (original LDM names)."""
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    parts = [("lora_unet", unet, suffixes)]
    if text_encoder is not None:
        parts.append(("lora_te", text_encoder, ("q_proj", "k_proj", "v_proj", "out_proj")))
    for prefix, model, sfx in parts:
        for name, module in _targets(model, sfx):
            out_f, in_f, kernel = _shape(module)
            down, up = _lora_pair(out_f, in_f, rank, kernel, gen)
            mod = rename(name) if (rename and prefix == "lora_unet") else name
            key = f"{prefix}_{mod.replace('.', '_')}"
            tensors[f"{key}.lora_down.weight"] = down
            tensors[f"{key}.lora_up.weight"] = up
            tensors[f"{key}.alpha"] = torch.tensor(float(alpha))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


def write_peft_lora(path: Path, unet, *, rank: int, suffixes: tuple[str, ...], seed: int,
                    prefix: str = "unet") -> Path:
    """diffusers/peft keys: `unet.<module>.lora_A.weight` / `.lora_B.weight`."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in _targets(unet, suffixes):
        out_f, in_f, kernel = _shape(module)
        down, up = _lora_pair(out_f, in_f, rank, kernel, gen)
        tensors[f"{prefix}.{name}.lora_A.weight"] = down
        tensors[f"{prefix}.{name}.lora_B.weight"] = up
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


def ldm_unet_name(name: str, layers_per_block: int = 2) -> str:
    """diffusers UNet module name -> original (LDM/SGM) name, as kohya's sd-scripts writes for
    SDXL (`input_blocks_4_1_proj_in`). Covers the attention/resnet modules of the tiny models."""
    m = re.match(r"down_blocks\.(\d+)\.(attentions|resnets)\.(\d+)\.(.*)", name)
    if m:
        block, kind, idx, rest = int(m[1]), m[2], int(m[3]), m[4]
        n = 1 + block * (layers_per_block + 1) + idx
        return f"input_blocks.{n}.{1 if kind == 'attentions' else 0}.{rest}"
    m = re.match(r"up_blocks\.(\d+)\.(attentions|resnets)\.(\d+)\.(.*)", name)
    if m:
        block, kind, idx, rest = int(m[1]), m[2], int(m[3]), m[4]
        n = block * (layers_per_block + 1) + idx
        return f"output_blocks.{n}.{1 if kind == 'attentions' else 0}.{rest}"
    m = re.match(r"mid_block\.attentions\.0\.(.*)", name)
    if m:
        return f"middle_block.1.{m[1]}"
    return name


# --------------------------------------------------------------------------------------------
# the whole set


@dataclass
class TinyModels:
    root: Path
    sd15: Path
    sd15_inpaint: Path
    sdxl: Path
    ssd1b: Path
    sd15_single_file: Path
    sdxl_single_file: Path  # each written from the diffusers folder above
    ssd1b_single_file: Path
    controlnet: Path
    controlnet_sdxl: Path
    adapter_sd15: Path
    adapter_sdxl: Path
    motion_adapter: Path
    tiny_vae: Path
    lcm_sd15: Path
    lcm_sdxl: Path
    lcm_ssd1b: Path
    style_sd15: Path  # kohya keys, diffusers module names, with text-encoder parts
    style_sd15_peft: Path  # peft keys
    style_sdxl_ldm: Path  # kohya keys, original (LDM) module names, as sd-scripts writes them
    motion_lora: Path


STYLE_SUFFIXES = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out")
MOTION_SUFFIXES = ("to_q", "to_k", "to_v", "to_out.0")


def build_tiny_models(root: Path) -> TinyModels:
    """Write every tiny model into `root` (about 15 MB) and return their paths."""
    from .testing_checkpoint import save_sd15_single_file, save_sdxl_single_file

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / "_work"

    sd15 = build_sd15_pipeline(tmp)
    sd15.save_pretrained(root / "sd15")
    build_sd15_pipeline(tmp, in_channels=9).save_pretrained(root / "sd15-inpaint")
    sdxl = build_sdxl_pipeline(tmp)
    sdxl.save_pretrained(root / "sdxl")
    ssd = build_sdxl_pipeline(tmp, ssd=True)
    ssd.save_pretrained(root / "ssd-1b")
    save_sd15_single_file(sd15, root / "sd15-single.safetensors")
    save_sdxl_single_file(sdxl, root / "sdxl-single.safetensors")
    save_sdxl_single_file(ssd, root / "ssd-1b-single.safetensors")

    build_controlnet().save_pretrained(root / "controlnet")
    build_controlnet(sdxl=True).save_pretrained(root / "controlnet-sdxl")
    build_t2i_adapter(False).save_pretrained(root / "t2i-adapter-sd15")
    build_t2i_adapter(True).save_pretrained(root / "t2i-adapter-sdxl")
    motion = build_motion_adapter()
    motion.save_pretrained(root / "motion-adapter")
    build_tiny_vae().save_pretrained(root / "taesd")

    # the published LCM-LoRAs: rank 64, alpha 8 on every target; tiny: rank 8, alpha 1
    lcm = dict(rank=8, alpha=1.0, suffixes=LCM_TARGET_SUFFIXES)
    lcm_sd15 = write_kohya_lora(root / "lcm-lora-sd15" / "pytorch_lora_weights.safetensors",
                                sd15.unet, seed=1, **lcm)
    lcm_sdxl = write_kohya_lora(root / "lcm-lora-sdxl" / "pytorch_lora_weights.safetensors",
                                sdxl.unet, seed=2, **lcm)
    lcm_ssd = write_kohya_lora(root / "lcm-lora-ssd-1b" / "pytorch_lora_weights.safetensors",
                               ssd.unet, seed=3, **lcm)
    style = write_kohya_lora(root / "style-sd15.safetensors", sd15.unet, rank=4, alpha=2.0,
                             suffixes=STYLE_SUFFIXES, seed=4, text_encoder=sd15.text_encoder)
    style_peft = write_peft_lora(root / "style-sd15-peft.safetensors", sd15.unet, rank=4,
                                 suffixes=STYLE_SUFFIXES, seed=5)
    style_sdxl = write_kohya_lora(root / "style-sdxl-ldm.safetensors", sdxl.unet, rank=4,
                                  alpha=4.0, suffixes=STYLE_SUFFIXES, seed=6, rename=ldm_unet_name)

    from diffusers import UNetMotionModel

    motion_unet = UNetMotionModel.from_unet2d(sd15.unet, motion)
    motion_targets = [(n, m) for n, m in _targets(motion_unet, MOTION_SUFFIXES)
                      if ".motion_modules." in n]
    gen = torch.Generator().manual_seed(7)
    tensors = {}
    for name, module in motion_targets:
        out_f, in_f, kernel = _shape(module)
        down, up = _lora_pair(out_f, in_f, 4, kernel, gen)
        tensors[f"unet.{name}.lora_A.weight"] = down
        tensors[f"unet.{name}.lora_B.weight"] = up
    motion_lora = root / "motion-lora.safetensors"
    save_file(tensors, str(motion_lora))

    return TinyModels(
        root=root,
        sd15=root / "sd15",
        sd15_inpaint=root / "sd15-inpaint",
        sdxl=root / "sdxl",
        ssd1b=root / "ssd-1b",
        sd15_single_file=root / "sd15-single.safetensors",
        sdxl_single_file=root / "sdxl-single.safetensors",
        ssd1b_single_file=root / "ssd-1b-single.safetensors",
        controlnet=root / "controlnet",
        controlnet_sdxl=root / "controlnet-sdxl",
        adapter_sd15=root / "t2i-adapter-sd15",
        adapter_sdxl=root / "t2i-adapter-sdxl",
        motion_adapter=root / "motion-adapter",
        tiny_vae=root / "taesd",
        lcm_sd15=lcm_sd15,
        lcm_sdxl=lcm_sdxl,
        lcm_ssd1b=lcm_ssd,
        style_sd15=style,
        style_sd15_peft=style_peft,
        style_sdxl_ldm=style_sdxl,
        motion_lora=motion_lora,
    )
