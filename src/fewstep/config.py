"""One Settings object: limits, device, paths. Values come from arguments or FEWSTEP_* variables."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields


@dataclass(frozen=True)
class Settings:
    max_pixels: int = 2048 * 2048  # width x height of one image
    max_steps: int = 50
    max_num_images: int = 16
    max_frames: int = 64
    max_prompt_chars: int = 4000  # the text encoders read 77 tokens; this bounds the work before
    max_loras: int = 8  # per request, LCM-LoRA not counted
    max_input_pixels: int = 4096 * 4096  # decoded input images (decompression-bomb guard)
    device: str = "auto"
    dtype: str = "auto"

    @classmethod
    def from_env(cls, **overrides) -> "Settings":
        values = {}
        for f in fields(cls):
            env = os.environ.get(f"FEWSTEP_{f.name.upper()}")
            if env is not None:
                values[f.name] = type(getattr(cls, f.name))(env) if f.type != "str" else env
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def pick_device(name: str = "auto") -> str:
    import torch

    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def pick_dtype(name: str, device: str):
    import torch

    table = {"fp16": torch.float16, "float16": torch.float16, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}
    if name == "auto":
        return torch.float16 if device.startswith(("cuda", "mps")) else torch.float32
    if name not in table:
        from .errors import InvalidRequest

        raise InvalidRequest(f"dtype must be one of auto, {', '.join(table)}; got {name!r}",
                             field="dtype")
    return table[name]
