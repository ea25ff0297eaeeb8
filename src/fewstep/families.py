"""The model families fewstep serves: SD1.5, SDXL and SSD-1B.

A family decides the default LCM-LoRA, the native image size and which diffusers pipeline class
runs each task. It is detected from the UNet config, so fine-tunes of any family work."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from .errors import ModelError

# Modules the published LCM-LoRAs adapt (and that a fused stack touches).
LCM_TARGET_SUFFIXES = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "conv_shortcut",
    "downsamplers.0.conv",
    "upsamplers.0.conv",
    "time_emb_proj",
)

TASKS = ("txt2img", "img2img", "inpaint", "controlnet", "t2i-adapter", "animate")


@dataclass(frozen=True)
class Family:
    name: str
    title: str
    default_model: str
    lcm_lora: str
    native_size: int
    sdxl_like: bool
    pipelines: Mapping[str, str]  # task -> diffusers pipeline class name

    def check_task(self, task: str) -> str:
        """The name of the diffusers pipeline class that runs `task` (nothing imported)."""
        name = self.pipelines.get(task)
        if name is None:
            raise ModelError(
                f"task {task!r} is not available for {self.title} models",
                field="task",
            )
        return name

    def pipeline_class(self, task: str):
        import diffusers

        return getattr(diffusers, self.check_task(task))


SD15 = Family(
    name="sd15",
    title="Stable Diffusion 1.5",
    default_model="stable-diffusion-v1-5/stable-diffusion-v1-5",
    lcm_lora="latent-consistency/lcm-lora-sdv1-5",
    native_size=512,
    sdxl_like=False,
    pipelines={
        "txt2img": "StableDiffusionPipeline",
        "img2img": "StableDiffusionImg2ImgPipeline",
        "inpaint": "StableDiffusionInpaintPipeline",
        "controlnet": "StableDiffusionControlNetPipeline",
        "t2i-adapter": "StableDiffusionAdapterPipeline",
        "animate": "AnimateDiffPipeline",
    },
)

_XL_PIPELINES = {
    "txt2img": "StableDiffusionXLPipeline",
    "img2img": "StableDiffusionXLImg2ImgPipeline",
    "inpaint": "StableDiffusionXLInpaintPipeline",
    "controlnet": "StableDiffusionXLControlNetPipeline",
    "t2i-adapter": "StableDiffusionXLAdapterPipeline",
    # AnimateDiff-SDXL exists but LCM-LoRA has no published recipe for it
}

SDXL = Family(
    name="sdxl",
    title="Stable Diffusion XL",
    default_model="stabilityai/stable-diffusion-xl-base-1.0",
    lcm_lora="latent-consistency/lcm-lora-sdxl",
    native_size=1024,
    sdxl_like=True,
    pipelines=_XL_PIPELINES,
)

SSD1B = Family(
    name="ssd-1b",
    title="SSD-1B",
    default_model="segmind/SSD-1B",
    lcm_lora="latent-consistency/lcm-lora-ssd-1b",
    native_size=1024,
    sdxl_like=True,
    pipelines=_XL_PIPELINES,
)

FAMILIES = {f.name: f for f in (SD15, SDXL, SSD1B)}
DEFAULT_FAMILY = SD15


def family_by_name(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ModelError(
            f"unknown family {name!r}; known: {', '.join(FAMILIES)}", field="family"
        ) from None


def detect_family(unet_config: Mapping[str, Any]) -> Family:
    """SDXL-like UNets condition on two text encoders plus size/crop ids (`text_time`);
    SSD-1B is the SDXL layout with unevenly pruned up-blocks, recorded in
    `reverse_transformer_layers_per_block`. Everything else with a 768-wide (or tiny) text
    conditioning is SD1.x."""
    if unet_config.get("addition_embed_type") == "text_time":
        if unet_config.get("reverse_transformer_layers_per_block"):
            return SSD1B
        return SDXL
    cross = unet_config.get("cross_attention_dim")
    if isinstance(cross, (list, tuple)):
        cross = cross[0]
    if cross == 1024 or unet_config.get("prediction_type") == "v_prediction":
        raise ModelError(
            "this looks like a Stable Diffusion 2.x model (1024-wide text conditioning); "
            "fewstep supports SD1.5, SDXL and SSD-1B",
            field="model",
        )
    return SD15
