"""The Engine owns the loaded model, its task pipelines and LoRA adapters, and runs requests.

Loading happens once: the base pipeline is read at construction, the family's LCM-LoRA is baked
into its weights, and each task's pipeline is derived from it with `from_pipe` on first use, so
all tasks share one set of weights. Requests run one at a time (a lock), each with its own LoRA
stack, seed, progress callback and cancellation flag."""

from __future__ import annotations

import inspect
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from . import __version__
from .config import Settings, pick_device, pick_dtype
from .errors import Cancelled, FewstepError, InvalidRequest, ModelError, OutOfMemory
from .families import Family, detect_family, family_by_name
from .loading import (
    load_component,
    load_pipeline,
    parse_ref,
    read_unet_config,
    single_file_family,
)
from .lora import (
    AdapterSlots,
    LoraFile,
    FusedStack,
    apply_stack,
    bake_lora,
    check_fits,
    check_weight,
    read_lora,
)

ProgressFn = Callable[[int, int], None]
PreviewFn = Callable[[int, Any], None]


@dataclass
class Result:
    """What a request produced. `images` is float32 in 0..1: (N, H, W, 3) for images,
    (N, F, H, W, 3) for animations."""

    task: str
    images: np.ndarray
    params: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def is_animation(self) -> bool:
        return self.images.ndim == 5

    def pil_images(self) -> list:
        from PIL import Image

        if self.is_animation:
            raise ValueError("an animation: use pil_frames()")
        return [Image.fromarray(to_uint8(img)) for img in self.images]

    def pil_frames(self, index: int = 0) -> list:
        from PIL import Image

        return [Image.fromarray(to_uint8(frame)) for frame in self.images[index]]


def to_uint8(image: np.ndarray) -> np.ndarray:
    return (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8)


class Engine:
    """One model (any SD1.5, SDXL or SSD-1B checkpoint) with its LCM-LoRA, ready to run requests.

    >>> engine = Engine("Lykon/dreamshaper-7")
    >>> result = engine.generate(Txt2ImgRequest(prompt="a lighthouse at dusk", seed=42))
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        lcm_lora: str | None = "auto",
        lcm_weight: float = 1.0,
        animate_lcm_weight: float = 0.55,
        config: str | None = None,
        family: str | None = None,
        settings: Settings | None = None,
        device: str | None = None,
        dtype: str | None = None,
        fuse_loras: bool = True,
        speed: str = "default",
        tiny_vae: str | None = None,
    ):
        from diffusers import LCMScheduler

        self.settings = settings or Settings.from_env()
        self.device = pick_device(device or self.settings.device)
        self.dtype = pick_dtype(dtype or self.settings.dtype, self.device)
        lcm_weight = check_weight(lcm_weight, "lcm_lora")
        animate_lcm_weight = check_weight(animate_lcm_weight, "animate_lcm_weight")
        from .accel import PRESETS

        if speed != "off" and speed not in PRESETS:  # checked before anything is loaded
            raise InvalidRequest(f"speed must be off, {', '.join(PRESETS)}; got {speed!r}",
                                 field="speed")

        config_ref = parse_ref(config, "config") if config else None
        chosen = family_by_name(family) if family else None
        model_text = model or (chosen.default_model if chosen else None)
        if model_text is None:
            from .families import DEFAULT_FAMILY

            model_text = DEFAULT_FAMILY.default_model
        ref = parse_ref(model_text, "model")
        unet_config = read_unet_config(ref, config_ref)
        if chosen is None:
            if unet_config:
                chosen = detect_family(unet_config)
            else:
                chosen = family_by_name(single_file_family(ref.path))
        self.family: Family = chosen
        self.model_ref = model_text

        inpaint_only = unet_config.get("in_channels") == 9
        cls = chosen.pipeline_class("inpaint" if inpaint_only else "txt2img")
        base = load_pipeline(cls, ref, config_ref=config_ref, family=chosen,
                             torch_dtype=self.dtype)
        self.inpaint_only = base.unet.config.in_channels == 9
        base.scheduler = LCMScheduler.from_config(base.scheduler.config)
        base.set_progress_bar_config(disable=True)
        base.to(self.device)

        self.lcm_ref: str | None = None
        self.lcm_weight = lcm_weight
        self.animate_lcm_weight = animate_lcm_weight  # the recipe's weight for AnimateDiff
        if lcm_lora and lcm_lora != "none":
            self.lcm_ref = chosen.lcm_lora if lcm_lora == "auto" else lcm_lora
            lcm = read_lora(self.lcm_ref, "lcm_lora")
            check_fits(lcm, base, base.unet)
            bake_lora(base, lcm, lcm_weight)

        self.base = base
        self._pipes: dict[tuple, Any] = {("inpaint" if self.inpaint_only else "txt2img", None): base}
        self._components: dict[tuple, Any] = {}
        self._loras: dict[str, LoraFile] = {}
        self._slots: dict[int, AdapterSlots] = {}
        # fused: a request's LoRA stack is written into the weights (plain speed, nothing to
        # recompile when only weights change); unfused: peft adapters computed beside each layer
        self._fused = FusedStack() if fuse_loras else None
        self.original_vae = base.vae
        self.pipeline_hooks: list[Callable[[Any], None]] = []  # run on each derived pipeline
        self.speed = speed
        if speed != "off":
            from .accel import FastPath

            extra = {"tiny_vae": tiny_vae} if tiny_vae else {}
            self.fast_report = FastPath.preset(speed, self.device, chosen.name, **extra).apply(self)
        self._lock = threading.RLock()

    # -- resources -------------------------------------------------------------------------

    @property
    def native_size(self) -> int:
        return self.base.unet.config.sample_size * self.base.vae_scale_factor

    def component(self, cls, ref_text: str, field: str):
        key = (cls.__name__, ref_text)
        if key not in self._components:
            module = load_component(cls, parse_ref(ref_text, field), torch_dtype=self.dtype,
                                    field=field)
            self._components[key] = module.to(self.device)
        return self._components[key]

    def pipeline(self, task: str, **components):
        """The pipeline for `task`, built from the base with `from_pipe` (shared weights)."""
        key = (task, tuple(sorted((k, v) for k, v in components.items())) or None)
        if key in self._pipes:
            return self._pipes[key]
        if self.inpaint_only and task != "inpaint":
            raise ModelError(
                f"{self.model_ref!r} is an inpainting model (9-channel UNet): it runs the inpaint "
                f"task only, not {task!r}", field="model")
        cls = self.family.pipeline_class(task)
        extra = {}
        from diffusers import ControlNetModel, MotionAdapter, T2IAdapter

        kinds = {"controlnet": ControlNetModel, "adapter": T2IAdapter,
                 "motion_adapter": MotionAdapter}
        for name, ref_text in components.items():
            extra[name] = self.component(kinds[name], ref_text, name)
        if task == "animate":
            # the motion UNet is a copy of the base UNet's weights, which must be free of
            # adapter layers when it is made
            self.clear_adapters()
        try:
            # the original VAE: from_pipe drops one whose class differs from the pipeline's
            # type hint (a tiny VAE set by the fast path); the hooks set it again
            pipe = cls.from_pipe(self.base, **{"vae": self.original_vae, **extra})
        except Exception as exc:  # noqa: BLE001 - components that do not fit the model
            raise ModelError(
                f"{', '.join(components.values()) or task} does not fit {self.model_ref!r}: "
                f"{type(exc).__name__}: {str(exc)[:300]}",
                field=next(iter(components), "model")) from exc
        pipe.set_progress_bar_config(disable=True)
        if task == "animate":
            pipe.to(self.device, self.dtype)
            if self.lcm_ref is not None and self.animate_lcm_weight != self.lcm_weight:
                # the motion UNet is its own copy: move its LCM-LoRA to the animation weight
                bake_lora(pipe, read_lora(self.lcm_ref, "lcm_lora"),
                          self.animate_lcm_weight - self.lcm_weight)
        for hook in self.pipeline_hooks:
            hook(pipe)
        self._pipes[key] = pipe
        return pipe

    def pipelines(self) -> list:
        """The pipelines made so far (the base first)."""
        return list(self._pipes.values())

    def _loader_for(self, pipe):
        """The pipeline whose LoRA loader serves `pipe`'s modules: the base for every task
        that shares its UNet (some task pipelines, like SD1.5's T2I-Adapter, have no loader)."""
        return self.base if pipe.unet is self.base.unet else pipe

    def _slots_for(self, pipe) -> AdapterSlots:
        key = id(pipe.unet)
        if key not in self._slots:
            tag = "base" if pipe.unet is self.base.unet else f"u{len(self._slots)}"
            self._slots[key] = AdapterSlots(tag=tag, fused=self._fused)
        return self._slots[key]

    def clear_adapters(self) -> None:
        """Remove every adapter layer from every model; the weights are the originals again.
        Adapters are loaded again when a request asks for them."""
        if self._fused is not None:
            self._fused.reset()
        loaders = {id(p.unet): self._loader_for(p) for p in self._pipes.values()}
        for key, loader in loaders.items():
            slots = self._slots.get(key)
            if slots is not None and slots.loaded:
                loader.unload_lora_weights()
                slots.loaded.clear()

    def lora(self, ref_text: str, field: str = "lora") -> LoraFile:
        if ref_text not in self._loras:
            self._loras[ref_text] = read_lora(ref_text, field)
        return self._loras[ref_text]

    # -- running ---------------------------------------------------------------------------

    def generate(self, request, progress: ProgressFn | None = None,
                 cancel: threading.Event | None = None,
                 preview: PreviewFn | None = None) -> Result:
        """Validate and run one request. Raises a FewstepError subclass on bad input.

        `progress(step, total)` is called after each step, `preview(step, image)` too with a
        small approximate image of the current latents, and a set `cancel` event stops the
        request after the current step (`Cancelled`)."""
        request.check_limits(self.settings)
        request = request.with_seed()
        with self._lock:
            if cancel is not None and cancel.is_set():
                raise Cancelled("cancelled before it started")
            start = time.perf_counter()
            if preview is not None:
                progress = _PreviewingProgress(progress, preview, self.family.name)
            result = request.run(self, progress, cancel)
            result.seconds = time.perf_counter() - start
        return result

    def call(self, pipe, request, kwargs: dict[str, Any], progress: ProgressFn | None,
             cancel: threading.Event | None, batch_arg: str = "num_images_per_prompt") -> Result:
        """Run `pipe` for `request` with the task's extra `kwargs`. Used by the task modules."""
        loader = self._loader_for(pipe)
        stack = []
        for i, spec in enumerate(request.loras):
            lora = self.lora(spec.ref, f"loras.{i}")
            check_fits(lora, loader, pipe.unet)  # every LoRA checked before any is applied
            stack.append((lora, spec.weight))
        apply_stack(loader, self._slots_for(pipe), stack)

        def on_step(step: int, latents) -> None:
            if cancel is not None and cancel.is_set():
                raise Cancelled(f"cancelled after step {step + 1}")
            if progress is not None:
                total = len(pipe.scheduler.timesteps)
                if isinstance(progress, _PreviewingProgress):
                    progress(step + 1, total, latents)
                else:
                    progress(step + 1, total)

        if "callback_on_step_end" in inspect.signature(pipe.__call__).parameters:
            def on_step_end(p, step, timestep, tensors):
                on_step(step, tensors.get("latents"))
                return tensors

            kwargs = {**kwargs, "callback_on_step_end": on_step_end}
        else:  # older pipelines (SD1.5 T2I-Adapter) only have the per-step callback
            kwargs = {**kwargs, "callback": lambda step, t, latents: on_step(step, latents),
                      "callback_steps": 1}

        # a CPU generator: the same seed gives the same noise on every device, as in the recipe
        generator = torch.Generator("cpu").manual_seed(request.seed)
        try:
            with torch.inference_mode():
                output = pipe(
                    prompt=request.prompt,
                    negative_prompt=request.negative_prompt,
                    num_inference_steps=request.steps,
                    guidance_scale=request.guidance,
                    generator=generator,
                    output_type="np",
                    **{batch_arg: request.num_images},
                    **kwargs,
                )
        except torch.OutOfMemoryError as exc:
            self.release_memory()
            raise OutOfMemory("out of memory on the device; try a smaller size or batch") from exc
        except FewstepError:
            raise
        except ValueError as exc:  # diffusers' own input checks
            raise InvalidRequest(str(exc)[:500]) from exc
        images = output.frames if hasattr(output, "frames") else output.images
        images = np.asarray(images, dtype=np.float32)
        params = self.describe(request)
        params.update(width=int(images.shape[-2]), height=int(images.shape[-3]))
        return Result(
            task=request.task,
            images=images,
            params=params,
            warnings=request.warnings(),
        )

    def describe(self, request) -> dict[str, Any]:
        """Everything needed to reproduce a result."""
        return {
            "request": request.record(),
            "model": self.model_ref,
            "family": self.family.name,
            "lcm_lora": self.lcm_ref,
            "lcm_weight": self.animate_lcm_weight if request.task == "animate"
            else self.lcm_weight,
            "scheduler": "LCMScheduler",
            "dtype": str(self.dtype).removeprefix("torch."),
            "fewstep": __version__,
        }

    def release_memory(self) -> None:
        import gc

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class _PreviewingProgress:
    """A progress callback that also hands a latent preview to `preview`."""

    def __init__(self, progress, preview, family: str):
        self.progress, self.preview, self.family = progress, preview, family

    def __call__(self, step: int, total: int, latents=None) -> None:
        if self.progress is not None:
            self.progress(step, total)
        if latents is not None:
            from .previews import latent_preview

            self.preview(step, latent_preview(latents, self.family))
