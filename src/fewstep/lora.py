"""LoRA files: reading, checking against a model, and per-request stacks.

Both key formats load: kohya-style (`lora_unet_...` / `lora_te_...` with `.alpha`, with diffusers
or original LDM module names) and diffusers/peft (`unet.<module>.lora_A.weight`). A file is read
and checked in full -- finite values, known keys, every target module present with matching
shapes -- before anything touches the model, so a bad or foreign LoRA is refused with the model
unchanged.

The family's LCM-LoRA is baked into the base weights once (`bake_lora`): it is the same for every
request of an engine. A one-shot command's call merges only the layers where that pays for its
steps and runs the rest beside them (`run_beside`, `merge_pays`); a later bake completes it.
Style and motion LoRAs are peft adapters, activated per request with `set_adapters` and
deactivated (not merely scaled to zero) when a request does not ask for them, so one request's
stack never reaches the next."""

from __future__ import annotations

import hashlib
import math
import re
from collections import OrderedDict
from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import InvalidRequest, LoraError, NotFound
from .loading import hub_file, parse_ref

MAX_LORA_WEIGHT = 4.0
LORA_FILENAME = "pytorch_lora_weights.safetensors"
_PEFT_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)\.weight$")
_TE_PREFIXES = ("text_encoder", "text_encoder_2")


@dataclass(frozen=True)
class LoraSpec:
    """One entry of a stack: a reference (path or hub id) and its weight."""

    ref: str
    weight: float = 1.0


def split_weight(text: str) -> tuple[str, float | None]:
    """`REF[:WEIGHT]` -> (REF, WEIGHT or None). The weight is split off only when what follows
    the last colon is a number, so Windows drive letters and hub ids stay intact."""
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return text, None


def parse_lora_arg(text: str, field: str = "lora", default_weight: float = 1.0) -> LoraSpec:
    ref, weight = split_weight(text)
    return LoraSpec(ref=ref, weight=check_weight(default_weight if weight is None else weight,
                                                 field))


def check_weight(weight: float, field: str) -> float:
    if not isinstance(weight, (int, float)) or isinstance(weight, bool):
        raise InvalidRequest(f"{field} weight must be a number, got {weight!r}", field=field)
    if not math.isfinite(weight) or abs(weight) > MAX_LORA_WEIGHT:
        raise InvalidRequest(
            f"{field} weight must be finite and within ±{MAX_LORA_WEIGHT}, got {weight!r}",
            field=field,
        )
    return float(weight)


def resolve_lora_file(text: str, field: str = "lora") -> Path:
    """A LoRA reference -> the .safetensors file to read (downloaded when it is a hub id)."""
    ref = parse_ref(text, field)
    if ref.path is not None:
        if ref.path.is_dir():
            candidates = [ref.path / LORA_FILENAME] + sorted(ref.path.glob("*.safetensors"))
            for candidate in candidates:
                if candidate.is_file():
                    return candidate
            raise NotFound(f"{field} {text!r}: the folder holds no .safetensors file", field=field)
        if ref.path.suffix != ".safetensors":
            raise LoraError(f"{field} {text!r} is not a .safetensors file", field=field)
        return ref.path
    if ref.filename is not None:
        return hub_file(ref, ref.filename, field)
    try:
        return hub_file(ref, LORA_FILENAME, field)
    except NotFound:
        # many LoRA repos name their file otherwise: take it when it is the only one
        return hub_file(ref, _only_safetensors(ref, field), field)


def _only_safetensors(ref, field: str) -> str:
    from huggingface_hub import list_repo_files

    try:
        files = [f for f in list_repo_files(ref.repo) if f.endswith(".safetensors")]
    except Exception as exc:  # noqa: BLE001 - offline or gone: say what to pass instead
        raise NotFound(f"{field} {ref.text!r} has no {LORA_FILENAME}; name the file as "
                       f"{ref.repo}/<file>.safetensors", field=field) from exc
    if len(files) != 1:
        raise NotFound(
            f"{field} {ref.text!r} has no {LORA_FILENAME} and "
            f"{'no' if not files else len(files)} .safetensors files; name one as "
            f"{ref.repo}/<file>.safetensors" + (f" ({', '.join(files[:5])})" if files else ""),
            field=field)
    return files[0]


@dataclass
class LoraFile:
    """A LoRA read from disk and checked for sanity; `fits()` checks it against a model."""

    ref: str
    path: Path
    raw: dict[str, torch.Tensor]
    digest: str  # names the adapter; changes when the file changes
    field: str = "lora"
    # (id of the UNet, pipeline class, unknown_ok) -> (that UNet, complete): the models it was
    # checked against, kept alive so that an id is never reused while the LoRA is known
    checked: dict = dc_field(default_factory=dict)

    @property
    def adapter_name(self) -> str:
        return "fs_" + self.digest


def read_lora(text: str, field: str = "lora") -> LoraFile:
    from safetensors.torch import load_file

    path = resolve_lora_file(text, field)
    stat = path.stat()
    try:
        raw = load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - truncated, corrupt or not safetensors
        raise LoraError(
            f"{field} {text!r} is not a readable .safetensors file (truncated or corrupt?): "
            f"{type(exc).__name__}",
            field=field,
        ) from exc
    if not raw:
        raise LoraError(f"{field} {text!r} holds no tensors", field=field)
    for key, tensor in raw.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise LoraError(f"{field} {text!r}: tensor {key!r} holds NaN or Inf values",
                            field=field)
    digest = hashlib.sha1(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return LoraFile(ref=text, path=path, raw=raw, digest=digest, field=field)


def canonical_parts(lora: LoraFile, pipeline_cls, unet_config) -> dict[str, dict]:
    """The file's tensors in peft layout, split by component: {"unet": {...}, "text_encoder": ...}.

    Uses diffusers' own converters (the same ones `load_lora_weights` uses), so what is checked
    here is what would be loaded."""
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    try:
        kwargs = {"unet_config": unet_config} if "XL" in pipeline_cls.__name__ else {}
        state, _alphas = pipeline_cls.lora_state_dict(dict(lora.raw), **kwargs)
    except Exception as exc:  # noqa: BLE001 - diffusers raises many kinds on foreign files
        raise LoraError(f"{lora.field} {lora.ref!r}: not a LoRA format fewstep knows ({exc})",
                        field=lora.field) from exc
    parts: dict[str, dict] = {}
    for key, value in state.items():
        prefix, _, rest = key.partition(".")
        if prefix not in ("unet",) + _TE_PREFIXES or not rest:
            raise LoraError(f"{lora.field} {lora.ref!r}: unknown key {key!r}", field=lora.field)
        parts.setdefault(prefix, {})[rest] = value
    if "unet" in parts and not any("lora_A" in k for k in parts["unet"]):
        parts["unet"] = convert_unet_state_dict_to_peft(parts["unet"])
    for prefix in _TE_PREFIXES:
        if prefix in parts:
            parts[prefix] = convert_state_dict_to_peft(convert_state_dict_to_diffusers(parts[prefix]))
    return parts


def _weight_shape(module) -> tuple[int, int] | None:
    base = getattr(module, "base_layer", module)  # a module that already carries adapters
    if isinstance(base, torch.nn.Linear):
        return base.out_features, base.in_features
    if isinstance(base, torch.nn.Conv2d):
        return base.out_channels, base.in_channels
    return None


def lora_models(pipe, unet) -> dict[str, torch.nn.Module]:
    """The models a LoRA may adapt: `unet` and the pipeline's text encoders."""
    models = {"unet": unet}
    for name in _TE_PREFIXES:
        model = getattr(pipe, name, None)
        if model is not None:
            models[name] = model
    return models


MOTION_LAYERS = ".motion_modules."  # where motion LoRAs adapt the motion UNet


def check_fits(lora: LoraFile, pipeline_cls, models: dict[str, torch.nn.Module],
               unknown_ok: str | None = None) -> bool:
    """Refuse a LoRA whose keys or shapes do not fit `models` ({"unet": ..., "text_encoder":
    ...}, as `lora_models` gives them; meta-device copies work as well): a LoRA for another
    family, a mis-shaped or foreign file. Reads the models, changes nothing. Layers whose name
    contains `unknown_ok` may be missing (motion layers, checked on the motion UNet). Returns
    whether every layer it adapts was found."""
    unet = models["unet"]
    token = (id(unet), pipeline_cls.__name__, unknown_ok)
    if token in lora.checked:
        return lora.checked[token][1]
    complete = True
    parts = canonical_parts(lora, pipeline_cls, unet.config)
    if not parts:
        raise LoraError(f"{lora.field} {lora.ref!r} holds no LoRA weights", field=lora.field)
    for prefix, tensors in parts.items():
        model = models.get(prefix)
        if model is None:
            raise LoraError(
                f"{lora.field} {lora.ref!r} has {prefix} weights but this model has no {prefix}; "
                "is it a LoRA for another model family?",
                field=lora.field,
            )
        modules = dict(model.named_modules())
        if not hasattr(model, "text_model"):  # flattened CLIP in recent transformers
            tensors = {k.removeprefix("text_model."): v for k, v in tensors.items()}
        for key, tensor in tensors.items():
            match = _PEFT_KEY.match(key)
            if match is None:
                if key.endswith((".alpha", ".lora_magnitude_vector")) or ".lora_B.bias" in key:
                    continue
                raise LoraError(f"{lora.field} {lora.ref!r}: unknown key {prefix}.{key!r}",
                                field=lora.field)
            module = modules.get(match["module"])
            if module is None and unknown_ok and unknown_ok in f".{match['module']}.":
                complete = False
                continue
            shape = _weight_shape(module) if module is not None else None
            if shape is None:
                raise LoraError(
                    f"{lora.field} {lora.ref!r} targets {prefix}.{match['module']}, which this "
                    "model does not have; is it a LoRA for another model family?",
                    field=lora.field,
                )
            out_f, in_f = shape
            ok = tensor.shape[1] == in_f if match["part"] == "lora_A" else tensor.shape[0] == out_f
            if tensor.ndim < 2 or not ok:
                raise LoraError(
                    f"{lora.field} {lora.ref!r}: {prefix}.{key} has shape {tuple(tensor.shape)}, "
                    f"which does not fit the model's layer ({out_f} out, {in_f} in); is it a LoRA "
                    "for another model family?",
                    field=lora.field,
                )
    lora.checked[token] = (unet, complete)
    return complete


def bake_lora(pipe, lora: LoraFile, weight: float, skip: frozenset[str] = frozenset()) -> None:
    """Add `weight` x the LoRA into the base weights for good (used for the LCM-LoRA): the
    model runs at plain speed afterwards, with no adapter layers in the way. `skip`: UNet
    layers that hold it already (merged by `run_beside`)."""
    from peft.tuners.lora import LoraLayer

    name = "fs_bake"
    pipe.load_lora_weights(dict(lora.raw), adapter_name=name)
    try:
        for key, model in lora_models(pipe, pipe.unet).items():
            for qualified, module in model.named_modules():
                if isinstance(module, LoraLayer) and name in module.lora_A and \
                        not (key == "unet" and qualified in skip):
                    _merge_into_new_weight(module, name, weight)
    finally:
        pipe.unload_lora_weights()


def _mergeable(layer, name: str) -> bool:
    """A plain LoRA on a Linear or Conv2d: merged with one matrix multiply-add."""
    base = layer.get_base_layer()
    lora_a, lora_b = layer.lora_A[name].weight, layer.lora_B[name].weight
    return (isinstance(base, (torch.nn.Linear, torch.nn.Conv2d))
            and not layer.use_dora.get(name, False)
            and not getattr(layer, "lora_bias", {}).get(name, False)
            and not getattr(layer, "fan_in_fan_out", False)
            and name not in getattr(layer, "lora_variant", {})
            and lora_b.dim() in (2, 4) and lora_b[0].numel() == lora_b.shape[1]  # B: 1x1
            and lora_a.shape[1:] == base.weight.shape[1:])


def _merge_into_new_weight(layer, name: str, weight: float) -> None:
    """`W + weight x scaling x (B @ A)` into a new tensor that becomes the layer's weight (what
    peft's merge computes, in one matrix multiply-add). peft adds into the loaded weight in
    place: loaded weights are mapped from the file, and writing them copies them a page at a
    time (11 s against 2 s for the SD1.5 UNet on 2 cores). Other kinds of adapter (DoRA, a
    LoRA with a bias, a factorised kernel) are merged by peft."""
    if not _mergeable(layer, name):
        layer.scale_layer(weight)
        layer.merge(adapter_names=[name])
        return
    base = layer.get_base_layer()
    lora_a, lora_b = layer.lora_A[name].weight, layer.lora_B[name].weight
    old = base.weight
    with torch.no_grad():
        merged = torch.addmm(old.reshape(old.shape[0], -1),
                             lora_b.reshape(lora_b.shape[0], -1).to(old.dtype),
                             lora_a.reshape(lora_a.shape[0], -1).to(old.dtype),
                             alpha=layer.scaling[name] * weight)
    merged = merged.view(old.shape)
    if old.dim() == 4 and not old.is_contiguous() and \
            old.is_contiguous(memory_format=torch.channels_last):
        merged = merged.contiguous(memory_format=torch.channels_last)  # as it was
    base.weight = torch.nn.Parameter(merged, requires_grad=old.requires_grad)


@dataclass
class AdapterSlots:
    """The adapters loaded into one UNet (and the text encoders beside it), least recently used
    first. Bounded: the oldest unused adapter is deleted when a new one would exceed `limit`."""

    tag: str = "base"  # text encoders are shared between UNets: names must differ per UNet
    limit: int = 8
    loaded: OrderedDict = dc_field(default_factory=OrderedDict)  # adapter name -> LoraFile
    fused: "FusedStack | None" = None  # set: stacks are fused into the weights (shared)


def slot_name(lora: LoraFile, tag: str) -> str:
    return f"{lora.adapter_name}_{tag}"


class FusedStack:
    """Applies a stack by writing `W0 + sum(weight x delta)` into each adapted layer's weights,
    with the adapter layers switched off: the model then runs at plain speed, and a compiled
    model sees changed values, never a changed graph. `W0` is kept once per adapted layer, so
    every stack starts from the original weights (exact, no drift from fuse/unfuse cycles).
    The current stack is remembered: the same stack again costs nothing."""

    def __init__(self):
        self.pristine: dict[int, tuple[torch.nn.Module, torch.Tensor]] = {}
        self.current: tuple = ()

    def restore(self) -> None:
        with torch.no_grad():
            for layer, weight in self.pristine.values():
                layer.base_layer.weight.copy_(weight)
        self.current = ()

    def reset(self) -> None:
        """Restore the originals and forget them (before adapter layers are removed)."""
        self.restore()
        self.pristine.clear()

    def apply(self, pipe, stack: list[tuple[LoraFile, float]], tag: str) -> None:
        from peft.tuners.lora import LoraLayer

        names = [slot_name(lora, tag) for lora, _ in stack]
        key = (id(pipe.unet), tuple(zip(names, (weight for _, weight in stack))))
        if key == self.current:
            return
        if names:  # sets each adapter's scaling to weight x alpha / rank
            pipe.enable_lora()
            pipe.set_adapters(names, adapter_weights=[w for _, w in stack])
        self.restore()
        with torch.no_grad():
            for model in _lora_models(pipe):
                for module in model.modules():
                    if not isinstance(module, LoraLayer):
                        continue
                    present = [n for n in names if n in module.lora_A]
                    if not present:
                        continue
                    weight = module.base_layer.weight
                    if id(module) not in self.pristine:
                        self.pristine[id(module)] = (module, weight.detach().clone())
                    delta = sum(module.get_delta_weight(n) for n in present)
                    weight.add_(delta.to(weight.dtype))
        if names or self.pristine:
            pipe.disable_lora()  # the deltas are in the weights now
        self.current = key


def _lora_models(pipe):
    for name in ("unet", "text_encoder", "text_encoder_2"):
        model = getattr(pipe, name, None)
        if model is not None:
            yield model


def apply_stack(pipe, slots: AdapterSlots, stack: list[tuple[LoraFile, float]]) -> None:
    """Make exactly `stack` active on `pipe` (already checked with `check_fits`): as peft
    adapters computed beside each layer, or fused into the weights when `slots.fused` is set."""
    _load_adapters(pipe, slots, stack)
    if slots.fused is not None:
        slots.fused.apply(pipe, stack, slots.tag)
        return
    if not slots.loaded:
        return
    if stack:
        pipe.enable_lora()
        pipe.set_adapters([slot_name(lora, slots.tag) for lora, _ in stack],
                          adapter_weights=[w for _, w in stack])
    else:
        pipe.disable_lora()


def run_beside(pipe, slots: AdapterSlots, lora: LoraFile, weight: float, merged: set[str],
               merge_pays: Callable[[str, Any], bool]) -> None:
    """Make `lora` alone active on `pipe`'s UNet at `weight`, each layer either merged into its
    weights or run beside them as a peft adapter (the recipe's way), whichever costs less for
    the call about to run (`merge_pays(name, layer)`), even where stacks are fused
    (`slots.fused`: its current stack must be empty). `merged` names the UNet layers whose
    weights hold the LoRA (from earlier calls; grown here): they carry no adapter. The caller
    switches the adapter off (`disable_lora`) after the call."""
    from peft.tuners.lora import LoraLayer

    name = slot_name(lora, slots.tag)
    _load_adapters(pipe, slots, [(lora, weight)])
    pipe.enable_lora()
    pipe.set_adapters([name], adapter_weights=[weight])  # each layer's scaling holds it now
    dropped = False
    for qualified, layer in pipe.unet.named_modules():
        if not isinstance(layer, LoraLayer) or name not in layer.lora_A:
            continue
        if qualified not in merged:
            if not (_mergeable(layer, name) and merge_pays(qualified, layer)):
                continue
            _merge_into_new_weight(layer, name, 1.0)
            merged.add(qualified)
        layer.delete_adapter(name)
        dropped = True
    if dropped:  # a layer that lost its active adapter may have picked another one
        pipe.set_adapters([name], adapter_weights=[weight])


# what merging a layer and running it beside cost, measured on the SD1.5 UNet with the
# LCM-LoRA (rank 64, float32, 2-core Xeon): merging all 857 M weights took 1.7 s; beside, the
# adapters added 0.3 s to each 256x256 step, about half of it per layer whatever its size
_MERGE_SECONDS_PER_WEIGHT = 1e-9  # plus as much again per 64 of rank
_BESIDE_SECONDS_PER_UNIT = 1.3e-11  # per token x rank x (inputs + outputs)
_BESIDE_SECONDS_PER_LAYER = 5e-4  # per layer and step


def merge_pays(qualified: str, layer, adapter: str, latent: tuple[int, int], levels: int,
               runs: int) -> bool:
    """Whether merging a UNet layer's adapter costs less than running it beside the layer
    for `runs` (steps x images) at `latent` (height, width), the tokens it sees taken from
    where it sits in the UNet (`levels`: its resolutions)."""
    weight = layer.get_base_layer().weight
    rank = layer.lora_A[adapter].weight.shape[0]
    inputs, outputs = weight[0].numel(), weight.shape[0]
    merge = weight.numel() * _MERGE_SECONDS_PER_WEIGHT * (1 + rank / 64)
    beside = _unet_tokens(qualified, latent, levels) * rank * (inputs + outputs) * \
        _BESIDE_SECONDS_PER_UNIT + _BESIDE_SECONDS_PER_LAYER
    return merge < runs * beside


def _unet_tokens(qualified: str, latent: tuple[int, int], levels: int) -> int:
    """The positions a layer of a diffusers UNet runs over for one image: the latent at its
    block's resolution, the text tokens for a cross-attention's keys and values, one for the
    time embeddings. A name it does not know counts as the full latent (merged sooner)."""
    if qualified.startswith(("time_embedding", "add_embedding")) or \
            qualified.endswith("time_emb_proj"):
        return 1
    if re.search(r"\.attn2\.to_[kv]$", qualified):
        return 77
    level = 0
    if match := re.match(r"down_blocks\.(\d+)\.", qualified):
        level = int(match[1]) + (".downsamplers." in qualified)
    elif qualified.startswith("mid_block."):
        level = levels - 1
    elif match := re.match(r"up_blocks\.(\d+)\.", qualified):
        level = levels - 1 - int(match[1]) - (".upsamplers." in qualified)
    level = min(max(level, 0), levels - 1)
    return max(1, latent[0] >> level) * max(1, latent[1] >> level)


def _load_adapters(pipe, slots: AdapterSlots, stack: list[tuple[LoraFile, float]]) -> None:
    wanted = [slot_name(lora, slots.tag) for lora, _ in stack]
    for lora, _ in stack:
        name = slot_name(lora, slots.tag)
        if name in slots.loaded:
            slots.loaded.move_to_end(name)
            continue
        while len(slots.loaded) >= max(slots.limit, len(stack)):
            oldest = next(n for n in slots.loaded if n not in wanted)
            if slots.fused is not None:
                slots.fused.restore()
            pipe.delete_adapters(oldest)
            del slots.loaded[oldest]
        if slots.fused is not None:
            slots.fused.restore()  # deleting or adding layers must start from clean weights
        pipe.load_lora_weights(dict(lora.raw), adapter_name=name)
        slots.loaded[name] = lora
