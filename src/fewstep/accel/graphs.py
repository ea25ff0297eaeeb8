"""The whole text-to-image call as one CUDA graph: every LCM step (UNet and scheduler update) and
the VAE decode, captured at start-up per declared (width, height, batch) shape and step count,
replayed per request.

`Txt2ImgLoop` is the loop itself: diffusers' own models, called with the arguments diffusers'
`StableDiffusionPipeline` / `StableDiffusionXLPipeline` give them, reading its inputs from static
tensors (initial latents, all the per-step noise, prompt embeddings, SDXL's pooled embeddings and
time ids, the guidance embedding of LCM-distilled UNets) and writing the images and each step's
latents into static tensors. It has no host sync and no branch on data (a test counts the scalar
reads: 0), so it can be captured. The scheduler arithmetic is `StaticLCMScheduler.update`, the
one the sync-free scheduler steps with, so the pixels are the pipeline's.

`GraphedTxt2ImgRunner` is offered every pipeline call through `Engine.add_call_runner`. For an
eligible call (text-to-image, no components, guidance that does not double the batch, a captured
shape and step count, the captured models and dtype) it draws the request's noise from its CPU
generator(s) exactly as the pipeline would (the initial latents, then every step's noise, in the
pipeline's order, shape and dtype), copies the inputs into the static tensors, replays the graph
and copies the images out: one host sync per call. Anything else it declines, and the pipeline
runs the call as before. The step callback (progress, previews, cancellation) is called for every
step after the replay, with that step's latents.

Captured at start-up with an empty LoRA stack, a graph stays valid across LoRA changes because a
fused stack is written in place into the same weight tensors (`lora.FusedStack`); an engine that
computes adapters beside the layers instead gets no LoRA call through here.

The CPU tests run this loop eagerly (`eager=True`: same inputs, buffers and arithmetic, no
capture) and compare it with the engine's plain pipeline path. On an H200
(`scripts/graph_loop_check.py`, speed `default`: the eager UNet) the replayed graphs gave bitwise
the pipeline's pixels, SD1.5 512x512 in 54.6 ms a call against 210 ms; the builder's
`cuda_graph_loop="auto"` turns it on there. Over a compiled UNet it has not run on a GPU yet.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .scheduler import StaticLCMScheduler

# what the engine passes a text-to-image pipeline that the loop knows how to honour
KNOWN_ARGUMENTS = frozenset({
    "prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
    "negative_pooled_prompt_embeds", "num_inference_steps", "guidance_scale", "generator",
    "output_type", "num_images_per_prompt", "width", "height", "callback_on_step_end"})


def _txt2img_classes() -> tuple[type, ...]:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionPipeline, StableDiffusionXLPipeline


def embed_dtype(pipe) -> torch.dtype:
    """The dtype the pipeline's `encode_prompt` gives given prompt embeddings (and the latents)."""
    from diffusers import StableDiffusionXLPipeline

    encoder = pipe.text_encoder_2 if isinstance(pipe, StableDiffusionXLPipeline) \
        else pipe.text_encoder
    return encoder.dtype if encoder is not None else pipe.unet.dtype


@dataclass
class LoopBuffers:
    """The static tensors a captured loop reads and writes (their addresses never change)."""

    latents: torch.Tensor  # (B, C, h, w): the initial noise, before `init_noise_sigma`
    noise: torch.Tensor | None  # (steps - 1, B, C, h, w): what each step but the last adds
    prompt_embeds: torch.Tensor  # (B, tokens, width)
    text_embeds: torch.Tensor | None  # SDXL: pooled embeddings (B, width)
    time_ids: torch.Tensor | None  # SDXL: (B, 6), fixed by the shape
    timestep_cond: torch.Tensor | None  # UNets with `time_cond_proj_dim`: guidance embedding
    images: torch.Tensor  # (B, 3, H, W) in 0..1
    step_latents: torch.Tensor  # (steps, B, C, h, w): the latents after each step


class Txt2ImgLoop:
    """All LCM steps and the VAE decode of one text-to-image shape and step count, on static
    buffers, for SD1.5 and SDXL-family pipelines at guidance that does not double the batch."""

    def __init__(self, pipe, width: int, height: int, batch: int, steps: int,
                 float32_vae=None):
        from diffusers import StableDiffusionXLPipeline

        unet = pipe.unet
        self.unet = unet
        self.vae = pipe.vae
        self.xl = isinstance(pipe, StableDiffusionXLPipeline)
        self.key = (width, height, batch, steps)
        self.steps = steps
        device = pipe._execution_device
        self.device = device
        self.dtype = embed_dtype(pipe)
        if unet.config.in_channels != unet.config.out_channels or unet.dtype != self.dtype:
            raise ValueError("the loop needs a UNet whose output is shaped and typed like its "
                             "latents")
        self.scheduler_config = _schedule(pipe.scheduler.config)
        self.scheduler = StaticLCMScheduler.from_config(pipe.scheduler.config)
        self.scheduler.set_timesteps(steps, device=device)
        self.timesteps = self.scheduler.timesteps
        self.tables = self.scheduler.tables(device)
        self.init_noise_sigma = self.scheduler.init_noise_sigma

        # the decode as the pipeline does it; SDXL in fp16 with `force_upcast` decodes in float32
        # (the pipeline converts its VAE back and forth; a graph needs weights that stay put, so
        # the loop uses a float32 copy, the same values: `float32_vae`, shared by a runner's
        # loops, or its own)
        self.decoder = self.vae
        self.denormalize = True  # SD1.5 passes do_denormalize=[True] * batch
        self.latents_mean = self.latents_std = None
        if self.xl:
            self.denormalize = bool(pipe.image_processor.config.do_normalize)
            if self.vae.dtype == torch.float16 and getattr(self.vae.config, "force_upcast",
                                                            False):
                self.decoder = float32_vae if float32_vae is not None else \
                    copy.deepcopy(self.vae).to(dtype=torch.float32)
            config = self.decoder.config
            if getattr(config, "latents_mean", None) is not None and \
                    getattr(config, "latents_std", None) is not None:
                decode_dtype = self.decoder.dtype if self.decoder is not self.vae else self.dtype
                self.latents_mean = torch.tensor(config.latents_mean).view(1, 4, 1, 1).to(
                    device, decode_dtype)
                self.latents_std = torch.tensor(config.latents_std).view(1, 4, 1, 1).to(
                    device, decode_dtype)
        self.image_processor = pipe.image_processor

        # buffers shaped from a real (empty) prompt encoding
        encoded = pipe.encode_prompt(prompt="", device=device, num_images_per_prompt=batch,
                                     do_classifier_free_guidance=False)
        scale = pipe.vae_scale_factor
        latent_shape = (batch, unet.config.in_channels, height // scale, width // scale)
        zeros = dict(device=device, dtype=self.dtype)
        text_embeds = time_ids = timestep_cond = None
        if self.xl:
            text_embeds = encoded[2].to(device).clone()
            projection = int(text_embeds.shape[-1]) if pipe.text_encoder_2 is None \
                else pipe.text_encoder_2.config.projection_dim
            time_ids = pipe._get_add_time_ids(
                (height, width), (0, 0), (height, width), dtype=self.dtype,
                text_encoder_projection_dim=projection).to(device).repeat(batch, 1)
        if unet.config.time_cond_proj_dim is not None:
            timestep_cond = torch.zeros(batch, unet.config.time_cond_proj_dim, **zeros)
        decode_dtype = self.decoder.dtype
        self.buffers = LoopBuffers(
            latents=torch.zeros(latent_shape, **zeros),
            noise=torch.zeros((steps - 1, *latent_shape), **zeros) if steps > 1 else None,
            prompt_embeds=encoded[0].to(device).clone(),
            text_embeds=text_embeds, time_ids=time_ids, timestep_cond=timestep_cond,
            images=torch.zeros(batch, self.decoder.config.out_channels, height, width,
                               device=device, dtype=decode_dtype),
            step_latents=torch.zeros((steps, *latent_shape), **zeros))

    def run(self) -> None:
        """The loop: reads the input buffers, writes `images` and `step_latents`."""
        b = self.buffers
        latents = b.latents * self.init_noise_sigma
        added = {"text_embeds": b.text_embeds, "time_ids": b.time_ids} if self.xl else None
        for k in range(self.steps):
            t = self.timesteps[k]
            model_input = self.scheduler.scale_model_input(latents, t)
            noise_pred = self.unet(model_input, t, encoder_hidden_states=b.prompt_embeds,
                                   timestep_cond=b.timestep_cond, cross_attention_kwargs=None,
                                   added_cond_kwargs=added, return_dict=False)[0]
            noise = b.noise[k] if k < self.steps - 1 else None
            latents, _ = self.scheduler.update(self.tables, k, noise_pred, latents, noise)
            b.step_latents[k].copy_(latents)
        b.images.copy_(self.decode(latents))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        scaling = self.decoder.config.scaling_factor
        if self.xl:
            if self.decoder is not self.vae:
                latents = latents.to(torch.float32)
            if self.latents_mean is not None:
                latents = latents * self.latents_std / scaling + self.latents_mean
            else:
                latents = latents / scaling
        else:
            latents = latents / scaling
        image = self.decoder.decode(latents, return_dict=False)[0]
        return self.image_processor.denormalize(image) if self.denormalize else image

    def load(self, pipe, arguments: dict[str, Any]) -> None:
        """Copy one call's inputs into the buffers: its noise drawn from its CPU generator(s) as
        the pipeline draws it, its embeddings repeated per image as the pipeline repeats them."""
        b = self.buffers
        generator = arguments["generator"]
        shape = tuple(b.latents.shape)
        cpu = torch.device("cpu")
        from diffusers.utils.torch_utils import randn_tensor

        # the pipeline's prepare_latents first, then the scheduler's per-step draws
        latents = randn_tensor(shape, generator=generator, device=cpu, dtype=self.dtype)
        noise = self.scheduler.draw_noise(shape, self.dtype, generator)
        _copy_in(b.latents, latents)
        if noise is not None:
            _copy_in(b.noise, noise)
        n = arguments.get("num_images_per_prompt", 1)
        embeds = arguments["prompt_embeds"].to(dtype=self.dtype, device=self.device)
        prompts, tokens, _ = embeds.shape
        b.prompt_embeds.copy_(embeds.repeat(1, n, 1).view(prompts * n, tokens, -1))
        if self.xl:
            pooled = arguments["pooled_prompt_embeds"]
            b.text_embeds.copy_(pooled.repeat(1, n).view(prompts * n, -1).to(self.device))
        if b.timestep_cond is not None:
            batch = b.latents.shape[0]
            scale = torch.tensor(arguments["guidance_scale"] - 1).repeat(batch)
            b.timestep_cond.copy_(pipe.get_guidance_scale_embedding(
                scale, embedding_dim=self.unet.config.time_cond_proj_dim).to(
                    device=self.device, dtype=self.dtype))

    def fits(self, pipe, arguments: dict[str, Any]) -> str | None:
        """Why this loop cannot run the call (None: it can)."""
        if pipe.unet is not self.unet or pipe.vae is not self.vae:
            return "the pipeline's models are not the captured ones"
        if embed_dtype(pipe) != self.dtype:
            return "the model dtype changed since capture"
        if _schedule(pipe.scheduler.config) != self.scheduler_config:
            return "the scheduler changed since capture"
        b = self.buffers
        n = arguments.get("num_images_per_prompt", 1)
        embeds = arguments["prompt_embeds"]
        if (embeds.shape[0] * n, *embeds.shape[1:]) != tuple(b.prompt_embeds.shape):
            return f"prompt embeddings {tuple(embeds.shape)} do not fit the captured ones"
        if self.xl:
            pooled = arguments.get("pooled_prompt_embeds")
            if pooled is None or pooled.dtype != b.text_embeds.dtype or \
                    (pooled.shape[0] * n, *pooled.shape[1:]) != tuple(b.text_embeds.shape):
                return "pooled prompt embeddings do not fit the captured ones"
        generator = arguments.get("generator")
        generators = generator if isinstance(generator, list) else [generator]
        if any(not isinstance(g, torch.Generator) or g.device.type != "cpu"
               for g in generators):
            return "the noise must come from CPU generators"
        if isinstance(generator, list) and len(generator) not in (1, b.latents.shape[0]):
            return "one generator per image is needed"
        return None


def _schedule(config) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _copy_in(target: torch.Tensor, source: torch.Tensor) -> None:
    if target.device.type == "cuda":
        # from pinned memory without blocking; the host allocator keeps the pinned block until
        # the copy has run
        target.copy_(source.pin_memory(), non_blocking=True)
    else:
        target.copy_(source)


class GraphedTxt2ImgRunner:
    """A call runner for `Engine.add_call_runner`: replays a captured whole-loop graph for each
    eligible text-to-image call and declines the rest (the pipeline then runs them).

    On CUDA `install` builds and captures one loop per declared (width, height, batch) shape and
    step count; elsewhere it captures nothing and declines every call. `eager=True` runs the
    same loops without a graph (on any device): the CPU tests use it."""

    def __init__(self, shapes, steps=(4,), *, eager: bool = False):
        self.shapes = tuple(tuple(int(v) for v in shape) for shape in shapes)
        self.steps = tuple(int(s) for s in steps)
        self.eager = eager
        self.loops: dict[tuple[int, int, int, int], Txt2ImgLoop] = {}
        self.graphs: dict[tuple[int, int, int, int], Any] = {}
        self.engine = None
        self.remove = None
        self.replays = 0  # calls this runner ran
        self.declined: str | None = None  # why the last call was declined
        self.capture_seconds: dict[str, float] = {}

    def install(self, engine) -> str:
        """Build the loops (capturing them on CUDA) and offer the engine's calls to this runner.
        Returns what was done, for `FastReport.applied`."""
        cuda = str(engine.device).startswith("cuda")
        if not cuda and not self.eager:
            return "skipped: needs CUDA"
        if engine.inpaint_only:
            return "skipped: an inpainting model has no text-to-image pipeline"
        self.engine = engine
        pipe = engine.pipeline("txt2img")
        pool = torch.cuda.graph_pool_handle() if cuda and not self.eager else None
        float32_vae = None
        with torch.inference_mode():
            for width, height, batch in self.shapes:
                for steps in self.steps:
                    began = time.perf_counter()
                    loop = Txt2ImgLoop(pipe, width, height, batch, steps, float32_vae)
                    if loop.decoder is not loop.vae:
                        float32_vae = loop.decoder
                    self.loops[loop.key] = loop
                    if pool is not None:
                        self.graphs[loop.key] = _capture(loop, pool)
                    self.capture_seconds[f"{width}x{height}x{batch}@{steps}"] = \
                        time.perf_counter() - began
        self.remove = engine.add_call_runner(self)
        what = "eager loops" if self.eager else "graphs"
        return f"on ({len(self.loops)} {what}: shapes={len(self.shapes)}, steps={self.steps})"

    def __call__(self, pipe, calls, arguments: dict[str, Any]) -> np.ndarray | None:
        loop, why = self._match(pipe, calls, arguments)
        if loop is None:
            self.declined = why
            return None
        with torch.inference_mode():
            loop.load(pipe, arguments)
            graph = self.graphs.get(loop.key)
            if graph is not None:
                graph.replay()
            else:
                loop.run()
            self._report_steps(pipe, loop, arguments)
            images = loop.buffers.images
            # the pipeline's pt_to_numpy; a CPU buffer is copied first, as the next call
            # overwrites it
            images = (images.clone() if images.device.type == "cpu" else images.cpu())
            images = images.permute(0, 2, 3, 1).float().numpy()
        self.replays += 1
        self.declined = None
        return images

    def _match(self, pipe, calls, arguments) -> tuple[Txt2ImgLoop | None, str | None]:
        from ..prompts import wants_guidance

        if not self.loops:
            return None, "no loop was captured"
        if any(call.task != "txt2img" for call in calls):
            return None, "not a text-to-image call"
        if any(call.components for call in calls):
            return None, "the call has components (ControlNet, adapter)"
        if type(pipe) not in _txt2img_classes():
            return None, f"{type(pipe).__name__} is not a text-to-image pipeline"
        unknown = set(arguments) - KNOWN_ARGUMENTS
        if unknown:
            return None, f"arguments the loop does not know: {', '.join(sorted(unknown))}"
        if arguments.get("output_type") != "np":
            return None, "output_type is not np"
        if wants_guidance(pipe, arguments["guidance_scale"]):
            return None, "guidance above 1 doubles the batch"
        # a fused stack is written in place into the weight tensors the graph reads, so the
        # graph captured with no LoRA runs any stack; unfused adapters are layers it never saw
        if any(call.loras for call in calls) and not self.engine.fuses_loras:
            return None, "LoRAs computed beside the layers are not in the captured graph"
        if getattr(pipe, "safety_checker", None) is not None or \
                getattr(pipe, "watermark", None) is not None:
            return None, "a safety checker or watermark runs after the decode"
        if self.engine.dtype != next(iter(self.loops.values())).dtype:
            return None, "the engine's dtype is not the captured one"
        batch = arguments["prompt_embeds"].shape[0] * arguments.get("num_images_per_prompt", 1)
        key = (arguments.get("width"), arguments.get("height"), batch,
               arguments["num_inference_steps"])
        loop = self.loops.get(key)
        if loop is None:
            return None, f"no loop captured for {key[0]}x{key[1]}x{key[2]}, {key[3]} steps"
        why = loop.fits(pipe, arguments)
        return (None, why) if why else (loop, None)

    @staticmethod
    def _report_steps(pipe, loop: Txt2ImgLoop, arguments) -> None:
        """The pipeline's step callback for every step, after the fact, with that step's
        latents (progress, previews, cancellation); its returned tensors are not used."""
        # the pipeline sets the schedule on its scheduler: callbacks read it
        pipe.scheduler.set_timesteps(loop.steps, device=loop.device)
        callback = arguments.get("callback_on_step_end")
        if callback is None:
            return
        for k, t in enumerate(pipe.scheduler.timesteps):
            callback(pipe, k, t, {"latents": loop.buffers.step_latents[k]})


def _capture(loop: Txt2ImgLoop, pool):
    """Warm `loop` up on a side stream (cuDNN / cuBLAS choices, lazy inits), then capture one
    run into a CUDA graph whose memory comes from `pool`. Graphs of one runner share the pool:
    they never run at the same time, and none keeps a tensor in it (all inputs and outputs are
    the loop's static buffers, allocated outside the capture)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            loop.run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        loop.run()
    torch.cuda.synchronize()
    return graph
