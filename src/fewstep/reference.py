"""The reference recipe, written as the LCM-LoRA guide writes it, with stock diffusers.

Parity tests, `fewstep selftest` and the benchmark compare fewstep against these functions on
the same weights and seed. Nothing here is used by fewstep itself."""

from __future__ import annotations

from typing import Any

import torch


def recipe_pipeline(task: str, model: str, lcm_lora: str | None, *, lcm_weight: float = 1.0,
                    loras: list[tuple[str, float]] = (), component: str | None = None,
                    torch_dtype=torch.float32, device: str = "cpu", sdxl: bool = False):
    """Steps 1-3 of the recipe: load the task pipeline, swap in LCMScheduler, load the LoRAs
    (LCM as "lcm", the others by position) and set their weights with `set_adapters`."""
    import diffusers
    from diffusers import (AnimateDiffPipeline, AutoPipelineForImage2Image,
                           AutoPipelineForInpainting, AutoPipelineForText2Image, LCMScheduler)

    common: dict[str, Any] = {"torch_dtype": torch_dtype}
    if not sdxl:
        common["safety_checker"] = None
    if task == "txt2img":
        pipe = AutoPipelineForText2Image.from_pretrained(model, **common)
    elif task == "img2img":
        pipe = AutoPipelineForImage2Image.from_pretrained(model, **common)
    elif task == "inpaint":
        pipe = AutoPipelineForInpainting.from_pretrained(model, **common)
    elif task == "controlnet":
        cn = diffusers.ControlNetModel.from_pretrained(component, torch_dtype=torch_dtype)
        cls = diffusers.StableDiffusionXLControlNetPipeline if sdxl else \
            diffusers.StableDiffusionControlNetPipeline
        pipe = cls.from_pretrained(model, controlnet=cn, **common)
    elif task == "t2i-adapter":
        adapter = diffusers.T2IAdapter.from_pretrained(component, torch_dtype=torch_dtype)
        cls = diffusers.StableDiffusionXLAdapterPipeline if sdxl else \
            diffusers.StableDiffusionAdapterPipeline
        pipe = cls.from_pretrained(model, adapter=adapter, **common)
    elif task == "animate":
        motion = diffusers.MotionAdapter.from_pretrained(component, torch_dtype=torch_dtype)
        pipe = AnimateDiffPipeline.from_pretrained(model, motion_adapter=motion, **common)
    else:
        raise ValueError(task)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    loader = pipe
    if not hasattr(pipe, "load_lora_weights"):
        # SD1.5's T2I-Adapter pipeline has no LoRA loader (the guide uses SDXL's): load the
        # LoRAs through a text-to-image pipeline that shares its modules
        loader = diffusers.StableDiffusionPipeline.from_pipe(pipe)
    names, weights = [], []
    if lcm_lora is not None:
        loader.load_lora_weights(lcm_lora, adapter_name="lcm")
        names.append("lcm")
        weights.append(lcm_weight)
    for i, (path, weight) in enumerate(loras):
        loader.load_lora_weights(path, adapter_name=f"style{i}")
        names.append(f"style{i}")
        weights.append(weight)
    if names:
        loader.set_adapters(names, adapter_weights=weights)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def recipe_call(pipe, prompt: str, seed: int, **kwargs):
    """Step 5: call with a seeded generator; float images in 0..1."""
    out = pipe(prompt=prompt, generator=torch.manual_seed(seed), output_type="np", **kwargs)
    return out.frames if hasattr(out, "frames") else out.images


def recipe_arguments(request, *, sdxl: bool = False, adapter_channels: int = 3) -> dict:
    """The pipeline arguments the guide would pass for a fewstep request."""
    from .control import canny

    kw: dict[str, Any] = dict(num_inference_steps=request.steps,
                              guidance_scale=request.guidance)
    if request.negative_prompt:
        kw["negative_prompt"] = request.negative_prompt
    if request.num_images != 1:
        key = "num_videos_per_prompt" if request.task == "animate" else "num_images_per_prompt"
        kw[key] = request.num_images
    if request.width and request.task in ("txt2img", "animate"):
        kw.update(width=request.width, height=request.height)
    if request.task == "img2img":
        kw.update(image=request.image, strength=request.strength)
    elif request.task == "inpaint":
        kw.update(image=request.image, mask_image=request.mask, strength=request.strength)
    elif request.task in ("controlnet", "t2i-adapter"):
        channels = adapter_channels if request.task == "t2i-adapter" else 3
        image = canny(request.control_image, request.canny_low, request.canny_high, channels) \
            if request.canny else request.control_image
        if request.task == "controlnet":
            kw.update(image=image, controlnet_conditioning_scale=request.conditioning_scale,
                      cross_attention_kwargs={"scale": 1})
        else:
            kw.update(image=image, adapter_conditioning_scale=request.conditioning_scale)
            if sdxl:
                kw["adapter_conditioning_factor"] = request.conditioning_factor
    elif request.task == "animate":
        kw.update(num_frames=request.num_frames, cross_attention_kwargs={"scale": 1})
    return kw
