"""Building an Engine: the one owner of how an engine comes to be. Every entry point (the CLI,
the service, a Ray replica, the benchmark, the selftest, `reproduce`) and library code call
`build_engine`; nothing else loads a model.

    EngineOptions --inspect()--> Blueprint --checks--> load --> fast path --> Engine
    (what to build)  (configs and file headers   (weights, LCM-LoRA   (through the engine's
                      only: nothing is loaded)    baked, LoRAs and     public seam)
                                                  components)

Everything that configs and file headers allow is checked before anything expensive: the
device, the references (missing files, pickle formats), the family and whether `--family` fits
it, the LCM-LoRA and every LoRA against the model's layers (on a meta-device copy of the UNet
and text encoders: no memory, no weights), each component's kind and fit, and, for a one-shot
call planned against the blueprint, its sizes and images. Then the model loads; then the speed
techniques are applied, building ahead (compiling, converting) only what will run: the declared
shapes of a service, or exactly the calls of a one-shot command.

    >>> engine = build_engine(model="Lykon/dreamshaper-7")
    >>> engine = build_engine(EngineOptions(model="...", speed="fastest"), loras={"lora.0": ref})
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from .calls import ModelView, PipelineCall, plan_call
from .components import adapter_geometry, check_kind, kind_of, mismatch, read_config, \
    skeleton
from .config import EngineOptions, Settings, pick_device, pick_dtype
from .errors import InvalidRequest, ModelError
from .families import DEFAULT_FAMILY, Family, detect_family, family_by_name
from .loading import Ref, parse_ref, read_model_config, single_file_facts
from .lora import MOTION_LAYERS, LoraFile, check_fits, check_weight, read_lora, split_weight

# tasks whose pipeline call runs the base UNet itself, with no residuals: what building ahead
# (a compiled or converted UNet) can serve
BASE_UNET_TASKS = ("txt2img", "img2img", "inpaint")


@dataclass(frozen=True)
class LcmLora:
    ref: str | None  # None: the model is LCM-distilled (or the user asked for none)
    weight: float  # for images
    animate_weight: float  # for animations (the motion UNet is its own copy)


class Blueprint:
    """What an engine will be, learnt from configs and file headers: nothing is loaded. Made by
    `inspect(options)`; its checks (`check_lora`, `check_component`, `plan`) raise the same
    typed errors a loaded engine would, naming the option."""

    def __init__(self, options: EngineOptions, settings: Settings | None = None):
        from .logs import quiet_libraries

        quiet_libraries()  # building an engine keeps the libraries' chatter out, as the CLI does
        self.options = options
        self.settings = settings or Settings.from_env()
        self.device = pick_device(options.device)
        self.dtype = pick_dtype(options.dtype, self.device)
        self._openvino = _choose_openvino(options, self.device)
        self.config_ref = parse_ref(options.model_config_dir, "model_config") \
            if options.model_config_dir else None
        if self.config_ref is not None and self.config_ref.is_file:
            raise InvalidRequest(
                f"model_config {options.model_config_dir!r} is a file: it must be the diffusers "
                "folder (of the same family) whose configs a single-file model loads with; a "
                "settings file is for `fewstep serve --config`", field="model_config")
        for name in ("tiny_vae", "fp16_vae"):  # loaded with the fast path, after the model
            if getattr(options, name):
                parse_ref(getattr(options, name), name)
        chosen = family_by_name(options.family) if options.family else None
        model_text = options.model or (chosen or DEFAULT_FAMILY).default_model
        self.model_ref: Ref = parse_ref(model_text, "model")
        self.model_text = model_text
        self.unet_config = read_model_config(self.model_ref, self.config_ref, "unet")
        facts = single_file_facts(self.model_ref.path) if self.model_ref.path is not None \
            and self.model_ref.is_file else None
        self.family: Family = self._family(chosen, facts)
        if self.unet_config:
            self.inpaint_only = self.unet_config.get("in_channels") == 9
        else:
            self.inpaint_only = bool(facts and facts.in_channels == 9)
        vae_config = read_model_config(self.model_ref, self.config_ref, "vae")
        if self.unet_config and vae_config:
            scale = 2 ** (len(vae_config.get("block_out_channels", (0,) * 4)) - 1)
            self.native_size = int(self.unet_config.get("sample_size", 64)) * scale
        else:  # a single file without configs: its family's (the configs it will load with)
            self.native_size = self.family.native_size
        self.lcm = self._lcm()
        self._loras: dict[str, LoraFile] = {}
        self._components: dict[tuple[str, str], Any] = {}

    # -- what the options say -------------------------------------------------------------

    def _family(self, chosen: Family | None, facts) -> Family:
        if self.unet_config:
            detected = detect_family(self.unet_config)
        elif facts is not None:
            detected = family_by_name(facts.family)
        else:
            detected = None
        if chosen is None:
            return detected
        # SDXL and SSD-1B share a layout (choosing one for the other picks its LCM-LoRA); SD1.5
        # against either would fail deep inside the pipeline
        if detected is not None and detected.sdxl_like != chosen.sdxl_like:
            raise ModelError(f"family {chosen.name!r} does not fit {self.model_text!r}: its "
                             f"UNet is {detected.name}", field="family")
        return chosen

    def _lcm(self) -> LcmLora:
        ref, weight = split_weight(self.options.lcm_lora)
        weight = check_weight(1.0 if weight is None else weight, "lcm_lora")
        animate = check_weight(self.options.animate_lcm_weight, "animate_lcm_weight")
        if ref == "none":
            return LcmLora(None, weight, animate)
        ref = self.family.lcm_lora if ref == "auto" else ref
        parse_ref(ref, "lcm_lora")
        return LcmLora(ref, weight, animate)

    @property
    def openvino(self) -> tuple[str | None, str]:
        """(precision or None, why)."""
        return self._openvino

    # -- the model's layers, on the meta device -----------------------------------------------

    @functools.cached_property
    def _skeletons(self) -> dict[str, Any] | None:
        """The UNet and text encoders on the meta device, for LoRA and component checks; None
        for a single-file model without configs (checked once loaded, before any fast path)."""
        if not self.unet_config:
            return None
        from accelerate import init_empty_weights
        from diffusers import UNet2DConditionModel

        models: dict[str, Any] = {}
        with init_empty_weights():
            models["unet"] = UNet2DConditionModel.from_config(self.unet_config)
            for name in ("text_encoder", "text_encoder_2"):
                config = read_model_config(self.model_ref, self.config_ref, name)
                if config:
                    models[name] = _text_encoder(config)
        return models

    # -- checks --------------------------------------------------------------------------

    def lora(self, ref: str, field: str) -> LoraFile:
        """A LoRA read once (the engine reuses it) and checked against the model's layers."""
        if ref not in self._loras:
            self._loras[ref] = read_lora(ref, field)
        lora = self._loras[ref]
        skeletons = self._skeletons
        if skeletons is not None:
            # motion LoRAs target layers of the motion UNet, checked when an animation runs
            check_fits(lora, self.family.pipeline_class("txt2img"), skeletons,
                       unknown_ok=MOTION_LAYERS)
        return lora

    def check_lora(self, ref: str, field: str) -> None:
        self.lora(ref, field)

    def check_component(self, kind_name: str, ref_text: str, field: str | None = None) -> None:
        """A ControlNet, T2I-Adapter or motion adapter: of the kind asked for, of a task the
        family has, and fitting the UNet (from the configs)."""
        self._component(kind_name, ref_text, field or kind_name)

    def _component(self, kind_name: str, ref_text: str, field: str):
        kind = kind_of(kind_name, field)
        key = (kind.name, ref_text)
        if key in self._components:
            return self._components[key]
        if kind.task not in self.family.pipelines:
            raise ModelError(f"{field} {ref_text!r}: {self.family.title} models have no "
                             f"{kind.task} task", field=field)
        ref = parse_ref(ref_text, field)
        config = read_config(ref, field)
        check_kind(kind, ref, config, field)
        module = skeleton(kind, config)
        skeletons = self._skeletons
        if skeletons is not None:
            problem = mismatch(kind, module.config, skeletons["unet"].config, self.family)
            if problem:
                raise ModelError(f"{field} {ref_text!r} does not fit {self.model_text!r}: "
                                 f"{problem}", field=field)
        self._components[key] = module
        return module

    def _adapter_geometry(self, ref_text: str) -> tuple[int, int]:
        return adapter_geometry(self._component("adapter", ref_text, "adapter"))

    @property
    def view(self) -> ModelView:
        return ModelView(family=self.family, native_size=self.native_size,
                         inpaint_only=self.inpaint_only, settings=self.settings,
                         adapter_geometry=self._adapter_geometry, model_ref=self.model_text)

    def plan(self, request) -> PipelineCall:
        """Check `request` as the engine will (limits, sizes, images) and describe its pipeline
        call, before anything is loaded; its LoRAs and components are checked when the call is
        given to `build_engine`. The seed is drawn here when none was given: run the call
        itself (`engine.run`) to keep it."""
        return plan_call(request, self.view)


def _text_encoder(config: dict):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if "WithProjection" in str(
        (config.get("architectures") or [""])[0]) else CLIPTextModel
    return cls(CLIPTextConfig.from_dict(config))


def _choose_openvino(options: EngineOptions, device: str) -> tuple[str | None, str]:
    from .accel import PRESETS, half_dtype_for
    from .accel.openvino import choose

    if options.speed not in PRESETS:
        raise InvalidRequest(f"speed must be one of {', '.join(PRESETS)}; got {options.speed!r}",
                             field="speed")
    return choose(options.openvino, options.speed, device, half_dtype_for(device))


def inspect(options: EngineOptions | None = None, settings: Settings | None = None,
            **fields) -> Blueprint:
    """The blueprint of `options` (or of `fields`, as EngineOptions takes them): every check
    that configs and file headers allow, nothing loaded."""
    return Blueprint(_options(options, fields), settings)


def _options(options: EngineOptions | None, fields: dict) -> EngineOptions:
    from .config import load

    if options is None:
        return load(EngineOptions, {k: v for k, v in fields.items() if v is not None})
    if fields:
        return options.model_copy(update=fields)
    return options


# -- building -------------------------------------------------------------------------------

def build_engine(options: EngineOptions | Blueprint | None = None, /, *,
                 settings: Settings | None = None, loras: Mapping[str, str] | None = None,
                 components: Mapping[str, Mapping[str, str]] | None = None,
                 calls: Sequence[PipelineCall] | None = None, fast_path=None,
                 progress: Callable[[str], None] | None = None, **fields):
    """An Engine, ready to run requests.

    * `options`: an EngineOptions, a Blueprint from `inspect`, or None with the options as
      keyword `fields` (`build_engine(model="...", speed="fastest")`).
    * `loras`: {field named in errors: reference}: checked before loading, then loaded into the
      model's adapters, inactive (the service's catalogue; before any compiling, so a stack
      never changes a compiled graph).
    * `components`: {kind: {field: reference}} of ControlNets ("controlnet"), T2I-Adapters
      ("adapter") and motion adapters ("motion_adapter"): checked, then loaded.
    * `calls`: the pipeline calls a one-shot command will run (planned with the blueprint):
      only what they run is built ahead, and on a CPU only what the cache holds is used
      (converting would not pay back within the call: `prepare_next(engine)` converts the
      rest once the work is done). None: the declared shapes (`compile_shapes`, else the
      family's), converted now.
    * `progress(line)`: hears about each model converted or compiled ahead.
    * `fast_path`: a `fewstep.accel.FastPath` to apply instead of the `speed` preset (the
      benchmark's overrides)."""
    blueprint = options if isinstance(options, Blueprint) else \
        Blueprint(_options(options, fields), settings)
    loras = dict(loras or {})
    tables = {kind_of(kind).name: dict(table) for kind, table in (components or {}).items()}
    # every check before anything is loaded
    lcm = blueprint.lcm
    if lcm.ref is not None:
        blueprint.check_lora(lcm.ref, "lcm_lora")
    for field, ref in loras.items():
        blueprint.check_lora(ref, field)
    for kind, table in tables.items():
        for field, ref in table.items():
            blueprint.check_component(kind, ref, field)
    for call in calls or ():  # named as the request names them
        for i, (ref, _) in enumerate(call.loras):
            blueprint.check_lora(ref, f"loras.{i}")
        for name, ref in call.components:
            blueprint.check_component(name, ref, name)
    engine = _load(blueprint, defer_bake=_defers_bake(blueprint, calls))
    engine.lcm_beside = calls is not None and blueprint.device.startswith("cpu")
    for field, ref in loras.items():
        engine.preload_lora(ref, field)
    for kind, table in tables.items():
        for field, ref in table.items():
            engine.check_component(kind, ref, field)  # loads it, checked on the real UNet
    _speed_up(engine, blueprint, calls, fast_path, progress)
    return engine


def prepare_next(engine, progress: Callable[[str], None] | None = None,
                 load: bool = True) -> list[str]:
    """Convert what a one-shot build left out (the cache did not hold it), so that the next
    start finds it. Returns what was converted (none: nothing was missing). `load=False`:
    into the cache only, when this engine runs nothing more (a command's last step)."""
    parts = getattr(engine.fast_path, "openvino", None)
    if parts is None or not parts.missing:
        return []
    labels = [wanted.label for wanted in parts.missing]
    parts.build_missing(engine, progress, load=load)
    return labels


def prepare_one_shots(engine, batches: Sequence[int]) -> list[str]:
    """Compile the converted models into the cache for one-shot commands making `batches`
    images a call (they compile for their call's batch: `OpenVINOParts.write_static`).
    Returns what was compiled now."""
    parts = getattr(engine.fast_path, "openvino", None)
    if parts is None:
        return []
    return [label for batch in batches for label in parts.write_static(batch)]


def missing_parts(engine) -> list[str]:
    """What a one-shot build found missing in the cache (converted by `prepare_next`)."""
    parts = getattr(engine.fast_path, "openvino", None)
    return [wanted.label for wanted in parts.missing] if parts is not None else []


def _defers_bake(blueprint: Blueprint, calls: Sequence[PipelineCall] | None = None) -> bool:
    """Whether the LCM-LoRA's bake waits until torch runs the base UNet: when OpenVINO may
    serve every base call (torch's weights then stay as loaded, mapped from the file), or for
    a one-shot command on a CPU (its call merges only the layers where that pays:
    `Engine.lcm_beside`); and the LoRA touches the UNet only (converted text encoders come
    from torch's as they are)."""
    lcm = blueprint.lcm
    if lcm.ref is None:
        return False
    if blueprint.openvino[0] is None and not (calls and blueprint.device.startswith("cpu")):
        return False
    lora = blueprint.lora(lcm.ref, "lcm_lora")
    return not any(key.startswith(("lora_te", "text_encoder", "te_")) for key in lora.raw)


def _load(blueprint: Blueprint, defer_bake: bool = False):
    from diffusers import LCMScheduler

    from .engine import Engine, LoadedModel
    from .loading import load_pipeline
    from .lora import bake_lora, lora_models

    family = blueprint.family
    cls = family.pipeline_class("inpaint" if blueprint.inpaint_only else "txt2img")
    base = load_pipeline(cls, blueprint.model_ref, config_ref=blueprint.config_ref,
                         family=family, torch_dtype=blueprint.dtype)
    base.scheduler = LCMScheduler.from_config(base.scheduler.config)
    base.set_progress_bar_config(disable=True)
    base.to(blueprint.device)
    lcm = blueprint.lcm
    unbaked = None
    if lcm.ref is not None:
        lora = blueprint.lora(lcm.ref, "lcm_lora")
        check_fits(lora, type(base), lora_models(base, base.unet))
        if defer_bake:
            unbaked = lora
        else:
            bake_lora(base, lora, lcm.weight)
    options = blueprint.options
    model = LoadedModel(pipeline=base, family=family, model_ref=blueprint.model_text,
                        lcm_ref=lcm.ref, lcm_weight=lcm.weight,
                        animate_lcm_weight=lcm.animate_weight, device=blueprint.device,
                        unbaked=unbaked)
    engine = Engine(model, blueprint.settings, fuse_loras=options.fuse_loras,
                    speed=options.speed, tiny_vae=options.tiny_vae)
    engine.adopt_loras(blueprint._loras)  # read and checked already: not read again
    return engine


def _declared_shapes(blueprint: Blueprint, calls: Sequence[PipelineCall] | None):
    """The (width, height, batch) shapes to build ahead: the calls' own, or the declared ones
    (None: the fast path's default for the family)."""
    if calls is None:
        return blueprint.options.compile_shapes
    return tuple(dict.fromkeys((call.width, call.height, call.count) for call in calls
                               if call.task in BASE_UNET_TASKS and not call.components))


def _graph_loop(options: EngineOptions, device: str, calls) -> tuple[bool, str | None]:
    """Whether the whole text-to-image loop is captured as CUDA graphs, and why not. `auto`
    turns it on where a GPU run measured it: an engine serving many calls (not a one-shot
    command: a capture takes seconds, a call saves milliseconds) at speed `default`, whose
    graphs replay the eager UNet (bitwise the pipeline's pixels, SD1.5 512x512 batch 1 on an
    H200: 54.6 ms a call against 210 ms). Over the compiled UNet of `auto` and `fastest` it has
    not run on a GPU yet: `on` asks for it there."""
    choice = options.cuda_graph_loop
    if choice != "auto":
        return choice == "on", None
    if not device.startswith("cuda"):
        return False, None  # CUDA graphs: nothing to say elsewhere
    if calls is not None:
        return False, "off (auto: a one-shot command; capturing takes longer than it saves)"
    if options.speed == "off":
        return False, None  # nothing beyond the recipe's own path
    if options.speed != "default":
        return False, (f"off (auto: not yet measured over speed {options.speed}'s UNet; "
                       "cuda_graph_loop=on asks for it)")
    return True, None


def _speed_up(engine, blueprint: Blueprint, calls, fast_path, progress) -> None:
    import torch

    from .accel import FastPath

    options = blueprint.options
    precision, why = blueprint.openvino
    graph_why = None  # why `auto` left the graph loop off
    if fast_path is None:
        extra: dict[str, Any] = {}
        if options.tiny_vae:
            extra["tiny_vae"] = options.tiny_vae
        if options.fp16_vae and engine.dtype == torch.float16:
            extra["fp16_vae"] = options.fp16_vae  # an SDXL VAE that needs no float32 upcast
        shapes = _declared_shapes(blueprint, calls)
        if shapes is not None:
            extra["compile_shapes"] = tuple(shapes)
        if options.compile_cache is not None:
            extra["compile_cache_dir"] = options.compile_cache
        graph_loop, graph_why = _graph_loop(options, engine.device, calls)
        if graph_loop:
            extra["cuda_graph_loop"] = True
            # `auto` chose it: a capture that fails leaves it off (said in the report)
            extra["graph_loop_optional"] = options.cuda_graph_loop == "auto"
        if precision:
            from .accel import half_dtype_for
            from .accel.openvino import weights_for

            extra["openvino"] = precision
            extra["openvino_build"] = calls is None  # a one-shot command: the cache only
            extra["openvino_weights"] = weights_for(options.openvino, options.speed,
                                                    half_dtype_for(engine.device))
        fast_path = FastPath.preset(options.speed, engine.device, engine.family.name, **extra)
    report = fast_path.apply(engine, warm_up=_warm_up(engine), progress=progress)
    if not engine.baked and getattr(fast_path, "openvino", None) is None and calls is None:
        engine.bake()  # OpenVINO was skipped after all: torch runs every call
    if not fast_path.options.openvino:
        report.applied["openvino"] = why  # why not ("off (package not installed)", ...)
    if graph_why and report.applied.get("cuda_graph_loop") == "off":
        report.applied["cuda_graph_loop"] = graph_why
    engine.fast_path, engine.fast_report = fast_path, report


def _warm_up(engine) -> Callable[[int, int, int], Any]:
    """What a speed technique runs to build a shape ahead: a short text-to-image call."""
    from .tasks import Txt2ImgRequest

    def run(width: int, height: int, batch: int):
        return engine.generate(Txt2ImgRequest(prompt="warm-up", steps=2, seed=0, width=width,
                                              height=height, num_images=batch))

    return run
