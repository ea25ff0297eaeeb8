"""The models the benchmark runs: the real SD1.5, SDXL and SSD-1B architectures built from their
configs with random weights (speed does not depend on weight values; nothing is downloaded), and
their LCM-LoRA of the published shape (kohya keys, rank 64, alpha 8 on the published target
modules), saved in the real formats so every mode loads through its real loading code. The tiny
test models stand in for a smoke run."""

from __future__ import annotations

import gc
import json
import shutil
from pathlib import Path

LCM_RANK, LCM_ALPHA = 64, 8.0

# -- the real architectures ------------------------------------------------------------------

CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
              num_hidden_layers=12, projection_dim=768, hidden_act="quick_gelu")
CLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20,
                 num_hidden_layers=32, projection_dim=1280, hidden_act="gelu")
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
                 attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280), attention_head_dim=(5, 10, 20),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816, cross_attention_dim=2048)
# SSD-1B: SDXL with transformer layers pruned (down 2/4, up 4-4-10 / 2-1-1) and no attention in
# the mid block; this gives its published sizes (UNet 1.33B, LCM-LoRA 105M parameters)
SSD1B_UNET = dict(SDXL_UNET, transformer_layers_per_block=(1, 2, 4),
                  reverse_transformer_layers_per_block=[[4, 4, 10], [2, 1, 1], [1, 1, 1]],
                  mid_block_type="UNetMidBlock2D")
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
              block_out_channels=(128, 256, 512, 512),
              down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4)


def _text_encoder(config: dict, projection: bool):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    # token ids of fewstep.testing.write_tokenizer's vocabulary; the real vocabulary size
    cfg = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, bos_token_id=0,
                         eos_token_id=1, pad_token_id=1, **config)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


def build_real(family: str, folder: Path, dtype,
               device: str = "cpu") -> tuple[Path, Path, Path]:
    """Write the family's real-size pipeline (random weights), its LCM-LoRA and a tiny VAE
    of the real taesd/taesdxl config into `folder`; return (model, lcm_lora, tiny_vae) paths.
    On CUDA the random weights are drawn on the GPU (seconds instead of minutes for SDXL)."""
    import torch
    from diffusers import (AutoencoderKL, AutoencoderTiny, StableDiffusionPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTokenizer

    from ..families import LCM_TARGET_SUFFIXES
    from ..testing import _scheduler, write_tokenizer, write_kohya_lora

    model, lora, taesd = folder / "model", folder / "lcm-lora", folder / "taesd"
    marker = folder / "complete.json"
    if marker.is_file() and json.loads(marker.read_text()) == {"family": family,
                                                               "dtype": str(dtype)}:
        return model, lora, taesd
    shutil.rmtree(folder, ignore_errors=True)
    write_tokenizer(folder / "tokenizer-src")
    tokenizer = CLIPTokenizer.from_pretrained(str(folder / "tokenizer-src"))
    sdxl = family != "sd15"
    unet_cfg = {"sd15": SD15_UNET, "sdxl": SDXL_UNET, "ssd-1b": SSD1B_UNET}[family]
    with torch.device(device if device.startswith("cuda") else "cpu"):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**unet_cfg)
        torch.manual_seed(0)
        vae = AutoencoderKL(**SD_VAE, sample_size=1024 if sdxl else 512,
                            scaling_factor=0.13025 if sdxl else 0.18215, force_upcast=sdxl)
        encoders = [_text_encoder(CLIP_L, False)] + \
            ([_text_encoder(CLIP_BIGG, True)] if sdxl else [])
    if sdxl:
        pipe = StableDiffusionXLPipeline(
            unet=unet, vae=vae, text_encoder=encoders[0], text_encoder_2=encoders[1],
            tokenizer=tokenizer, tokenizer_2=tokenizer, scheduler=_scheduler(True))
    else:
        pipe = StableDiffusionPipeline(
            unet=unet, vae=vae, text_encoder=encoders[0], tokenizer=tokenizer,
            scheduler=_scheduler(False), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)
    write_kohya_lora(lora / "pytorch_lora_weights.safetensors", unet, rank=LCM_RANK,
                     alpha=LCM_ALPHA, suffixes=LCM_TARGET_SUFFIXES, seed=1)
    pipe.to(dtype=dtype).save_pretrained(model)
    torch.manual_seed(0)
    AutoencoderTiny().save_pretrained(taesd)  # the published taesd / taesdxl config
    del pipe, unet, vae, encoders
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    marker.write_text(json.dumps({"family": family, "dtype": str(dtype)}))
    return model, lora, taesd


def build_tiny(folder: Path, family: str) -> tuple[Path, Path, Path]:
    import torch
    from diffusers import AutoencoderTiny

    from ..testing import build_tiny_models

    tiny = build_tiny_models(folder)
    taesd = folder / "taesd"
    torch.manual_seed(0)
    # the tiny models' VAE scales by 2: two blocks
    AutoencoderTiny(encoder_block_out_channels=(16, 16), decoder_block_out_channels=(16, 16),
                    num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1)).save_pretrained(taesd)
    model, lora = {"sd15": (tiny.sd15, tiny.lcm_sd15), "sdxl": (tiny.sdxl, tiny.lcm_sdxl),
                   "ssd-1b": (tiny.ssd1b, tiny.lcm_ssd1b)}[family]
    return model, lora, taesd


def build_style_loras(family: str, folder: Path, count: int = 2, rank: int = 16) -> list[Path]:
    """`count` kohya-format LoRAs of rank `rank` on the LCM-LoRA's target modules of the family's
    real UNet (random values), as a user's style LoRAs would be."""
    import torch
    from diffusers import UNet2DConditionModel

    from ..families import LCM_TARGET_SUFFIXES
    from ..testing import write_kohya_lora

    paths = [folder / f"style-{i}" / "pytorch_lora_weights.safetensors" for i in range(count)]
    if all(p.is_file() for p in paths):
        return paths
    with torch.device("meta"):  # only the module shapes are read
        unet = UNet2DConditionModel(**{"sd15": SD15_UNET, "sdxl": SDXL_UNET,
                                       "ssd-1b": SSD1B_UNET}[family])
    for i, path in enumerate(paths):
        write_kohya_lora(path, unet, rank=rank, alpha=rank / 2, suffixes=LCM_TARGET_SUFFIXES,
                         seed=10 + i)
    return paths
