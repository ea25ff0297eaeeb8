"""Cheap step previews: latents -> RGB with a fixed linear map (no VAE decode), a small image
per step for progress displays."""

from __future__ import annotations

import torch
from PIL import Image

# least-squares fits of latent channels to RGB, as used by common SD front-ends
_FACTORS = {
    "sd15": ([[0.3512, 0.2297, 0.3227], [0.3250, 0.4974, 0.2350],
              [-0.2829, 0.1762, 0.2721], [-0.2120, -0.2616, -0.7177]], [0.0, 0.0, 0.0]),
    "sdxl": ([[0.3651, 0.4232, 0.4341], [-0.2533, -0.0042, 0.1068],
              [0.1076, 0.1111, -0.0362], [-0.3165, -0.2492, -0.2188]], [0.1084, -0.0175, -0.0011]),
}


def latent_preview(latents: torch.Tensor, family: str) -> Image.Image:
    """The first image (first frame for animations) of a latent batch, as an RGB image at
    latent resolution."""
    factors, bias = _FACTORS["sd15" if family == "sd15" else "sdxl"]
    latent = latents[0].detach().float().cpu()
    if latent.ndim == 4:  # (C, F, h, w): AnimateDiff
        latent = latent[:, 0]
    rgb = torch.einsum("chw,cr->hwr", latent[:4], torch.tensor(factors)) + torch.tensor(bias)
    rgb = ((rgb + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8).numpy()
    return Image.fromarray(rgb)
