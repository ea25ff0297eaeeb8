"""Speed techniques for an Engine: each one switchable, each one measured by `fewstep.bench`.

    >>> engine = Engine(model)
    >>> FastPath.preset("fastest", engine.device).apply(engine)

What each technique does, and whether the picture stays the same:

=================  ===========================================================  ==============
technique          what                                                          same image?
=================  ===========================================================  ==============
prompt_cache       reuse `encode_prompt` output for a prompt seen before; the    exact (bitwise)
                   key holds every argument and the text encoders' adapter
                   state, so a LoRA stack with text-encoder parts misses
channels_last      UNet / VAE / ControlNet weights in NHWC memory order          1e-4 (conv order)
sdpa               every attention processor on `F.scaled_dot_product_attention` 1e-4
                   (diffusers 0.42 already does this; checked, set if not)
dtype              run the whole engine in bf16 (CPU with AMX / AVX512-BF16) or  no: half precision
                   fp16 (GPU); on CPU bf16 pays only together with channels_last
tiny_vae           `AutoencoderTiny` (taesd / taesdxl) instead of the full VAE   no: a preview VAE
fp16_vae           an fp16-safe SDXL VAE (madebyollin/sdxl-vae-fp16-fix) so the  close (its own
                   float32 `force_upcast` decode is not needed                   weights)
compile_unet       `torch.compile` of the UNet with fixed shapes, warmed up,     ~1e-3 (fused
                   inductor cache on disk; opt-in, pays on GPUs, see bench notes  kernels)
=================  ===========================================================  ==============

Classifier-free guidance at guidance <= 1 does not double the batch: diffusers' own
`do_classifier_free_guidance` is `guidance_scale > 1` (checked by `cfg_batch`), so nothing is done
here for it.

The engine's LCM-LoRA is already fused into the weights by the Engine itself (`bake_lora`); that is
the largest single gain over the recipe and is not repeated here.
"""

from __future__ import annotations

import inspect
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from .config import pick_dtype

# the published tiny autoencoders, per family (taesd for SD1.x, taesdxl for SDXL and SSD-1B)
TINY_VAE = {"sd15": "madebyollin/taesd", "sdxl": "madebyollin/taesdxl",
            "ssd-1b": "madebyollin/taesdxl"}
FP16_SDXL_VAE = "madebyollin/sdxl-vae-fp16-fix"


@dataclass(frozen=True)
class FastOptions:
    """Which techniques to apply. A module may be given instead of a reference for the VAEs
    (the benchmark uses random-weight modules of the real configs)."""

    prompt_cache: bool = True
    prompt_cache_size: int = 64
    channels_last: bool = True
    sdpa: bool = True
    dtype: str | None = None  # "bf16" / "fp16": convert the engine (not exact)
    tiny_vae: Any = None  # reference or AutoencoderTiny
    fp16_vae: Any = None  # reference or AutoencoderKL (SDXL family), force_upcast turned off
    compile_unet: bool = False
    compile_mode: str | None = None  # torch.compile mode; None: inductor's default
    compile_cache_dir: str | None = None  # inductor / FX graph cache kept on disk
    warmup: tuple[tuple[int, int, int], ...] = ()  # (width, height, batch) to compile ahead

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


PRESETS = ("default", "fastest")


class PromptCache:
    """`encode_prompt` results by (pipeline class, arguments, text-encoder adapter state, dtype),
    least recently used dropped first. Stored and returned as clones, so no caller can change a
    cached tensor. Call `clear()` after changing text-encoder weights other than through
    adapters (fewstep itself never does)."""

    def __init__(self, size: int = 64):
        self.size = size
        self._data: OrderedDict = OrderedDict()
        self.hits = 0
        self.misses = 0

    def clear(self) -> None:
        self._data.clear()

    def wrap(self, pipe) -> None:
        if not hasattr(pipe, "encode_prompt") or getattr(pipe, "_fewstep_prompt_cache", None):
            return
        original = pipe.encode_prompt
        signature = inspect.signature(original)
        cache = self

        def encode_prompt(*args, **kwargs):
            key = cache._key(pipe, signature, args, kwargs)
            if key is None:
                return original(*args, **kwargs)
            if key in cache._data:
                cache._data.move_to_end(key)
                cache.hits += 1
                return _clone(cache._data[key])
            cache.misses += 1
            out = original(*args, **kwargs)
            cache._data[key] = _clone(out)
            while len(cache._data) > cache.size:
                cache._data.popitem(last=False)
            return out

        pipe.encode_prompt = encode_prompt
        pipe._fewstep_prompt_cache = self

    def _key(self, pipe, signature, args, kwargs):
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError:
            return None
        bound.apply_defaults()
        items = []
        for name, value in bound.arguments.items():
            value = _hashable(value)
            if value is _UNCACHEABLE:  # given embeddings, images, generators: not cached
                return None
            items.append((name, value))
        encoders = tuple(
            (id(te), str(te.dtype), _adapter_state(te))
            for te in (getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None))
            if te is not None)
        return (type(pipe).__name__, tuple(items), encoders)


_UNCACHEABLE = object()


def _hashable(value):
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, torch.device):
        return str(value)
    if isinstance(value, (list, tuple)):
        parts = tuple(_hashable(v) for v in value)
        return _UNCACHEABLE if any(p is _UNCACHEABLE for p in parts) else ("seq", parts)
    return _UNCACHEABLE


def _clone(value):
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, tuple):
        return tuple(_clone(v) for v in value)
    if isinstance(value, list):
        return [_clone(v) for v in value]
    return value


def _adapter_state(module) -> tuple:
    """What a text encoder's peft adapters contribute: active names, scales, disabled/merged."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        return ()
    # a stack fused into the weights (the engine's default) leaves the adapters switched off
    state = [("fused", getattr(module, "_fewstep_fused_stack", None))]
    for name, layer in module.named_modules():
        if isinstance(layer, BaseTunerLayer):
            scaling = getattr(layer, "scaling", {})
            state.append((name, tuple(layer.active_adapters), bool(layer.disable_adapters),
                          tuple(layer.merged_adapters),
                          tuple(sorted((k, float(v)) for k, v in scaling.items()))))
    return tuple(state)


@dataclass
class FastReport:
    """What `FastPath.apply` did: technique -> "on" / "off" / "skipped: why", and the checks."""

    applied: dict[str, str] = field(default_factory=dict)
    checks: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


class FastPath:
    """Applies `FastOptions` to an Engine: its existing pipelines now, the ones it derives later
    through the engine's `pipeline_hooks`. An Engine applies its `speed` preset itself."""

    def __init__(self, options: FastOptions | None = None, **overrides):
        options = options or FastOptions()
        self.options = replace(options, **overrides) if overrides else options
        self.prompt_cache: PromptCache | None = None
        self.report = FastReport()
        self._done: set[tuple[str, int]] = set()
        self._engine = None

    @classmethod
    def preset(cls, name: str, device: str = "cpu", family: str | None = None,
               **overrides) -> "FastPath":
        """`default`: the exact techniques only (prompt cache, channels_last, SDPA).
        `fastest`: also half precision where it pays, the family's tiny VAE (a download unless
        `tiny_vae=` names a local one) and, on CUDA, `torch.compile` of the UNet."""
        if name == "default":
            options = FastOptions()
        elif name == "fastest":
            options = FastOptions(
                dtype=half_dtype_for(device),
                tiny_vae=TINY_VAE.get(family or "sd15"),
                compile_unet=device.startswith("cuda"),
            )
        else:
            raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
        return cls(options, **overrides)

    # -- applying -----------------------------------------------------------------------

    def apply(self, engine) -> FastReport:
        opts = self.options
        self._engine = engine
        rep = self.report
        start = time.perf_counter()

        if opts.dtype:
            dtype = pick_dtype(opts.dtype, engine.device)
            for pipe in list(engine.pipelines()):
                pipe.to(dtype=dtype)
            engine.dtype = dtype  # components the engine loads later follow
            rep.applied["dtype"] = str(dtype).removeprefix("torch.")
        else:
            rep.applied["dtype"] = f"off ({str(engine.dtype).removeprefix('torch.')})"

        self._tiny = self._fp16_vae = None
        earlier = engine.__dict__.get("_fast_paths", [])
        if opts.tiny_vae is not None:
            self._tiny = self._load_vae(engine, opts.tiny_vae, "tiny_vae", tiny=True)
            rep.applied["tiny_vae"] = _name(opts.tiny_vae)
        else:
            rep.applied["tiny_vae"] = "off"
        if opts.fp16_vae is not None and opts.tiny_vae is None:
            if not engine.family.sdxl_like:
                rep.applied["fp16_vae"] = "skipped: only the SDXL family upcasts its VAE"
            else:
                self._fp16_vae = self._load_vae(engine, opts.fp16_vae, "fp16_vae", tiny=False)
                self._fp16_vae.register_to_config(force_upcast=False)
                rep.applied["fp16_vae"] = _name(opts.fp16_vae)
        else:
            rep.applied["fp16_vae"] = "off" if opts.fp16_vae is None else \
                "skipped: the tiny VAE replaces it"

        if opts.prompt_cache:
            shared = [p.prompt_cache for p in earlier if p.prompt_cache is not None]
            self.prompt_cache = shared[0] if shared else PromptCache(opts.prompt_cache_size)
        rep.applied["prompt_cache"] = "on" if opts.prompt_cache else "off"
        rep.applied["channels_last"] = "on" if opts.channels_last else "off"
        rep.applied["sdpa"] = "on" if opts.sdpa else "off"

        if opts.compile_unet:
            if opts.compile_cache_dir:
                os.makedirs(opts.compile_cache_dir, exist_ok=True)
                os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", opts.compile_cache_dir)
            try:
                import torch._inductor.config as inductor_config

                inductor_config.fx_graph_cache = True
            except Exception:  # noqa: BLE001 - the cache is an optimisation only
                pass
            rep.applied["compile_unet"] = f"on (mode={opts.compile_mode or 'default'})"
        else:
            rep.applied["compile_unet"] = "off"

        paths = engine.__dict__.setdefault("_fast_paths", [])
        paths.append(self)
        for pipe in list(engine.pipelines()):
            self.prepare(pipe)
        engine.pipeline_hooks.append(self.prepare)  # pipelines the engine makes later
        engine._fast_path = self
        rep.seconds["apply"] = time.perf_counter() - start

        if opts.compile_unet and opts.warmup:
            rep.seconds["warmup"] = self.warm_up(engine, opts.warmup)
        return rep

    def _load_vae(self, engine, ref, field_name: str, tiny: bool):
        from diffusers import AutoencoderKL, AutoencoderTiny

        if isinstance(ref, torch.nn.Module):
            module = ref
        else:
            module = engine.component(AutoencoderTiny if tiny else AutoencoderKL, str(ref),
                                      field_name)
        return module.to(engine.device, engine.dtype).eval()

    def prepare(self, pipe) -> None:
        """Apply the options to one pipeline (idempotent: shared modules are done once)."""
        opts = self.options
        engine = self._engine
        if opts.dtype and engine is not None:
            for module in _modules(pipe):
                if module.dtype != engine.dtype and self._first("dtype", module):
                    module.to(dtype=engine.dtype)
        vae = self._tiny or self._fp16_vae
        if vae is not None and getattr(pipe, "vae", None) is not None and pipe.vae is not vae:
            pipe.vae = vae
        if opts.prompt_cache and self.prompt_cache is not None:
            self.prompt_cache.wrap(pipe)
        if opts.sdpa:
            for module in (getattr(pipe, "unet", None), getattr(pipe, "vae", None),
                           getattr(pipe, "controlnet", None)):
                if module is not None and self._first("sdpa", module):
                    self.report.checks.setdefault("sdpa", {}).update(ensure_sdpa(module))
        if opts.channels_last:
            for name in ("unet", "vae", "controlnet", "adapter"):
                module = getattr(pipe, name, None)
                if isinstance(module, torch.nn.Module) and self._first("channels_last", module):
                    module.to(memory_format=torch.channels_last)
        if opts.compile_unet:
            unet = getattr(pipe, "unet", None)
            if unet is not None and self._first("compile", unet):
                unet.compile(mode=opts.compile_mode, dynamic=False)

    def _first(self, what: str, module) -> bool:
        key = (what, id(module))
        if key in self._done:
            return False
        self._done.add(key)
        return True

    def warm_up(self, engine, shapes) -> float:
        """Run each (width, height, batch) once so compilation happens now, not on a request."""
        from .tasks import Txt2ImgRequest

        start = time.perf_counter()
        for width, height, batch in shapes:
            engine.generate(Txt2ImgRequest(prompt="warm-up", steps=1, seed=0, width=width,
                                           height=height, num_images=batch))
        return time.perf_counter() - start


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


def cfg_batch(pipe, guidance: float, **call) -> int:
    """The batch the UNet sees for one image at `guidance`: 1 when classifier-free guidance is
    off (diffusers' `guidance_scale > 1` rule), 2 when it doubles the batch."""
    seen: list[int] = []
    handle = pipe.unet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(int((args[0] if args else
                                                       kwargs["sample"]).shape[0])),
        with_kwargs=True)
    try:
        with torch.inference_mode():
            pipe(guidance_scale=guidance, num_inference_steps=1, output_type="latent", **call)
    finally:
        handle.remove()
    return seen[0]
