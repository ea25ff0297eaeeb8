"""Preprocessors for ControlNet and T2I-Adapter conditioning images."""

from __future__ import annotations

import numpy as np
from PIL import Image


def canny(image: Image.Image, low: int = 100, high: int = 200, channels: int = 3) -> Image.Image:
    """Canny edges, exactly as the reference recipe computes them: a 3-channel image for
    ControlNets and 3-channel adapters, a grey one for 1-channel adapters (canny-sdxl)."""
    import cv2

    edges = cv2.Canny(np.array(image.convert("RGB")), low, high)
    if channels == 1:
        return Image.fromarray(edges)
    return Image.fromarray(np.concatenate([edges[:, :, None]] * 3, axis=2))
