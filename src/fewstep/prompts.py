"""Prompt embeddings, computed by the engine rather than inside each pipeline call: one prompt at a
time (so a batch of requests gets exactly the embeddings each would get alone), optionally from a
cache, and handed to the pipeline as `prompt_embeds` & co."""

from __future__ import annotations

from collections import OrderedDict
from typing import Hashable

import torch

SD_OUTPUTS = ("prompt_embeds", "negative_prompt_embeds")
SDXL_OUTPUTS = SD_OUTPUTS + ("pooled_prompt_embeds", "negative_pooled_prompt_embeds")


class PromptCache:
    """Embeddings by key, least recently used dropped first. Values are stored and returned as
    clones, so no caller can change a cached tensor."""

    def __init__(self, size: int = 64):
        self.size = size
        self._data: OrderedDict = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable):
        if key not in self._data:
            self.misses += 1
            return None
        self._data.move_to_end(key)
        self.hits += 1
        return _clone(self._data[key])

    def put(self, key: Hashable, value) -> None:
        self._data[key] = _clone(value)
        while len(self._data) > self.size:
            self._data.popitem(last=False)

    def clear(self) -> None:
        self._data.clear()


def _clone(value):
    return tuple(v.clone() if isinstance(v, torch.Tensor) else v for v in value)


def wants_guidance(pipe, guidance: float) -> bool:
    """diffusers' own rule: classifier-free guidance (a doubled batch) only above 1, and never
    for guidance-distilled UNets."""
    return guidance > 1 and getattr(pipe.unet.config, "time_cond_proj_dim", None) is None


def encode_prompts(pipe, pairs: list[tuple[str, str | None]], guidance: float,
                   cache: PromptCache | None = None, state: Hashable = ()) -> dict:
    """`prompt_embeds` & co. for a batch of (prompt, negative prompt) pairs, one image each.
    `state` must change whenever the text encoders' weights do (the LoRA stack)."""
    cfg = wants_guidance(pipe, guidance)
    xl = getattr(pipe, "text_encoder_2", None) is not None or \
        getattr(pipe, "tokenizer_2", None) is not None
    names = SDXL_OUTPUTS if xl else SD_OUTPUTS
    encoders = tuple(id(m) for m in (getattr(pipe, "text_encoder", None),
                                     getattr(pipe, "text_encoder_2", None)))
    parts = []
    for prompt, negative in pairs:
        key = (encoders, prompt, negative, cfg, state)
        value = cache.get(key) if cache is not None else None
        if value is None:
            value = tuple(pipe.encode_prompt(
                prompt=prompt, negative_prompt=negative, device=pipe._execution_device,
                num_images_per_prompt=1, do_classifier_free_guidance=cfg))
            if cache is not None:
                cache.put(key, value)
        parts.append(value)
    out = {}
    for i, name in enumerate(names):
        column = [p[i] for p in parts]
        out[name] = None if column[0] is None else torch.cat(column)
    return out
