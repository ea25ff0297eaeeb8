"""The Engine owns the loaded model, its task pipelines and LoRA adapters, and runs requests.

It runs parts that are already loaded: `fewstep.build.build_engine` reads the base pipeline,
bakes the family's LCM-LoRA into its weights and applies the speed techniques through the seam
below. Each task's pipeline is derived from the base with `from_pipe` on first use, so all tasks
share one set of weights. Requests run one at a time (a lock), each with its own LoRA stack,
seed, progress callback and cancellation flag."""

from __future__ import annotations

import contextlib
import inspect
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from .calls import ModelView, PipelineCall, plan_call
from .components import adapter_geometry, check_kind, kind_of, mismatch, read_config
from .config import Settings
from .errors import Cancelled, FewstepError, InvalidRequest, ModelError, OutOfMemory
from .families import Family
from .loading import load_component, parse_ref
from .lora import (
    MOTION_LAYERS,
    AdapterSlots,
    FusedStack,
    LoraFile,
    apply_stack,
    bake_lora,
    check_fits,
    lora_models,
    merge_pays,
    read_lora,
    run_beside,
    slot_name,
)
from .prompts import PromptCache, encode_prompts
from .records import Record
from .version import __version__

ProgressFn = Callable[[int, int], None]
PreviewFn = Callable[[int, Any], None]
# (pipe, calls, the pipeline's arguments) -> images as the pipeline gives them, or None
CallRunner = Callable[[Any, list[PipelineCall], dict[str, Any]], "np.ndarray | None"]


@dataclass
class Result:
    """What a request produced. `images` is float32 in 0..1: (N, H, W, 3) for images,
    (N, F, H, W, 3) for animations; `record` says how (what every output file carries)."""

    task: str
    images: np.ndarray
    record: Record
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


@dataclass
class LoadedModel:
    """What the builder hands an Engine: the base pipeline, loaded on its device with the LCM
    scheduler and its LCM-LoRA baked in, and what it was made from."""

    pipeline: Any
    family: Family
    model_ref: str
    lcm_ref: str | None  # None: no LCM-LoRA (an LCM-distilled model)
    lcm_weight: float  # baked into the base weights (images)
    animate_lcm_weight: float  # the motion UNet's copy gets this weight (the recipe's 0.55)
    device: str
    # the LCM-LoRA when it is not baked in yet: the builder defers the bake while converted
    # models may serve every call, so torch's weights stay as loaded (mapped from the file,
    # not in memory) until a call needs them
    unbaked: LoraFile | None = None


class Engine:
    """One model (any SD1.5, SDXL or SSD-1B checkpoint) with its LCM-LoRA, ready to run requests.
    Made by `fewstep.build.build_engine`, which loads the parts this class runs.

    >>> engine = build_engine(model="Lykon/dreamshaper-7")
    >>> result = engine.generate(Txt2ImgRequest(prompt="a lighthouse at dusk", seed=42))
    """

    def __init__(self, model: LoadedModel, settings: Settings, *, fuse_loras: bool = True,
                 speed: str = "off", tiny_vae: str | None = None):
        base = model.pipeline
        self.settings = settings
        self.device = model.device
        self.dtype = base.unet.dtype
        self.family: Family = model.family
        self.model_ref = model.model_ref
        self.inpaint_only = base.unet.config.in_channels == 9
        self.lcm_ref = model.lcm_ref
        self.lcm_weight = model.lcm_weight
        self.animate_lcm_weight = model.animate_lcm_weight
        self.base = base
        own_task = "inpaint" if self.inpaint_only else "txt2img"
        self._pipes: dict[tuple, Any] = {(own_task, None): base}
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
        # the speed preset and what the builder applied of it (recorded with every result)
        self.speed = speed
        self.tiny_vae = tiny_vae if speed != "off" else None
        self.fast_path = None
        self.fast_report = None
        self._unbaked = model.unbaked
        self._served: Callable[[PipelineCall], bool] | None = None
        # a torch call runs the deferred LCM-LoRA partly beside the layers (as the recipe
        # does) instead of baking it first: each layer merged only where that costs less than
        # the adapter does over the call's steps. For a one-shot command (the builder sets
        # it), whose one call would not pay back the whole bake.
        self.lcm_beside = False
        self._lcm_merged: set[str] = set()  # UNet layers whose weights hold it already
        self._lcm_beside_now = False  # the call running now has it beside the layers

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

    def serve_without_torch(self, served: Callable[[PipelineCall], bool]) -> None:
        """`served(call)` says when a speed technique runs every model call of `call` itself
        (a converted model), so that torch's base weights need not hold the LCM-LoRA yet."""
        self._served = served

    @property
    def pending_lcm(self) -> str | None:
        """The deferred LCM-LoRA as `digest:weight` (what weights converted from it are keyed
        by), or None once it is baked in."""
        return None if self._unbaked is None else f"{self._unbaked.digest}:{self.lcm_weight}"

    @property
    def baked(self) -> bool:
        """Whether the LCM-LoRA is in torch's base weights (it may be deferred)."""
        return self._unbaked is None

    @property
    def lcm_applied(self) -> bool:
        """Whether torch's base UNet runs with its LCM-LoRA now: baked in, or beside the
        layers for the call running now."""
        return self._unbaked is None or self._lcm_beside_now

    def _runs_lcm_beside(self, call: PipelineCall) -> bool:
        """Whether `call` runs the deferred LCM-LoRA beside the layers rather than baking it
        first: on a one-shot engine, a call with no LoRA stack of its own, on the base UNet
        as loaded (in the engine's dtype)."""
        if not self.lcm_beside or call.loras or call.task == "animate":
            return False
        if self._fused is not None and self._fused.pristine:
            return False  # a stack is fused into the weights: only the bake starts clean
        return self.base.unet.dtype == self.dtype

    def _merge_pays(self, call: PipelineCall, jobs: int) -> Callable[[str, Any], bool]:
        """For `run_beside`: whether merging a UNet layer pays for this call."""
        scale = self.base.vae_scale_factor
        latent = (call.height // scale, call.width // scale)
        levels = len(self.base.unet.config.block_out_channels)
        runs = call.steps * call.count * jobs
        adapter = slot_name(self._unbaked, self._slots_for(self.base).tag)
        return lambda name, layer: merge_pays(name, layer, adapter, latent, levels, runs)

    def bake(self) -> None:
        """Bake the deferred LCM-LoRA into torch's base weights now. Adapter layers are dropped
        first (loaded again when a request asks for them), so no stack starts from weights
        without it."""
        with self._lock:
            if self._unbaked is None:
                return
            self.clear_adapters()
            bake_lora(self.base, self._unbaked, self.lcm_weight,
                      skip=frozenset(self._lcm_merged))
            self._unbaked = None
            self._lcm_merged = set()
            for pipe in self.pipelines():  # what speed techniques left for torch's weights
                for hook in self._hooks:
                    hook(pipe)

    @property
    def fuses_loras(self) -> bool:
        """Whether LoRA stacks are written in place into the same weight tensors (so a captured
        graph of the models stays valid when the stack changes)."""
        return self._fused is not None

    def convert_dtype(self, dtype, later: tuple = ()) -> None:
        """Run every model in `dtype` from now on (components loaded later too). The modules in
        `later` are left as they are for now: a speed technique converts them when torch
        first runs them (a base UNet that converted models serve)."""
        for pipe in self.pipelines():
            for module in pipe.components.values():
                if isinstance(module, torch.nn.Module) and \
                        not any(module is other for other in later):
                    module.to(dtype=dtype)
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

    def component(self, kind_name: str, ref_text: str, field: str):
        """A ControlNet, T2I-Adapter, motion adapter or VAE, loaded once (thread-safe)."""
        kind = kind_of(kind_name, field) if isinstance(kind_name, str) else None
        cls = kind.cls if kind is not None else kind_name
        key = (cls.__name__, ref_text)
        with self._components_lock:
            if key not in self._components:
                ref = parse_ref(ref_text, field)
                if kind is not None:  # of the kind asked for, before any weight is read
                    check_kind(kind, ref, read_config(ref, field), field)
                module = load_component(cls, ref, torch_dtype=self.dtype, field=field)
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
        for name, ref_text in components.items():
            self.check_component(name, ref_text, name)
            extra[name] = self.component(name, ref_text, name)
        if task == "animate":
            # the motion UNet is a copy of the base UNet's weights, which must hold the
            # LCM-LoRA and be free of adapter layers when it is made
            self.bake()
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
        the originals until a request asks for it. A motion LoRA (its layers are the motion
        UNet's) is read and checked as far as the base model goes, and loaded when an
        animation asks for it."""
        with self._lock:
            lora = self.lora(ref_text, field)
            models = lora_models(self.base, self.base.unet)
            if not check_fits(lora, type(self.base), models, unknown_ok=MOTION_LAYERS):
                return
            slots = self._slots_for(self.base)
            apply_stack(self.base, slots, [(lora, 1.0)])
            apply_stack(self.base, slots, [])

    def lora(self, ref_text: str, field: str = "lora") -> LoraFile:
        if ref_text not in self._loras:
            self._loras[ref_text] = read_lora(ref_text, field)
        return self._loras[ref_text]

    def adopt_loras(self, loras: dict[str, LoraFile]) -> None:
        """LoRA files read (and checked) before the model loaded: not read again."""
        for ref_text, lora in loras.items():
            self._loras.setdefault(ref_text, lora)

    # -- planning ---------------------------------------------------------------------------

    @property
    def view(self) -> ModelView:
        """What tasks may know about this model when they describe their pipeline call."""
        return ModelView(family=self.family, native_size=self.native_size,
                         inpaint_only=self.inpaint_only, settings=self.settings,
                         adapter_geometry=self._adapter_geometry, model_ref=self.model_ref)

    def _adapter_geometry(self, ref_text: str) -> tuple[int, int]:
        return adapter_geometry(self.component("adapter", ref_text, "adapter"))

    def plan(self, request) -> PipelineCall:
        """Check `request` against the limits and this model, and describe its pipeline call.
        Raises a FewstepError subclass naming the field; runs no model. Thread-safe and does
        not wait for a running request (the service plans before queueing)."""
        return plan_call(request, self.view)

    def validate(self, request) -> None:
        """Everything `generate` would refuse before running, without running."""
        self.plan(request)

    def check_component(self, kind: str, ref_text: str, field: str | None = None) -> None:
        """Load a ControlNet ("controlnet"), T2I-Adapter ("adapter") or motion adapter
        ("motion_adapter") and check that it fits this model; raises ModelError naming `field`."""
        field = field or kind
        component = kind_of(kind, field)
        if component.task not in self.family.pipelines:
            raise ModelError(f"{field} {ref_text!r}: {self.family.title} models have no "
                             f"{component.task} task", field=field)
        module = self.component(kind, ref_text, field)
        problem = mismatch(component, module.config, self.base.unet.config, self.family)
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
            record = self.record(call, width=int(part.shape[-2]), height=int(part.shape[-3]))
            results.append(Result(task=record.task, images=part, record=record,
                                  warnings=list(call.warnings), seconds=seconds))
        return results

    def _call_pipeline(self, jobs: list["Job"]) -> np.ndarray:
        first = jobs[0].call
        beside = False
        if self._unbaked is not None and not (self._served and self._served(first)):
            beside = self._runs_lcm_beside(first)
            if not beside:
                self.bake()  # torch runs the base weights in this call
        pipe = self.pipeline(first.task, **dict(first.components))
        loader = self._loader_for(pipe)
        if beside and loader is not self.base:
            beside = False
            self.bake()
        stack = []
        for i, (ref, weight) in enumerate(first.loras):
            lora = self.lora(ref, f"loras.{i}")
            # every LoRA checked before any is applied
            check_fits(lora, type(loader), lora_models(loader, pipe.unet))
            stack.append((lora, weight))
        try:
            if beside:
                self._lcm_beside_now = True
                run_beside(loader, self._slots_for(pipe), self._unbaked, self.lcm_weight,
                           self._lcm_merged, self._merge_pays(first, len(jobs)))
            else:
                apply_stack(loader, self._slots_for(pipe), stack)
            self.current_loras = tuple(first.loras)
            return self._run_pipeline(pipe, jobs)
        finally:
            if beside:  # never left on for the next call (a fused stack would not switch it off)
                loader.disable_lora()
                self._lcm_beside_now = False

    def _run_pipeline(self, pipe, jobs: list["Job"]) -> np.ndarray:
        first = jobs[0].call

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
        except FewstepError:
            raise
        except Exception as exc:  # noqa: BLE001 - sorted below; the rest goes up as it is
            if out_of_memory(exc):
                self.release_memory()
                raise OutOfMemory("out of memory on the device; try a smaller size or "
                                  "batch") from exc
            if isinstance(exc, ValueError):  # diffusers' own input checks
                raise InvalidRequest(str(exc)[:500]) from exc
            raise
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

    def record(self, call: PipelineCall, **size) -> Record:
        """Everything needed to reproduce the result of `call` (`size`: its width and height
        once it ran)."""
        return Record(
            request=dict(call.record),
            inputs=dict(call.inputs),  # digests: a reproduction checks it got the same images
            speed=self.speed, model=self.model_ref, family=self.family.name,
            lcm_lora=self.lcm_ref,
            lcm_weight=self.animate_lcm_weight if call.task == "animate" else self.lcm_weight,
            dtype=str(self.dtype).removeprefix("torch."), fewstep=__version__,
            tiny_vae=self.tiny_vae, **size)

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


# how each device reports a failed allocation: CUDA and MPS as torch.OutOfMemoryError, a CPU as a
# plain RuntimeError from its allocator, OpenVINO as a C++ bad_alloc
_CPU_ALLOCATION = ("DefaultCPUAllocator: can't allocate memory",
                   "DefaultCPUAllocator: not enough memory", "std::bad_alloc")


def out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` is a failed memory allocation, on any device."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and any(text in str(exc) for text in _CPU_ALLOCATION)
