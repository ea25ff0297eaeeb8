"""OpenVINO for the UNet and the VAE decoder on a CPU (optional: `pip install fewstep[openvino]`).

On two AMD EPYC cores OpenVINO's CPU plugin runs the float32 SD1.5 UNet about 2.2x and the VAE
decoder about 1.4x faster than torch at 256x256 (with the upsampling below), at differences of
1e-5 (`benchmarks/README.md`).

How it is used, and why:

* The base UNet (with its LCM-LoRA fused) and the VAE's decoder are converted once per declared
  image size (`compile_shapes`, else the family's native size), batch left dynamic. The size
  stays fixed in each converted model: diffusers' UNet takes size-dependent Python branches
  (upsample sizes) that a trace would freeze.
* The converted models are kept on disk (IR files, and OpenVINO's compiled blobs), keyed by a
  fingerprint of the weights, so the next process start skips the conversion.
* A one-shot command compiles each part at its first call, for that call's batch (a static
  shape), when the cache holds that shape's blob: OpenVINO prepares a model of free batch at its
  first inference (4.3 s of the SD1.5 UNet's first 5.3 s at 256x256 on two cores), a static one when it
  compiles, which the blob keeps. Its first run writes those blobs after its output.
* OpenVINO keeps the weights as constants. A request with a LoRA stack (written into torch's
  weights in place) or with ControlNet / T2I-Adapter residuals, an undeclared size or a longer
  prompt embedding runs on torch, at once: the converted models serve the base model only.
* Their 2x upsamplings (nearest, then a 3x3 convolution) are converted as four 2x2
  convolutions (`fewstep.accel.subpixel`): the same function in 4/9 of those layers' work,
  15-17 % off the decoder and 4-13 % off a UNet step, as measured.
* `f32` keeps the recipe's pictures (within 1e-4); `bf16` (the `fastest` preset, on CPUs with
  AVX512-BF16 or AMX) is approximate, as torch's bf16 is.
"""

from __future__ import annotations

import hashlib
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import torch

from ..config import OpenVINOMode
from ..locale_guard import keeping_locale
from ..pages import release_clean_file_pages, releasing_blob_pages
from .subpixel import rewritten_upsampling

MODES = get_args(OpenVINOMode)
# in the keys of the converted UNets and decoders: their graphs run each 2x upsampling as four
# 2x2 convolutions (`subpixel`), so a cache converted before holds other graphs
_GRAPH = "+upsampling:phases"
HOOK_NAME = "fewstep.openvino"  # in diffusers' hook registry of the UNet and the VAE decoder
# the UNet keyword arguments a converted model cannot take (it has no inputs for them)
_UNET_EXTRAS = ("class_labels", "timestep_cond", "attention_mask", "down_block_additional_residuals",
                "mid_block_additional_residual", "down_intrablock_additional_residuals",
                "encoder_attention_mask")


def available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def choose(mode: str, preset: str, device: str, half: str | None) -> tuple[str | None, str]:
    """The OpenVINO precision to use (`f32` / `bf16`, or None) and why.

    `auto`: on a CPU, for the `auto` and `fastest` presets, when the package is installed.
    `on`: as auto for every preset but `off`, and an error where it cannot run. `int8`: as
    `on`, the weights compressed to 8 bits (`weights_for`)."""
    from ..errors import InvalidRequest

    if mode not in MODES:
        raise InvalidRequest(f"openvino must be one of {', '.join(MODES)}; got {mode!r}",
                             field="openvino")
    if mode == "off" or preset == "off":
        return None, "off"
    if not device.startswith("cpu"):
        if mode in ("on", "int8"):
            raise InvalidRequest(f"openvino: runs on a CPU only; the device is {device!r}",
                                 field="openvino")
        return None, "off (not a CPU)"
    if mode == "auto" and preset not in ("auto", "fastest"):
        return None, f"off (speed {preset})"
    if not available():
        if mode in ("on", "int8"):
            raise InvalidRequest("openvino: the openvino package is not installed "
                                 "(pip install 'fewstep[openvino]')", field="openvino")
        return None, "off (package not installed)"
    if mode == "int8" and not int8_available():
        raise InvalidRequest("openvino int8: compressing weights needs NNCF "
                             "(pip install 'fewstep[int8]')", field="openvino")
    return ("bf16" if preset == "fastest" and half == "bf16" else "f32"), "on"


def int8_available() -> bool:
    try:
        import nncf  # noqa: F401
    except ImportError:
        return False
    return True


def weights_for(mode: str, preset: str, half: str | None) -> str | None:
    """"int8" when the converted weights are compressed to 8 bits (NNCF, asymmetric, per
    channel): asked for (`--openvino int8`), or the `fastest` preset on a CPU without bf16
    (there int8 weights are the faster; with bf16, bf16 alone is, measured in the README),
    when NNCF is installed. None: the weights as converted."""
    if mode == "int8":
        return "int8"
    if preset == "fastest" and half != "bf16" and mode != "off" and int8_available():
        return "int8"
    return None


def fingerprint(module: torch.nn.Module) -> str:
    """A cheap digest of a module's weights: names, shapes, dtypes and 32 values spread over
    each tensor. A fine-tuned model or another fused LoRA changes nearly every value, so it
    changes the digest; hashing every byte of a 3.4 GB UNet would take seconds."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        if "lora_" in name:  # peft adapter layers are switched off in a converted model
            continue
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // 32)
        name = name.replace(".base_layer.", ".")  # a layer peft wrapped holds the same weight
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(flat[::step][:32].to(torch.float32).cpu().numpy().tobytes())
    return digest.hexdigest()[:20]


class _UNetGraph(torch.nn.Module):
    """The UNet call a converted model holds: positional tensors only."""

    def __init__(self, unet, sdxl: bool):
        super().__init__()
        self.unet = unet
        self.sdxl = sdxl

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None):
        added = {"text_embeds": text_embeds, "time_ids": time_ids} if self.sdxl else None
        # the class's forward: the instance's is routed by a hook once the models are converted
        return type(self.unet).forward(self.unet, sample, timestep, encoder_hidden_states,
                                       added_cond_kwargs=added, return_dict=False)[0]


class _DecoderGraph(torch.nn.Module):
    """The VAE's decoder module (the 1x1 post-quant convolution before it stays in torch)."""

    def __init__(self, decoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, z):
        return type(self.decoder).forward(self.decoder, z)


class _TextGraph(torch.nn.Module):
    """A CLIP text encoder call: its first output (the last hidden state, or the projected
    text embedding of an encoder with a projection) and the penultimate hidden state (what
    SDXL pipelines take)."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids):
        out = type(self.encoder).forward(self.encoder, input_ids, output_hidden_states=True,
                                         return_dict=True)
        return out[0], out.hidden_states[-2]


@dataclass
class _Converted:
    """One converted part at one size: its infer request and the input shapes it takes."""

    request: Any  # None: compiled at its first call (a one-shot command), from `path`
    shapes: tuple  # per input: the shape without the batch dimension
    ran: bool = False  # its first call (which copies the weights into OpenVINO's layouts) done
    path: Path | None = None  # the IR
    batch: int | None = None  # the batch a static compile fixed; None: any batch
    wanted: Any = None  # the _Wanted it was made for


@dataclass
class _Wanted:
    """A part to convert: what it is called, its cache key and size, and how to trace it."""

    part: str  # "unet", "decoder", "text_encoder", "text_encoder_2"
    key: str
    size: tuple[int, int] | None  # (width, height); None for text encoders
    make: Any  # () -> the module to trace
    inputs: Any  # () -> example inputs
    table: dict
    slot: Any  # the key of its converted model in `table`
    needs_bake: bool = False  # torch's weights must hold the LCM-LoRA first

    @property
    def label(self) -> str:
        return self.part if self.size is None else f"{self.part}_{self.size[0]}x{self.size[1]}"


@dataclass
class OpenVINOParts:
    """Converts the base UNet, the VAE's decoder and the text encoders, and routes the calls
    that fit them. With `build=False` only what the cache holds is used (a one-shot command:
    converting would not pay back within its call); `build_missing` converts the rest."""

    precision: str  # "f32" / "bf16"
    sizes: tuple[tuple[int, int], ...]  # (width, height) in pixels
    # warmed at start-up (a first call at a batch size prepares its kernels); none for a
    # one-shot command: its own first call does that, and a warm-up call would be one more
    batches: tuple[int, ...] = (1,)
    cache_dir: Path | None = None
    decoder: bool = True
    text: bool = True
    weights: str | None = None  # "int8": the UNet's, text encoders' and a tiny VAE's compressed
    tiny_decoder: bool = False  # the decoder is a tiny VAE's (compressed with `weights`)
    unet_models: dict[tuple[int, int], _Converted] = field(default_factory=dict)
    vae_models: dict[tuple[int, int], _Converted] = field(default_factory=dict)
    text_models: dict[str, _Converted] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=lambda: {
        "unet": 0, "unet_torch": 0, "vae": 0, "vae_torch": 0, "text": 0, "text_torch": 0})
    seconds: dict[str, float] = field(default_factory=dict)
    cached: dict[str, bool] = field(default_factory=dict)
    missing: list = field(default_factory=list)  # the _Wanted parts not built yet
    # the batches each part's calls had on torch (a one-shot command's first run), by
    # (part, slot): what its compiled blobs are made for
    seen: dict = field(default_factory=dict)
    hooks: list = field(default_factory=list)  # the modules whose calls are routed here
    # the fixed-shape IRs compiled (or prepared) for a one-shot command: `ahead.remember`
    compiled_static: list = field(default_factory=list)
    released_bytes: int = 0  # resident pages of mapped weight files given back

    def install(self, engine, build: bool = True, progress=None) -> str:
        """Load what the cache holds, convert the rest when `build`, and route the base
        pipeline's calls that fit through the converted models. Returns what was done, for
        the FastPath report. `progress(line)` hears about each part as it is built."""
        import openvino as ov

        self._core = ov.Core()
        cache = Path(self.cache_dir).expanduser() if self.cache_dir else None
        if cache is not None:
            cache.mkdir(parents=True, exist_ok=True)
            # one blob folder per precision: OpenVINO's blob cache served a float32 blob to a
            # bf16 compile of the same IR (NaN images on an AMX CPU)
            self._core.set_property({"CACHE_DIR": str(cache / "blobs" / self.precision)})
        self._cache = cache
        self._scale = engine.base.vae_scale_factor
        self._config = {"INFERENCE_PRECISION_HINT": self.precision,
                        # the same threads as torch: the user's setting holds for both
                        "INFERENCE_NUM_THREADS": torch.get_num_threads()}
        wanted_parts = self._wanted(engine)
        self._release()  # the pages its keys were read from
        if not build:  # a one-shot command: what was compiled ahead for other weights goes
            from .. import ahead

            ahead.keep_only([self._path(wanted) for wanted in wanted_parts])
        for wanted in wanted_parts:
            if not build and self._in_cache(wanted):
                self._defer(wanted)  # compiled at its first call, for that call's batch
            elif self._path(wanted).exists() or build:
                self._build(engine, wanted, progress)
            else:
                self.missing.append(wanted)
        self.hooks = self._route(engine)
        engine.serve_without_torch(self.serves)
        self._release()
        return self.describe()

    def _compressed(self, wanted: _Wanted) -> bool:
        if self.weights != "int8":
            return False
        return wanted.part != "decoder" or self.tiny_decoder  # a full VAE gains nothing

    def describe(self) -> str:
        parts = ["unet"] + (["vae decoder"] if self.decoder else []) + \
            (["text encoder"] if self.text else [])
        if self.weights:
            parts[0] = f"unet ({self.weights} weights)"
        sizes = ", ".join(f"{w}x{h}" for w, h in self.sizes)
        not_yet = f"; not prepared yet: {', '.join(w.label for w in self.missing)}" \
            if self.missing else ""
        return f"on ({self.precision}; {' + '.join(parts)}; {sizes}; " \
               f"cache={self._cache or 'none'}{not_yet})"

    def build_missing(self, engine, progress=None, load: bool = True) -> None:
        """Convert and load what `install(build=False)` left out. `load=False`: only write
        the cache (the converted model and its compiled blob) for the next process, as a
        one-shot command does after its output: nothing is kept in memory or run."""
        missing, self.missing = self.missing, []
        # converting and compiling runs no call: the pages of the IR and blob it reads are
        # given back as it goes (the peak of a cold command's preparing: 13.0 GB -> 10-12 GB)
        with releasing_blob_pages():
            for wanted in missing:
                batches = () if load else sorted(self.seen.get((wanted.part, wanted.slot), ()))
                self._build(engine, wanted, progress, load=load, static=batches)
        self._release()

    def write_static(self, batch: int = 1) -> list[str]:
        """Compile every converted part into the cache for calls of `batch` (the UNet's batch:
        the images a call makes, twice that under classifier-free guidance; text encoders take
        one prompt), as a one-shot command's first call looks for them (`fewstep prepare`).
        Returns the parts compiled now."""
        done = []
        with releasing_blob_pages():
            for table in (self.text_models, self.unet_models, self.vae_models):
                for converted in table.values():
                    if converted.wanted is None or converted.path is None:
                        continue  # not kept in a cache
                    arrays = self._example(converted.wanted,
                                           1 if table is self.text_models else batch)
                    if not self._static_marker(converted.path, arrays).exists():
                        self._compile_static(converted.path, arrays)
                        done.append(converted.wanted.label)
        self._release()
        return done

    def _release(self) -> None:
        """The compiled models have copied their weights: the mapped blobs (and the weight
        files read for the keys) need not stay resident."""
        self.released_bytes += release_clean_file_pages()

    # -- what to convert ---------------------------------------------------------------------

    def _wanted(self, engine) -> list[_Wanted]:
        """Every part at every size, keyed by the weights it is converted from. The UNet's key
        is taken from torch's weights as loaded, and the LCM-LoRA the engine bakes into them,
        so a warm start finds the converted UNet without baking anything."""
        base = engine.base
        unet, decoder = base.unet, base.vae.decoder
        sdxl = engine.family.sdxl_like
        scale = base.vae_scale_factor
        lcm = "" if engine.baked else f"+lcm:{engine.pending_lcm}"
        unet_key = _digest(fingerprint(unet) + lcm + _GRAPH)
        wanted = []
        for width, height in self.sizes:
            latent = (height // scale, width // scale)
            wanted.append(_Wanted(
                "unet", unet_key, (width, height), lambda: _UNetGraph(unet, sdxl),
                lambda latent=latent: _unet_inputs(unet, latent, sdxl), self.unet_models,
                latent, needs_bake=not engine.baked))
            if self.decoder:
                channels = base.vae.config.latent_channels
                wanted.append(_Wanted(
                    "decoder", _digest(fingerprint(decoder) + _GRAPH), (width, height),
                    lambda: _DecoderGraph(decoder),
                    lambda latent=latent: (torch.zeros(1, channels, *latent),),
                    self.vae_models, latent))
        if self.text:
            for name in ("text_encoder", "text_encoder_2"):
                encoder = getattr(base, name, None)
                if encoder is None:
                    continue
                length = getattr(getattr(base, name.replace("text_encoder", "tokenizer"),
                                         None), "model_max_length", 77)
                wanted.append(_Wanted(
                    name, fingerprint(encoder), None, lambda encoder=encoder:
                    _TextGraph(encoder), lambda length=length: (
                        torch.zeros(1, length, dtype=torch.int64),),
                    self.text_models, name))
        return wanted

    def _path(self, wanted: _Wanted) -> Path:
        import openvino as ov

        version = ov.__version__.split("-")[0]
        size = "" if wanted.size is None else f"-{wanted.size[0]}x{wanted.size[1]}"
        weights = "-int8" if self._compressed(wanted) else ""
        name = f"{wanted.part}{size}-{wanted.key}{weights}-ov{version}.xml"
        return (self._cache / name) if self._cache is not None else Path(os.devnull)

    def _in_cache(self, wanted: _Wanted) -> bool:
        path = self._path(wanted)
        return self._cache is not None and path.exists() and path.with_suffix(".bin").exists()

    def _defer(self, wanted: _Wanted) -> None:
        """Take a cached part without compiling it yet: its first call compiles it."""
        wanted.table[wanted.slot] = _Converted(None, _shapes(wanted.inputs()),
                                               path=self._path(wanted), wanted=wanted)
        self.cached[wanted.label] = True

    def _build(self, engine, wanted: _Wanted, progress, load: bool = True,
               static: tuple[int, ...] = ()) -> None:
        """Convert `wanted` (unless cached), compile it and, with `load`, take it for calls
        (warmed at `self.batches`). Without `load`, only the cache is written: its compiled
        blob of free batch, and one for each batch in `static` (what a one-shot command's
        first call looks for)."""
        import openvino as ov

        start = time.perf_counter()
        path = self._path(wanted)
        hit = self._in_cache(wanted)
        inputs = wanted.inputs()
        if hit:
            model = path
        else:
            if progress is not None:
                progress(f"converting the {_TITLES[wanted.part]}"
                         + (f" for {wanted.size[0]}x{wanted.size[1]}" if wanted.size else "")
                         + " to OpenVINO (once: kept in the cache)")
            if wanted.needs_bake:
                engine.bake()  # converted with the LCM-LoRA in its weights
            shapes = [ov.PartialShape([-1, *x.shape[1:]]) if x.dim() else ov.PartialShape([])
                      for x in inputs]
            types = [ov.Type.i64 if x.dtype == torch.int64 else ov.Type.f32 for x in inputs]
            graph = wanted.make()
            with torch.no_grad(), warnings.catch_warnings(), rewritten_upsampling(graph):
                # the trace's shape branches: the size is fixed per model; the batch-dependent
                # ones in diffusers' upsampling only choose a memory layout
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                model = ov.convert_model(graph, example_input=inputs,
                                         input=list(zip(shapes, types)))
            if self._compressed(wanted):
                import nncf

                # 8-bit weights, asymmetric per output channel: the least loss of NNCF's
                # data-free modes; decompressed to the compute precision as the model runs
                model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
            if self._cache is not None:
                model = _save(model, path)
        # from the file's path: only then does OpenVINO reuse its compiled blob (seconds, not
        # the half minute a UNet takes to compile), and the weights stay mapped from the file
        compiled = self._compile(model)
        if load:
            request = compiled.create_infer_request()
            converted = _Converted(request, _shapes(inputs),
                                   path=path if self._cache is not None else None,
                                   wanted=wanted)
            batches = self.batches if wanted.size is not None else self.batches[:1]
            for batch in batches:
                request.infer([_batched(x, batch).numpy() for x in inputs])
                converted.ran = True
            wanted.table[wanted.slot] = converted
            self.cached[wanted.label] = hit
        # else compiling from the file wrote the blob, which the next start imports for calls
        # of any batch (a service's, a command's of another batch)
        del compiled, model
        if not load and self._cache is not None:
            self._release()
            for batch in static:  # and the shapes a one-shot command's first call looks for
                self._compile_static(path, self._example(wanted, batch))
        self._release()  # before the next part's weights come in: a lower peak
        self.seconds[wanted.label] = round(time.perf_counter() - start, 2)
        if progress is not None and not hit:
            progress(f"{_TITLES[wanted.part]} ready in {self.seconds[wanted.label]:.0f} s")

    # -- static shapes: a one-shot command's compile -------------------------------------

    @staticmethod
    def _example(wanted: _Wanted, batch: int) -> list:
        return [_batched(x, batch).numpy() for x in wanted.inputs()]

    def _static_marker(self, path: Path, arrays) -> Path:
        """An empty file saying the cache holds the blob of the IR `_static_ir(path, arrays)`
        (written once the compile that makes it is done)."""
        return self._cache / "blobs" / self.precision / f"{self._static_ir(path, arrays).stem}.ok"

    @staticmethod
    def _static_ir(path: Path, arrays) -> Path:
        """The IR at `path` with its inputs fixed to the shapes of `arrays`."""
        shape = "_".join("x".join(map(str, a.shape)) or "s" for a in arrays)
        return path.with_name(f"{path.stem}.{shape}.xml")

    def _compile(self, model):
        """Compile `model` (an IR's path, or a model in memory) with this engine's settings,
        keeping the process's locale (`fewstep.locale_guard`)."""
        with keeping_locale():
            return self._core.compile_model(str(model) if isinstance(model, Path) else model,
                                            "CPU", self._config)

    def _compile_static(self, path: Path, arrays):
        """Compile the IR at `path` for exactly the shapes of `arrays`, into the blob cache.
        Written as an IR of its own (its .bin a link to the weights of `path`): OpenVINO
        reuses a blob without reading the weights only for a model compiled from its file
        (from a reshaped model in memory it hashes all of them: 10.3 GB peak against 6.9)."""
        from .. import ahead

        static = self._static_ir(path, arrays)
        blobs = self._static_marker(path, arrays).parent
        entry = {"ir": str(static), "settings": self._config, "blobs": str(blobs),
                 "part": path.name.split("-")[0], "batch": int(arrays[0].shape[0])}
        if entry not in self.compiled_static:
            self.compiled_static.append(entry)  # what the same command compiles ahead next
        compiled = ahead.take(static, self._config)  # compiled while the command started
        if compiled is not None:
            return compiled
        if not (static.exists() and static.with_suffix(".bin").exists()):
            model = self._core.read_model(str(path))
            model.reshape({i: list(a.shape) for i, a in enumerate(arrays)})
            _save(model, static, weights=path.with_suffix(".bin"))
            del model
        compiled = self._compile(static)
        self._static_marker(path, arrays).touch()
        return compiled

    def _compile_at_call(self, converted: _Converted, arrays) -> None:
        """A deferred part's first call, or a call of another batch than its static compile:
        compiled for this call's shapes when the cache holds that blob, else for any batch
        (the IR's own blob, or a fresh compile)."""
        start = time.perf_counter()
        if converted.request is None and self._static_marker(converted.path, arrays).exists():
            with releasing_blob_pages():
                compiled = self._compile_static(converted.path, arrays)
            converted.batch = arrays[0].shape[0]
        else:
            compiled = self._compile(converted.path)
            converted.batch = None
        converted.request = compiled.create_infer_request()
        converted.ran = False
        if converted.wanted is not None:
            self.seconds[converted.wanted.label] = round(time.perf_counter() - start, 2)

    # -- running ------------------------------------------------------------------------

    def _results(self, converted: _Converted, tensors):
        arrays = _arrays(tensors)
        if converted.request is None or converted.batch not in (None, arrays[0].shape[0]):
            self._compile_at_call(converted, arrays)
        results = converted.request.infer(arrays)
        if not converted.ran:  # not warmed up (a one-shot command): its first call just
            converted.ran = True  # copied the weights; their mapped pages are not read again
            # (not given back while it copies: a warm command doing so took 19.8 s inside
            # `fewstep bench`, whose own process holds GBs, against 15 s alone -- dropped pages
            # may leave the page cache and be read from disk again; kept, it peaks at 6.7 GB)
            self._release()
        return results

    def _infer(self, converted: _Converted, tensors) -> torch.Tensor:
        out = self._results(converted, tensors)[0]
        return torch.from_numpy(out.copy())  # the request reuses its output buffer

    def _infer_all(self, converted: _Converted, tensors) -> list[torch.Tensor]:
        results = self._results(converted, tensors)
        return [torch.from_numpy(results[i].copy()) for i in range(len(results))]

    # -- which calls are served ---------------------------------------------------------

    def serves(self, call) -> bool:
        """Whether every UNet call of a planned pipeline call runs on a converted model (so
        torch's base UNet is not run): the base model's own tasks, no LoRA stack, no
        component, a converted size."""
        if call.task not in ("txt2img", "img2img", "inpaint") or call.loras or call.components:
            return False
        return (call.height // self._scale, call.width // self._scale) in self.unet_models

    # -- routing ------------------------------------------------------------------------

    def _route(self, engine) -> list:
        """Named hooks in diffusers' hook registry on the UNet, the VAE's decoder and the text
        encoders: a call that fits a converted model runs there, any other runs the module's
        own forward. `remove()` takes them off again."""
        from diffusers.hooks import HookRegistry, ModelHook

        parts = self
        sdxl = engine.family.sdxl_like

        class UNetHook(ModelHook):
            def new_forward(self, module, sample, timestep, encoder_hidden_states, *args,
                            **kwargs):
                converted = None if args else parts._unet_for(engine, sample, timestep,
                                                              encoder_hidden_states, kwargs)
                if converted is None:
                    if not engine.lcm_applied:  # never torch's weights without the LCM-LoRA
                        raise RuntimeError("the base UNet ran on torch without its LCM-LoRA")
                    parts.calls["unet_torch"] += 1
                    return self.fn_ref.original_forward(sample, timestep, encoder_hidden_states,
                                                        *args, **kwargs)
                parts.calls["unet"] += 1
                feed = [sample, timestep.reshape(()), encoder_hidden_states]
                if sdxl:
                    added = kwargs["added_cond_kwargs"]
                    feed += [added["text_embeds"], added["time_ids"]]
                out = parts._infer(converted, feed).to(sample.dtype)
                if kwargs.get("return_dict", True):
                    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

                    return UNet2DConditionOutput(sample=out)
                return (out,)

        class DecoderHook(ModelHook):
            def new_forward(self, module, z, *args, **kwargs):
                converted = None if args or kwargs.get("latent_embeds") is not None \
                    else parts._vae_for(z)
                if converted is None:
                    parts.calls["vae_torch"] += 1
                    return self.fn_ref.original_forward(z, *args, **kwargs)
                parts.calls["vae"] += 1
                return parts._infer(converted, [z]).to(z.dtype)

        def text_hook(name: str):
            class TextHook(ModelHook):
                def new_forward(self, module, input_ids, *args, **kwargs):
                    converted = parts._text_for(engine, name, input_ids, args, kwargs)
                    if converted is None:
                        parts.calls["text_torch"] += 1
                        return self.fn_ref.original_forward(input_ids, *args, **kwargs)
                    parts.calls["text"] += 1
                    first, penultimate = parts._infer_all(converted, [input_ids])
                    dtype = module.dtype
                    first, penultimate = first.to(dtype), penultimate.to(dtype)
                    # hidden states: only the penultimate is known ([-1] would be wrong)
                    hidden = (penultimate, None)
                    if kwargs.get("return_dict") is False:
                        return (first, None, hidden)
                    return _text_output(module, first, hidden)

            return TextHook()

        hooks = [(engine.base.unet, UNetHook()), (engine.base.vae.decoder, DecoderHook())]
        if self.text:
            hooks += [(getattr(engine.base, name), text_hook(name))
                      for name in ("text_encoder", "text_encoder_2")
                      if getattr(engine.base, name, None) is not None]
        for module, hook in hooks:
            HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, HOOK_NAME)
        return [module for module, _ in hooks]

    def remove(self) -> None:
        """Route every call to torch again: the named hooks are taken off."""
        from diffusers.hooks import HookRegistry

        for module in getattr(self, "hooks", []):
            HookRegistry.check_if_exists_or_initialize(module).remove_hook(HOOK_NAME,
                                                                           recurse=False)
        self.hooks = []

    def _saw(self, part: str, slot, tensor) -> None:
        """A call a missing part would have served: its batch is one to compile it for."""
        self.seen.setdefault((part, slot), set()).add(int(tensor.shape[0]))

    def _unet_for(self, engine, sample, timestep, embeds, kwargs) -> _Converted | None:
        if engine.current_loras:  # torch's weights hold another stack than the converted ones
            return None
        if any(kwargs.get(name) is not None for name in _UNET_EXTRAS):
            return None
        if kwargs.get("cross_attention_kwargs"):
            return None
        if sample.dim() != 4 or sample.device.type != "cpu":
            return None
        converted = self.unet_models.get(tuple(sample.shape[-2:]))
        if converted is None:
            self._saw("unet", tuple(sample.shape[-2:]), sample)
            return None
        if not torch.is_tensor(timestep) or timestep.numel() != 1:
            return None
        shapes = [tuple(sample.shape[1:]), tuple(embeds.shape[1:])]
        expected = [converted.shapes[0], converted.shapes[2]]
        if engine.family.sdxl_like:
            added = kwargs.get("added_cond_kwargs") or {}
            if set(added) != {"text_embeds", "time_ids"}:
                return None
            shapes += [tuple(added["text_embeds"].shape[1:]), tuple(added["time_ids"].shape[1:])]
            expected += [converted.shapes[3], converted.shapes[4]]
        elif kwargs.get("added_cond_kwargs"):
            return None
        return converted if shapes == expected else None

    def _vae_for(self, z) -> _Converted | None:
        if z.dim() != 4 or z.device.type != "cpu":
            return None
        converted = self.vae_models.get(tuple(z.shape[-2:]))
        if converted is None:
            self._saw("decoder", tuple(z.shape[-2:]), z)
            return None
        return converted if tuple(z.shape[1:]) == converted.shapes[0] else None

    def _text_for(self, engine, name: str, input_ids, args, kwargs) -> _Converted | None:
        if args or engine.current_loras:
            return None  # a stack may have written the text encoders' weights
        converted = self.text_models.get(name)
        if converted is None:
            if torch.is_tensor(input_ids) and input_ids.dim() == 2:
                self._saw(name, name, input_ids)
            return None
        if any(kwargs.get(k) is not None for k in ("attention_mask", "position_ids")):
            return None
        if kwargs.get("output_attentions"):
            return None
        if not torch.is_tensor(input_ids) or input_ids.dim() != 2 or \
                tuple(input_ids.shape[1:]) != converted.shapes[0]:
            return None
        return converted

def _unet_inputs(unet, latent: tuple[int, int], sdxl: bool) -> tuple[torch.Tensor, ...]:
    config = unet.config
    inputs = [torch.zeros(1, config.in_channels, *latent), torch.tensor(999.0),
              torch.zeros(1, 77, config.cross_attention_dim)]
    if sdxl:
        time_ids = 6  # original size, crop top-left, target size
        pooled = config.projection_class_embeddings_input_dim - \
            time_ids * config.addition_time_embed_dim
        inputs += [torch.zeros(1, pooled), torch.zeros(1, time_ids)]
    return tuple(inputs)


_TITLES = {"unet": "UNet", "decoder": "VAE decoder", "text_encoder": "text encoder",
           "text_encoder_2": "second text encoder"}


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _text_output(module, first, hidden):
    """What the text encoder's own forward returns, from the converted model's outputs."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    if hasattr(module, "text_projection"):  # CLIPTextModelWithProjection
        from transformers.models.clip.modeling_clip import CLIPTextModelOutput

        return CLIPTextModelOutput(text_embeds=first, hidden_states=hidden)
    return BaseModelOutputWithPooling(last_hidden_state=first, hidden_states=hidden)


def _shapes(inputs) -> tuple:
    """Each input's shape without the batch dimension (what `_Converted.shapes` holds)."""
    return tuple(tuple(x.shape[1:]) for x in inputs)


def _batched(x: torch.Tensor, batch: int) -> torch.Tensor:
    return x if x.dim() == 0 else x.expand(batch, *x.shape[1:]).contiguous()


def _arrays(tensors) -> list:
    return [t.detach().contiguous().numpy() if t.dtype == torch.int64
            else t.detach().to(torch.float32).contiguous().numpy() for t in tensors]


def _save(model, path: Path, weights: Path | None = None) -> Path:
    """Write the IR so that a reader never sees half a model: both files under temporary
    names first, the .xml (what a reader looks for) renamed last. `weights`: an IR's .bin
    that this model's weights should equal (the same model reshaped): linked rather than kept
    twice when they do (byte for byte)."""
    import openvino as ov

    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.xml")
    ov.save_model(model, str(tmp), compress_to_fp16=False)
    written = tmp.with_suffix(".bin")
    if weights is not None and _same_bytes(written, weights):
        linked = written.with_name(written.name + ".link")
        try:
            os.link(weights, linked)
        except OSError:  # a file system without hard links: keep the copy
            pass
        else:
            os.replace(linked, written)
    os.replace(written, path.with_suffix(".bin"))
    os.replace(tmp, path)
    return path


def _same_bytes(a: Path, b: Path, chunk: int = 1 << 24) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as one, open(b, "rb") as other:
        while True:
            left, right = one.read(chunk), other.read(chunk)
            if left != right:
                return False
            if not left:
                return True


def enough_memory(modules, copies: int) -> tuple[bool, str]:
    """Whether `copies` float32 copies of `modules`' weights (plus half again for converting)
    fit in the memory available now (Linux's MemAvailable: free memory and what the page cache
    can give back; elsewhere assumed)."""
    available = available_memory()
    if available is None:
        return True, ""
    need = sum(p.numel() * 4 for m in modules for p in m.parameters()) * (copies + 0.5)
    if available >= need:
        return True, ""
    return False, f"needs {need / 2**30:.1f} GiB available, {available / 2**30:.1f} GiB are"


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (MemAvailable), or None where unknown.
    Free memory (MemFree) is the wrong figure: the page cache keeps it near zero on any machine
    that has read files for a while, and gives its pages back on demand."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
