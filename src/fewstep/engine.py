"""The Engine owns the loaded model, its task pipelines and LoRA adapters, and runs requests.

Loading happens once: the base pipeline is read at construction, the family's LCM-LoRA is baked
into its weights, and each task's pipeline is derived from it with `from_pipe` on first use, so
all tasks share one set of weights. Requests run one at a time (a lock), each with its own LoRA
stack, seed, progress callback and cancellation flag."""

from __future__ import annotations

import contextlib
import inspect
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from . import __version__
from .calls import ModelView, PipelineCall
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
from .prompts import PromptCache, encode_prompts

ProgressFn = Callable[[int, int], None]
PreviewFn = Callable[[int, Any], None]
# (pipe, calls, the pipeline's arguments) -> images as the pipeline gives them, or None
CallRunner = Callable[[Any, list[PipelineCall], dict[str, Any]], "np.ndarray | None"]


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
        speed: str = "auto",
        tiny_vae: str | None = None,
        fp16_vae: str | None = None,
        compile_shapes: tuple[tuple[int, int, int], ...] | None = None,
        compile_cache: str | None = None,
        cuda_graph_loop: bool = False,
        preload_loras: tuple[str, ...] | dict[str, str] = (),
        openvino: str | None = None,
    ):
        from diffusers import LCMScheduler

        self.settings = settings or Settings.from_env()
        self.device = pick_device(device or self.settings.device)
        self.dtype = pick_dtype(dtype or self.settings.dtype, self.device)
        lcm_weight = check_weight(lcm_weight, "lcm_lora")
        animate_lcm_weight = check_weight(animate_lcm_weight, "animate_lcm_weight")
        from .accel import PRESETS, half_dtype_for
        from .accel.openvino import choose as choose_openvino

        if speed not in PRESETS:  # checked before anything is loaded
            raise InvalidRequest(f"speed must be one of {', '.join(PRESETS)}; got {speed!r}",
                                 field="speed")
        openvino_precision, openvino_why = choose_openvino(
            openvino or self.settings.openvino, speed, self.device, half_dtype_for(self.device))

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
        elif unet_config:
            detected = detect_family(unet_config)
            # SDXL and SSD-1B share a layout (choosing one for the other picks its LCM-LoRA);
            # SD1.5 against either would fail deep inside the pipeline
            if detected.sdxl_like != chosen.sdxl_like:
                raise ModelError(f"family {chosen.name!r} does not fit {model_text!r}: its UNet "
                                 f"is {detected.name}", field="family")
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
        self._components_lock = threading.Lock()
        self._loras: dict[str, LoraFile] = {}
        self._slots: dict[int, AdapterSlots] = {}
        # fused: a request's LoRA stack is written into the weights (plain speed, nothing to
        # recompile when only weights change); unfused: peft adapters computed beside each layer
        self._fused = FusedStack() if fuse_loras else None
        self.original_vae = base.vae  # from_pipe needs the VAE of the pipeline's own class
        self._vae = base.vae
        self._hooks: list[Callable[[Any], None]] = []
        self._call_contexts_made: list[Callable[[], Any]] = []
        self._call_runners: list[CallRunner] = []
        self.prompt_cache: PromptCache | None = None
        # the LoRA stack of the pipeline call running now ((ref, weight), ...): () is the base
        # model, the weights a converted (OpenVINO) model holds
        self.current_loras: tuple = ()
        self._lock = threading.RLock()
        # LoRAs loaded now (checked, inactive) so a compiled UNet never sees its layers change
        named = preload_loras if isinstance(preload_loras, dict) else {
            f"preload_loras.{i}": ref for i, ref in enumerate(preload_loras)}
        for field_name, ref_text in named.items():  # {field named in errors: reference}
            self.preload_lora(ref_text, field_name)
        self.speed = speed
        from .accel import FastPath

        extra = {"tiny_vae": tiny_vae} if tiny_vae else {}
        if fp16_vae and self.dtype == torch.float16:
            extra["fp16_vae"] = fp16_vae  # an SDXL VAE that needs no float32 upcast
        if compile_shapes is not None:
            extra["compile_shapes"] = tuple(compile_shapes)
        if compile_cache is not None:
            extra["compile_cache_dir"] = compile_cache
        if cuda_graph_loop:  # opt-in: the whole text-to-image loop as CUDA graphs
            extra["cuda_graph_loop"] = True
        if openvino_precision:
            extra["openvino"] = openvino_precision
        self.fast_path = FastPath.preset(speed, self.device, chosen.name, **extra)
        self.fast_report = self.fast_path.apply(self)
        if not openvino_precision:  # why not, in the report ("off (package not installed)", ...)
            self.fast_report.applied["openvino"] = openvino_why

    # -- the seam for speed techniques (fewstep.accel uses these and nothing private) ----------

    def add_pipeline_hook(self, hook: Callable[[Any], None]) -> None:
        """Run `hook(pipe)` on every task pipeline: those made so far and those made later."""
        self._hooks.append(hook)
        for pipe in self.pipelines():
            hook(pipe)

    def add_call_context(self, make: Callable[[], Any]) -> Callable[[], None]:
        """Enter `make()` (a context manager) around every pipeline call. Returns a function
        that removes it again."""
        self._call_contexts_made.append(make)
        return lambda: self._call_contexts_made.remove(make)

    def add_call_runner(self, runner: "CallRunner") -> Callable[[], None]:
        """Offer every pipeline call to `runner(pipe, calls, arguments)` before the pipeline
        runs it: `calls` are the PipelineCalls merged into it, `arguments` exactly what the
        pipeline would get (embeddings, generator(s), steps, guidance, output_type="np", the
        step callback and the task's own arguments). The runner returns the images as the
        pipeline would (float32 NHWC in 0..1) or None to leave the call to the pipeline.
        Returns a function that removes it again."""
        self._call_runners.append(runner)
        return lambda: self._call_runners.remove(runner)

    @property
    def fuses_loras(self) -> bool:
        """Whether LoRA stacks are written in place into the same weight tensors (so a captured
        graph of the models stays valid when the stack changes)."""
        return self._fused is not None

    def convert_dtype(self, dtype) -> None:
        """Run every model in `dtype` from now on (components loaded later too)."""
        for pipe in self.pipelines():
            pipe.to(dtype=dtype)
        for module in self._components.values():
            module.to(dtype=dtype)
        if self._vae is not self.original_vae:
            self._vae.to(dtype=dtype)
        self.dtype = dtype

    def replace_vae(self, vae) -> None:
        """Decode (and encode) with `vae` in every pipeline, now and later."""
        self._vae = vae
        for pipe in self.pipelines():
            pipe.vae = vae

    def set_scheduler(self, scheduler) -> None:
        """Use `scheduler` (an LCM scheduler of the same config) in every pipeline."""
        for pipe in self.pipelines():
            pipe.scheduler = scheduler

    @contextlib.contextmanager
    def _call_contexts(self):
        with contextlib.ExitStack() as stack:
            for make in self._call_contexts_made:
                stack.enter_context(make())
            yield

    # -- resources -------------------------------------------------------------------------

    @property
    def native_size(self) -> int:
        return self.base.unet.config.sample_size * self.base.vae_scale_factor

    def component(self, cls, ref_text: str, field: str):
        """A ControlNet, T2I-Adapter or motion adapter, loaded once (thread-safe)."""
        key = (cls.__name__, ref_text)
        with self._components_lock:
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
            self.check_component(name, ref_text, name)
            extra[name] = self.component(kinds[name], ref_text, name)
        if task == "animate":
            # the motion UNet is a copy of the base UNet's weights, which must be free of
            # adapter layers when it is made
            self.clear_adapters()
        try:
            # the original VAE: from_pipe drops one whose class differs from the pipeline's
            # type hint (a tiny VAE set by the fast path); it is set again below
            pipe = cls.from_pipe(self.base, **{"vae": self.original_vae, **extra})
        except Exception as exc:  # noqa: BLE001 - components that do not fit the model
            raise ModelError(
                f"{', '.join(components.values()) or task} does not fit {self.model_ref!r}: "
                f"{type(exc).__name__}: {str(exc)[:300]}",
                field=next(iter(components), "model")) from exc
        pipe.set_progress_bar_config(disable=True)
        if pipe.vae is not self._vae:
            pipe.vae = self._vae
        if task == "animate":
            pipe.to(self.device, self.dtype)
            if self.lcm_ref is not None and self.animate_lcm_weight != self.lcm_weight:
                # the motion UNet is its own copy: move its LCM-LoRA to the animation weight
                bake_lora(pipe, read_lora(self.lcm_ref, "lcm_lora"),
                          self.animate_lcm_weight - self.lcm_weight)
        for hook in self._hooks:
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

    def preload_lora(self, ref_text: str, field: str = "lora") -> None:
        """Read, check and load a LoRA into the base model's adapters, inactive: the weights stay
        the originals until a request asks for it."""
        with self._lock:
            lora = self.lora(ref_text, field)
            check_fits(lora, self.base, self.base.unet)
            slots = self._slots_for(self.base)
            apply_stack(self.base, slots, [(lora, 1.0)])
            apply_stack(self.base, slots, [])

    def lora(self, ref_text: str, field: str = "lora") -> LoraFile:
        if ref_text not in self._loras:
            self._loras[ref_text] = read_lora(ref_text, field)
        return self._loras[ref_text]

    # -- planning ---------------------------------------------------------------------------

    @property
    def view(self) -> ModelView:
        """What tasks may know about this model when they describe their pipeline call."""
        return ModelView(family=self.family, native_size=self.native_size,
                         inpaint_only=self.inpaint_only, settings=self.settings,
                         adapter_geometry=self._adapter_geometry)

    def _adapter_geometry(self, ref_text: str) -> tuple[int, int]:
        from diffusers import T2IAdapter

        adapter = self.component(T2IAdapter, ref_text, "adapter")
        return int(adapter.total_downscale_factor), int(adapter.config.in_channels)

    def plan(self, request) -> PipelineCall:
        """Check `request` against the limits and this model, and describe its pipeline call.
        Raises a FewstepError subclass naming the field; runs no model."""
        request.check_limits(self.settings)
        request = request.with_seed()
        if self.inpaint_only and request.task != "inpaint":
            raise ModelError(
                f"{self.model_ref!r} is an inpainting model (9-channel UNet): it runs the inpaint "
                f"task only, not {request.task!r}", field="model")
        self.family.pipeline_class(request.task)  # a task the family has
        return request.describe(self.view)

    def validate(self, request) -> None:
        """Everything `generate` would refuse before running, without running: limits, sizes,
        strength, images, components that fit. Thread-safe and does not wait for a running
        request (the service calls it before queueing); components are loaded on first use."""
        self.plan(request)

    def check_component(self, kind: str, ref_text: str, field: str | None = None) -> None:
        """Load a ControlNet ("controlnet"), T2I-Adapter ("adapter") or motion adapter
        ("motion_adapter") and check that it fits this model; raises ModelError naming `field`."""
        from diffusers import ControlNetModel, MotionAdapter, T2IAdapter

        field = field or kind
        classes = {"controlnet": ControlNetModel, "adapter": T2IAdapter,
                   "motion_adapter": MotionAdapter}
        if kind not in classes:
            raise InvalidRequest(f"unknown component kind {kind!r}", field=field)
        task = {"controlnet": "controlnet", "adapter": "t2i-adapter",
                "motion_adapter": "animate"}[kind]
        if task not in self.family.pipelines:
            raise ModelError(f"{field} {ref_text!r}: {self.family.title} models have no "
                             f"{task} task", field=field)
        module = self.component(classes[kind], ref_text, field)
        problem = component_mismatch(kind, module.config, self.base.unet.config, self.family)
        if problem:
            raise ModelError(f"{field} {ref_text!r} does not fit {self.model_ref!r}: {problem}",
                             field=field)

    # -- running ---------------------------------------------------------------------------

    def generate(self, request, progress: ProgressFn | None = None,
                 cancel: threading.Event | None = None,
                 preview: PreviewFn | None = None) -> Result:
        """Validate and run one request. Raises a FewstepError subclass on bad input.

        `progress(step, total)` is called after each step, `preview(step, image)` too with a
        small approximate image of the current latents, and a set `cancel` event stops the
        request after the current step (`Cancelled`)."""
        with self._lock:
            call = self.plan(request)
            return self.run([Job(call, progress, cancel, preview)])[0]

    def run(self, jobs: list["Job"]) -> list[Result]:
        """Run pipeline calls, merged into one batched pipeline call when there are several
        (they must share `merge_key()`). Each call keeps its own prompt, seed, progress,
        preview and cancel flag; a batch stops early only when every call in it is cancelled,
        and a call cancelled meanwhile gets `Cancelled` instead of its result.

        Returns one Result per job, or raises (for every job) what the pipeline raised."""
        calls = [job.call for job in jobs]
        if len(calls) > 1:
            keys = {call.merge_key() for call in calls}
            if len(keys) != 1 or None in keys:
                raise ValueError("only calls with one equal merge_key() can run as a batch")
        with self._lock:
            if all(job.cancel is not None and job.cancel.is_set() for job in jobs):
                raise Cancelled("cancelled before it started")
            start = time.perf_counter()
            images = self._call_pipeline(jobs)
            seconds = time.perf_counter() - start
        results, offset = [], 0
        for call in calls:
            part = images[offset:offset + call.count]
            offset += call.count
            params = self.describe(call)
            params.update(width=int(part.shape[-2]), height=int(part.shape[-3]))
            results.append(Result(task=call.record.get("task", call.task), images=part,
                                  params=params, warnings=list(call.warnings),
                                  seconds=seconds))
        return results

    def _call_pipeline(self, jobs: list["Job"]) -> np.ndarray:
        first = jobs[0].call
        pipe = self.pipeline(first.task, **dict(first.components))
        loader = self._loader_for(pipe)
        stack = []
        for i, (ref, weight) in enumerate(first.loras):
            lora = self.lora(ref, f"loras.{i}")
            check_fits(lora, loader, pipe.unet)  # every LoRA checked before any is applied
            stack.append((lora, weight))
        apply_stack(loader, self._slots_for(pipe), stack)
        self.current_loras = tuple(first.loras)

        kwargs = dict(first.arguments)
        for name in first.batched:
            values = [job.call.arguments[name] for job in jobs]
            kwargs[name] = values if len(jobs) > 1 else values[0]
        kwargs.update(self._step_callback(pipe, jobs))
        try:
            with torch.inference_mode(), self._call_contexts():
                # one embedding per prompt: the pipeline repeats it for the call's images
                embeds = encode_prompts(pipe, [(j.call.prompt, j.call.negative_prompt)
                                               for j in jobs],
                                        first.guidance, self.prompt_cache, first.loras)
                # one CPU generator per request: the same seed gives the same noise on every
                # device and in every batch, as `torch.manual_seed` in the recipe
                generators = [torch.Generator("cpu").manual_seed(job.call.seed) for job in jobs]
                arguments = dict(
                    **embeds,
                    num_inference_steps=first.steps,
                    guidance_scale=first.guidance,
                    generator=generators if len(jobs) > 1 else generators[0],
                    output_type="np",
                    **{first.batch_arg: first.count},
                    **kwargs,
                )
                images = None
                for runner in self._call_runners:
                    images = runner(pipe, [job.call for job in jobs], arguments)
                    if images is not None:
                        break
                if images is None:
                    output = pipe(**arguments)
                    images = output.frames if first.output == "frames" else output.images
        except torch.OutOfMemoryError as exc:
            self.release_memory()
            raise OutOfMemory("out of memory on the device; try a smaller size or batch") from exc
        except FewstepError:
            raise
        except ValueError as exc:  # diffusers' own input checks
            raise InvalidRequest(str(exc)[:500]) from exc
        images = np.asarray(images, dtype=np.float32)
        for job in jobs:
            if len(jobs) > 1 and job.cancel is not None and job.cancel.is_set():
                job.cancelled = True
        return images

    def _step_callback(self, pipe, jobs: list["Job"]) -> dict:
        """The per-step callback: progress and previews for each job, and cancellation (of the
        whole call once every job in it is cancelled)."""

        def on_step(step: int, latents) -> None:
            total = len(pipe.scheduler.timesteps)
            offset = 0
            for job in jobs:  # `step` is 0-based: step + 1 steps are done
                if job.progress is not None:
                    job.progress(step + 1, total)
                if job.preview is not None and latents is not None:
                    from .previews import latent_preview

                    job.preview(step + 1, latent_preview(latents[offset:offset + 1],
                                                         self.family.name))
                offset += job.call.count
            if all(job.cancel is not None and job.cancel.is_set() for job in jobs):
                raise Cancelled(f"cancelled after step {step + 1} of {total}")

        if "callback_on_step_end" in inspect.signature(pipe.__call__).parameters:
            def on_step_end(p, step, timestep, tensors):
                on_step(step, tensors.get("latents"))
                return tensors

            return {"callback_on_step_end": on_step_end}
        # older pipelines (SD1.5 T2I-Adapter) only have the per-step callback
        return {"callback": lambda step, t, latents: on_step(step, latents),
                "callback_steps": 1}

    def describe(self, call: PipelineCall) -> dict[str, Any]:
        """Everything needed to reproduce a result."""
        return {
            "request": dict(call.record),
            "inputs": dict(call.inputs),  # digests: a reproduction checks it got the same images
            "speed": self.speed,
            "model": self.model_ref,
            "family": self.family.name,
            "lcm_lora": self.lcm_ref,
            "lcm_weight": self.animate_lcm_weight if call.task == "animate"
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


@dataclass
class Job:
    """One pipeline call to run, with what its requester follows it by."""

    call: PipelineCall
    progress: ProgressFn | None = None
    cancel: threading.Event | None = None
    preview: PreviewFn | None = None
    cancelled: bool = False  # set when cancelled while its batch ran on


def component_mismatch(kind: str, config, unet_config, family: Family) -> str | None:
    """Why a component does not fit a UNet, from their configs alone; None when it fits."""
    unet_blocks = tuple(unet_config.block_out_channels)
    if kind == "controlnet":
        cross = unet_config.cross_attention_dim
        if config.cross_attention_dim != cross:
            return (f"its text conditioning is {config.cross_attention_dim} wide, the model's "
                    f"{cross}; is it a ControlNet for another model family?")
        if tuple(config.block_out_channels) != unet_blocks:
            return (f"its blocks are {tuple(config.block_out_channels)}, the model's "
                    f"{unet_blocks}")
        if config.get("addition_embed_type") != unet_config.get("addition_embed_type"):
            return "it is a ControlNet for another model family"
    elif kind == "adapter":
        xl = config.adapter_type == "full_adapter_xl"
        if xl != family.sdxl_like:
            return f"it is a T2I-Adapter for {'SDXL' if xl else 'SD1.5'} models"
        if not set(config.channels) <= set(unet_blocks):
            return f"its channels {tuple(config.channels)} do not match the model's {unet_blocks}"
    elif kind == "motion_adapter":
        if tuple(config.block_out_channels) != unet_blocks:
            return (f"its blocks are {tuple(config.block_out_channels)}, the model's "
                    f"{unet_blocks}")
    return None
