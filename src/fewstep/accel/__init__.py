"""Speed techniques for an Engine: each one switchable, each one measured by `fewstep.bench`.
They reach the engine only through its public seam (`add_pipeline_hook`, `add_call_context`,
`add_call_runner`, `convert_dtype`, `replace_vae`, `set_scheduler`, `prompt_cache`).

    >>> engine = build_engine(model=model, speed="off")
    >>> FastPath.preset("fastest", engine.device).apply(engine)

The builder (`fewstep.build`) applies the engine's `speed` preset this way; this package knows
no engine class and no task: what a technique must run to build a shape ahead (a warm-up call)
is handed to `FastPath.apply` by the builder.

What each technique does, and whether the picture stays the same:

=================  ===========================================================  ==============
technique          what                                                          same image?
=================  ===========================================================  ==============
prompt_cache       reuse the prompt embeddings of a prompt seen before (key:     exact (bitwise)
                   prompt, negative prompt, guidance on/off, LoRA stack)
static_scheduler   the LCM scheduler with every per-step scalar and all the     exact (bitwise)
                   noise prepared before the loop: no host sync inside it
channels_last      UNet / ControlNet / adapter weights in NHWC memory order      1e-4 (conv order)
                   (on a CPU with bf16 only: float32 runs slower there); the
                   VAE on a CPU only (CUDA's GroupNorms run slower in NHWC)
sdpa               every attention processor on `F.scaled_dot_product_attention` 1e-4
                   (diffusers 0.42 already does this; checked, set if not)
dtype              run the whole engine in bf16 (CPU with AMX / AVX512-BF16) or  no: half precision
                   fp16 (GPU); on CPU bf16 pays only together with channels_last
tiny_vae           `AutoencoderTiny` (taesd / taesdxl) instead of the full VAE   no: a preview VAE
fp16_vae           an fp16-safe SDXL VAE (a local copy of sdxl-vae-fp16-fix) so  close (its own
                   the float32 `force_upcast` decode is not needed               weights)
compile_unet       `torch.compile` of the UNet for declared shapes, compiled at  ~1e-3 (fused
                   start-up, cached on disk; other shapes run plain at once      kernels)
cuda_graph_loop    CUDA only: the whole text-to-image call (all steps and the    exact (bitwise
                   decode) as one CUDA graph per declared shape and step        on an H200)
                   count, captured at start-up (`graphs.py`); the builder's
                   `auto` turns it on for services at speed `default`
openvino           CPU: the base UNet and VAE decoder converted to OpenVINO for  f32: 1e-5;
                   the declared sizes at start-up, kept on disk; LoRA stacks,    bf16: no
                   other sizes and ControlNet run on torch (`accel/openvino.py`)
=================  ===========================================================  ==============

Presets: `off` (nothing), `default` (the exact techniques), `auto` (the exact techniques, plus on
CUDA the compiled UNet with CUDA graphs for the declared shapes, on a CPU OpenVINO in float32
when it is installed), `fastest` (also half precision where it pays and the tiny VAE:
approximate). The builder decides on OpenVINO (`openvino.choose`) and passes it as `openvino=`.

Classifier-free guidance at guidance <= 1 does not double the batch: diffusers' own
`do_classifier_free_guidance` is `guidance_scale > 1` (a test checks it), so nothing is done here
for it. The engine's LCM-LoRA is already fused into the weights by the Engine itself
(`bake_lora`); that is the largest single gain over the recipe and is not repeated here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch

from ..config import default_cache_dir, openvino_cache_dir, pick_dtype
from ..prompts import PromptCache
from .compile import DEFAULT_SHAPES, AheadOfTimeCompiler, configure_compiling

# the published tiny autoencoders, per family (taesd for SD1.x, taesdxl for SDXL and SSD-1B)
TINY_VAE = {"sd15": "madebyollin/taesd", "sdxl": "madebyollin/taesdxl",
            "ssd-1b": "madebyollin/taesdxl"}
PRESETS = ("off", "auto", "default", "fastest")


@dataclass(frozen=True)
class FastOptions:
    """Which techniques to apply. A module may be given instead of a reference for the VAEs
    (the benchmark uses random-weight modules of the real configs)."""

    prompt_cache: bool = True
    prompt_cache_size: int = 64
    static_scheduler: bool = True
    channels_last: bool = True
    # the VAE (full or tiny) in NHWC: on a CPU it decodes 15 % faster in float32 (SD1.5 at
    # 256x256 and 512x512, 2-core Xeon), the tiny one 3x in bf16
    channels_last_vae: bool = False
    sdpa: bool = True
    dtype: str | None = None  # "bf16" / "fp16": convert the engine (not exact)
    tiny_vae: Any = None  # reference or AutoencoderTiny
    fp16_vae: Any = None  # reference or AutoencoderKL (SDXL family), force_upcast turned off
    compile_unet: bool = False
    compile_mode: str | None = None  # torch.compile mode; None: inductor's default
    compile_cache_dir: str | None = None  # inductor / FX graph cache kept on disk
    # (width, height, batch) built ahead (compiled, converted); None: the family's default
    compile_shapes: tuple[tuple[int, int, int], ...] | None = None
    # whole text-to-image loop as CUDA graphs, for compile_shapes (or the family's) x graph_steps
    # (no preset turns it on: the builder's `cuda_graph_loop="auto"` decides)
    cuda_graph_loop: bool = False
    graph_steps: tuple[int, ...] = (4,)
    # True: a capture that fails leaves the loop off, said in the report, instead of failing
    graph_loop_optional: bool = False
    openvino: str | None = None  # "f32" / "bf16": the CPU UNet, VAE decoder, text encoders
    openvino_text: bool = True  # the text encoders too
    openvino_weights: str | None = None  # "int8": weights compressed to 8 bits (NNCF)
    # False: use what the cache holds, convert nothing now (a one-shot command, where the
    # conversion would not pay back within its call; `OpenVINOParts.build_missing` later)
    openvino_build: bool = True

    def describe(self) -> dict[str, Any]:
        out = {}
        for name, value in self.__dict__.items():
            out[name] = value if isinstance(value, (str, int, float, bool, type(None), tuple)) \
                else f"<{type(value).__name__}>"
        return out


def half_dtype_for(device: str) -> str | None:
    """The half precision that pays on `device`: fp16 on CUDA/MPS, bf16 on a CPU with AMX or
    AVX512-BF16 (oneDNN runs it at twice the fp32 rate), none otherwise."""
    if device.startswith(("cuda", "mps")):
        return "fp16"
    try:
        if torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported():
            return "bf16"
    except AttributeError:  # older torch
        pass
    return None


@dataclass
class FastReport:
    """What `FastPath.apply` did: technique -> "on" / "off" / "skipped: why", and the checks."""

    applied: dict[str, str] = field(default_factory=dict)
    checks: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


class FastPath:
    """Applies `FastOptions` to an Engine through its public seam: its existing pipelines now,
    the ones it derives later through a pipeline hook. An Engine applies its `speed` preset
    itself."""

    def __init__(self, options: FastOptions | None = None, **overrides):
        options = options or FastOptions()
        self.options = replace(options, **overrides) if overrides else options
        self.report = FastReport()
        self.compiler: AheadOfTimeCompiler | None = None
        self.graph_runner = None
        self.openvino = None  # OpenVINOParts, when on
        self._done: set[tuple[str, int]] = set()
        self._dtype = None
        self._vae = None
        self._engine = None

    @classmethod
    def preset(cls, name: str, device: str = "cpu", family: str | None = None,
               **overrides) -> "FastPath":
        """`off`: nothing. `default`: the exact techniques only. `auto`: `default`, plus on CUDA
        the UNet compiled ahead for the family's shapes with CUDA graphs. `fastest`: also half
        precision where it pays, the family's tiny VAE (a download unless `tiny_vae=` names a
        local one) and, on CUDA, the compiled UNet."""
        cuda = device.startswith("cuda")
        # NHWC weights: on a CPU they pay in bf16 only; float32 steps there ran 11 % slower
        # (SD1.5 UNet, 256x256, 2-core Xeon), after a 3.4 GB copy of the weights
        cpu_float = device.startswith("cpu")
        if name == "off":
            options = FastOptions(prompt_cache=False, static_scheduler=False,
                                  channels_last=False, sdpa=False)
        elif name == "default":
            options = FastOptions(channels_last=not cpu_float, channels_last_vae=cpu_float)
        elif name == "auto":
            options = FastOptions(compile_unet=cuda, compile_mode="reduce-overhead",
                                  channels_last=not cpu_float, channels_last_vae=cpu_float)
        elif name == "fastest":
            half = half_dtype_for(device)
            options = FastOptions(dtype=half, tiny_vae=TINY_VAE.get(family or "sd15"),
                                  compile_unet=cuda,
                                  channels_last=half is not None or not cpu_float,
                                  channels_last_vae=cpu_float,
                                  compile_mode="reduce-overhead" if cuda else None)
        else:
            raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
        return cls(options, **overrides)

    # -- applying -----------------------------------------------------------------------

    def shapes(self, engine) -> tuple[tuple[int, int, int], ...]:
        """The (width, height, batch) shapes built ahead: the declared ones, else the family's
        (on a CPU its first: one converted model per size, the batch free)."""
        if self.options.compile_shapes is not None:
            return tuple(self.options.compile_shapes)
        shapes = DEFAULT_SHAPES.get(engine.family.name, ())
        return shapes if engine.device.startswith("cuda") else shapes[:1]

    def apply(self, engine, warm_up: Callable[[int, int, int], Any] | None = None,
              progress: Callable[[str], None] | None = None) -> FastReport:
        """Apply the options to `engine`. `warm_up(width, height, batch)` runs one short call of
        a shape, which compiles it now rather than inside a request (needed to compile ahead);
        `progress(line)` hears about each model being converted ahead."""
        opts = self.options
        rep = self.report
        start = time.perf_counter()
        self._engine = engine

        # the VAE that decodes first: it is the one converted
        if opts.tiny_vae is not None:
            self._vae = self._load_vae(engine, opts.tiny_vae, "tiny_vae", tiny=True)
            rep.applied["tiny_vae"] = _name(opts.tiny_vae)
        else:
            rep.applied["tiny_vae"] = "off"
        if opts.fp16_vae is not None and opts.tiny_vae is None:
            if not engine.family.sdxl_like:
                rep.applied["fp16_vae"] = "skipped: only the SDXL family upcasts its VAE"
            else:
                self._vae = self._load_vae(engine, opts.fp16_vae, "fp16_vae", tiny=False)
                self._vae.register_to_config(force_upcast=False)
                rep.applied["fp16_vae"] = _name(opts.fp16_vae)
        else:
            rep.applied["fp16_vae"] = "off" if opts.fp16_vae is None else \
                "skipped: the tiny VAE replaces it"
        if self._vae is not None:
            engine.replace_vae(self._vae)

        # before any dtype change: the converted models take float32 weights
        rep.applied["openvino"] = self._openvino(engine, progress) if opts.openvino else "off"
        if opts.dtype and self.openvino is not None and self.openvino.missing:
            # the converted models are made from float32 weights after this run (a one-shot
            # command); its own call runs in float32 on torch
            rep.applied["dtype"] = "off this run (float32: OpenVINO is prepared from these " \
                                   "weights after it)"
        elif opts.dtype:
            self._dtype = pick_dtype(opts.dtype, engine.device)
            # a base UNet the converted models serve is not copied now (1.7 GB for SD1.5 in
            # bf16): `prepare` converts it once torch is to run it
            engine.convert_dtype(self._dtype, later=(engine.base.unet,) if self._lazy(
                engine.base.unet) else ())
            rep.applied["dtype"] = str(self._dtype).removeprefix("torch.")
        else:
            rep.applied["dtype"] = f"off ({str(engine.dtype).removeprefix('torch.')})"

        if opts.prompt_cache:
            if engine.prompt_cache is None:
                engine.prompt_cache = PromptCache(opts.prompt_cache_size)
        rep.applied["prompt_cache"] = "on" if opts.prompt_cache else "off"
        if opts.static_scheduler:
            from .scheduler import StaticLCMScheduler

            engine.set_scheduler(StaticLCMScheduler.from_config(engine.base.scheduler.config))
        rep.applied["static_scheduler"] = "on" if opts.static_scheduler else "off"
        rep.applied["channels_last"] = "on" if opts.channels_last else "off"
        rep.applied["channels_last_vae"] = "on" if opts.channels_last_vae else "off"
        rep.applied["sdpa"] = "on" if opts.sdpa else "off"

        engine.add_pipeline_hook(self.prepare)
        shapes = self.shapes(engine)
        if opts.compile_unet:
            cache = opts.compile_cache_dir or default_cache_dir()
            configure_compiling(cache, len(shapes))
            mode = opts.compile_mode
            if opts.cuda_graph_loop and mode == "reduce-overhead" and \
                    engine.device.startswith("cuda"):
                mode = None  # the whole loop becomes one graph: no graphs of its own inside
            self.compiler = AheadOfTimeCompiler(shapes, mode)
            self.compiler.install(engine)
            rep.applied["compile_unet"] = (f"on (mode={mode or 'default'}, "
                                           f"shapes={len(shapes)}, cache={cache})")
        else:
            rep.applied["compile_unet"] = "off"
        rep.seconds["apply"] = time.perf_counter() - start
        if self.compiler is not None and shapes and warm_up is not None:
            rep.seconds["warmup"] = self.compiler.warm_up(warm_up)
        if opts.cuda_graph_loop:  # last: it captures the models as everything above left them
            from .graphs import GraphedTxt2ImgRunner

            began = time.perf_counter()
            self.graph_runner = GraphedTxt2ImgRunner(shapes, opts.graph_steps)
            try:
                rep.applied["cuda_graph_loop"] = self.graph_runner.install(engine)
            except Exception as error:
                if not opts.graph_loop_optional:
                    raise
                # install offers calls to the runner only once every capture is done: dropping
                # it frees the loops' buffers and graphs
                self.graph_runner = None
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                rep.applied["cuda_graph_loop"] = \
                    f"skipped: the capture failed ({type(error).__name__}: {error})"[:300]
            rep.seconds["graph_capture"] = time.perf_counter() - began
        else:
            rep.applied["cuda_graph_loop"] = "off"
        return rep

    def _openvino(self, engine, progress=None) -> str:
        from .openvino import OpenVINOParts, enough_memory

        opts = self.options
        shapes = self.shapes(engine)
        if not shapes:
            return "skipped: no shape to build ahead"
        sizes = tuple(dict.fromkeys((w, h) for w, h, _ in shapes))
        batches = tuple(sorted({b for _, _, b in shapes})) or (1,)
        # an fp16-safe VAE is for CUDA's half precision: the original VAE or the tiny one is
        # what a CPU decodes with, and that one is converted
        decoder = opts.fp16_vae is None or opts.tiny_vae is not None
        parts = [engine.base.unet, engine.base.vae.decoder] + [
            getattr(engine.base, name) for name in ("text_encoder", "text_encoder_2")
            if opts.openvino_text and getattr(engine.base, name, None) is not None]
        fits, why = enough_memory(parts, len(sizes))
        if not fits:
            return f"skipped: {why}"
        start = time.perf_counter()
        if not opts.openvino_build:
            batches = ()  # a one-shot command: its first call prepares the kernels it uses
        self.openvino = OpenVINOParts(opts.openvino, sizes, batches, decoder=decoder,
                                      text=opts.openvino_text, weights=opts.openvino_weights,
                                      tiny_decoder=opts.tiny_vae is not None,
                                      cache_dir=openvino_cache_dir(opts.compile_cache_dir))
        done = self.openvino.install(engine, build=opts.openvino_build, progress=progress)
        self.report.seconds["openvino"] = time.perf_counter() - start
        return done

    def _load_vae(self, engine, ref, field_name: str, tiny: bool):
        from diffusers import AutoencoderKL, AutoencoderTiny

        if isinstance(ref, torch.nn.Module):
            module = ref
        else:
            module = engine.component(AutoencoderTiny if tiny else AutoencoderKL, str(ref),
                                      field_name)  # a class: no kind check applies
        return module.to(engine.device, engine.dtype).eval()

    def prepare(self, pipe) -> None:
        """Apply the options to one pipeline (idempotent: shared modules are done once)."""
        opts = self.options
        if self._dtype is not None:
            for module in _modules(pipe):
                if self._lazy(module):
                    continue  # left as loaded until torch runs it (done again at the bake)
                if module.dtype != self._dtype and self._first("dtype", module):
                    module.to(dtype=self._dtype)
        if opts.sdpa:
            for module in (getattr(pipe, "unet", None), getattr(pipe, "vae", None),
                           getattr(pipe, "controlnet", None)):
                if module is not None and self._first("sdpa", module):
                    self.report.checks.setdefault("sdpa", {}).update(ensure_sdpa(module))
        if opts.channels_last:
            for name in ("unet", "controlnet", "adapter"):
                module = getattr(pipe, name, None)
                if name == "unet" and module is not None and self._lazy(module):
                    continue  # left as loaded until torch runs it (done again at the bake)
                if isinstance(module, torch.nn.Module) and self._first("channels_last", module):
                    module.to(memory_format=torch.channels_last)
        vae = getattr(pipe, "vae", None)
        if opts.channels_last_vae and isinstance(vae, torch.nn.Module) and \
                not (self.openvino is not None and self.openvino.vae_models) and \
                self._first("channels_last", vae):
            # not where a converted decoder serves: a copy of weights torch rarely runs then
            vae.to(memory_format=torch.channels_last)

    def _lazy(self, unet) -> bool:
        """A base UNet whose LCM-LoRA is not baked in yet: converted models serve its calls,
        and its weights stay as loaded (mapped from the file) until torch needs them."""
        engine = self._engine
        return engine is not None and not engine.baked and unet is engine.base.unet

    def _first(self, what: str, module) -> bool:
        key = (what, id(module))
        if key in self._done:
            return False
        self._done.add(key)
        return True


def _modules(pipe):
    for name in ("unet", "vae", "text_encoder", "text_encoder_2", "controlnet", "adapter",
                 "motion_adapter"):
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            yield module


def _name(ref) -> str:
    return ref if isinstance(ref, str) else f"<{type(ref).__name__} module>"


def ensure_sdpa(model) -> dict[str, int]:
    """Count `model`'s attention processors by class; set `AttnProcessor2_0` where a plain
    (non-SDPA) `AttnProcessor` is found. diffusers 0.42 defaults to SDPA already."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    processors = getattr(model, "attn_processors", None)
    if not processors:
        return {}
    if any(type(p) is AttnProcessor for p in processors.values()):
        model.set_attn_processor({k: AttnProcessor2_0() if type(p) is AttnProcessor else p
                                  for k, p in processors.items()})
        processors = model.attn_processors
    counts: dict[str, int] = {}
    for p in processors.values():
        counts[type(p).__name__] = counts.get(type(p).__name__, 0) + 1
    return counts
